"""The files of a Hugging Face dataset on disk: which parquet or Arrow files, which split each
holds (from the Hub's file and folder names, or ``save_to_disk``'s JSON), and their chunks."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from bob_cache.data.source import default_name
from bob_cache.errors import DataNotFoundError, DataSourceError

SPLIT_ALIASES = {
    "train": "train", "training": "train", "validation": "val", "valid": "val", "val": "val",
    "dev": "val", "test": "test", "testing": "test",
}  # fmt: skip
_SHARD = re.compile(r"^(?P<split>[A-Za-z][A-Za-z0-9_.]*?)-\d{5}-of-\d{5}")


@dataclass(frozen=True)
class DataFile:
    """One parquet or Arrow file, the split it holds (None: not named) and its chunk sizes."""

    path: str
    rel: str
    split: str | None
    arrow: bool
    chunks: tuple[int, ...] = ()

    def values(self, columns: list[str]) -> dict[str, list[Any]]:
        """The whole file's ``columns`` as lists (nested fields as ``img.path``)."""
        if self.arrow:
            table = open_arrow(self.path)
        else:
            table = pq.ParquetFile(self.path).read(columns=columns)
        return {c: arrow_column(table, c).to_pylist() for c in columns}

    def read_chunk(self, chunk: int, column: str) -> pa.Array:
        """One row group (parquet) or record batch (Arrow) of ``column``."""
        if not self.arrow:
            part = pq.ParquetFile(self.path).read_row_group(chunk, columns=[column])
            return part.column(column).combine_chunks()
        return open_arrow(self.path).column(column).chunk(chunk)


def open_arrow(path: str) -> pa.Table:
    """A ``save_to_disk`` Arrow file, memory-mapped (IPC stream, or IPC file format)."""
    source = pa.memory_map(path)
    try:
        return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
        return pa.ipc.open_file(pa.memory_map(path)).read_all()


def arrow_column(table: pa.Table, name: str) -> pa.ChunkedArray:
    column, _, child = name.partition(".")
    values = table.column(column)
    if not child:
        return values
    return pa.chunked_array([c.field(child) for c in values.chunks], type=values.type[child].type)


def is_hf_layout(path: Path) -> bool:
    """True for a folder that is plainly a HF dataset on disk (parquet shards or save_to_disk)."""
    if not path.is_dir():
        return path.suffix == ".parquet" and path.is_file()
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return True
    if next(path.glob("*.parquet"), None) is not None:
        return True
    # shallow looks only: an image folder's split folders may hold a million files
    return any(
        (path / d).is_dir() and next((path / d).glob("*.parquet"), None) is not None
        for d in ("data", *SPLIT_ALIASES)
    )


def discover(root: Path) -> tuple[list[DataFile], dict[str, Any]]:
    """Every data file with its split, and the HF features of ``dataset_info.json`` (if any)."""
    if root.is_file():
        return [_parquet_file(root, root.parent)], {}
    if (root / "dataset_dict.json").is_file():
        listing = _read_json(root / "dataset_dict.json")
        names = listing.get("splits") if isinstance(listing, dict) else None
        if not isinstance(names, list) or not names:
            raise DataSourceError(
                f"'{root / 'dataset_dict.json'}' lists no splits (expected "
                '{"splits": ["train", ...]}). Save the dataset again with save_to_disk.'
            )
        files, features = [], {}
        for split in names:
            part, features = _saved_dataset(root / str(split), root, split=str(split))
            files += part
        return files, features
    if (root / "state.json").is_file() or (root / "dataset_info.json").is_file():
        return _saved_dataset(root, root, split=None)
    shards = sorted(p for p in root.rglob("*.parquet") if p.is_file())
    if not shards:
        raise DataNotFoundError(
            f"'{root}' holds no parquet file and no save_to_disk files (state.json, "
            "dataset_dict.json). Expected data/train-00000-of-00001.parquet (the Hub layout), "
            "SPLIT/0000.parquet, or a folder written by Dataset.save_to_disk."
        )
    return [_parquet_file(p, root) for p in shards], {}


def _saved_dataset(
    folder: Path, root: Path, *, split: str | None
) -> tuple[list[DataFile], dict[str, Any]]:
    """The Arrow files of one ``Dataset.save_to_disk`` folder, as its ``state.json`` lists."""
    state_path = folder / "state.json"
    if not state_path.is_file():
        raise DataNotFoundError(
            f"'{folder}' is missing state.json, which Dataset.save_to_disk writes beside "
            "data-00000-of-00001.arrow. Copy the whole folder, or save the dataset again."
        )
    state = _read_json(state_path)
    names = [d.get("filename") for d in state.get("_data_files") or [] if isinstance(d, dict)]
    if not names:
        raise DataSourceError(f"'{state_path}' lists no data files (_data_files is empty).")
    if split is None and state.get("_split"):
        split = str(state["_split"])
    files = []
    for filename in names:
        path = folder / str(filename)
        if not path.is_file():
            raise DataNotFoundError(
                f"'{path}' is missing: '{state_path}' lists it as a data file. Copy the whole "
                "save_to_disk folder."
            )
        files.append(_arrow_file(path, root, split))
    info = folder / "dataset_info.json"
    features = _read_json(info).get("features") if info.is_file() else None
    return files, features if isinstance(features, dict) else {}


def _parquet_file(path: Path, root: Path) -> DataFile:
    rel = path.relative_to(root).as_posix() if path != root else path.name
    meta = pq.ParquetFile(path).metadata
    chunks = tuple(meta.row_group(i).num_rows for i in range(meta.num_row_groups))
    return DataFile(str(path), rel, _split_of(Path(rel)), arrow=False, chunks=chunks)


def _arrow_file(path: Path, root: Path, split: str | None) -> DataFile:
    table = open_arrow(str(path))
    first = table.column(0).chunks if table.num_columns else []
    chunks = tuple(len(c) for c in first)
    rel = path.relative_to(root).as_posix()
    return DataFile(str(path), rel, _normalize_split(split), arrow=True, chunks=chunks)


def _split_of(rel: Path) -> str | None:
    """The split a file holds, from its name (``test-00000-of-00001``) or its folders."""
    named = split_name(rel.name)
    if named:
        return named
    for part in reversed(rel.parts[:-1]):
        word = part.removeprefix("partial-").lower()
        if word in SPLIT_ALIASES:
            return SPLIT_ALIASES[word]
    return None


def split_name(filename: str) -> str | None:
    shard = _SHARD.match(filename)
    if shard:
        return _normalize_split(shard.group("split"))
    word = re.split(r"[-_.]", filename, maxsplit=1)[0].lower()
    return SPLIT_ALIASES.get(word)


def _normalize_split(split: str | None) -> str | None:
    if split is None:
        return None
    return SPLIT_ALIASES.get(split.lower(), default_name(split))


def check_split_names(files: list[DataFile]) -> None:
    """Refuse files of no named split beside files of named splits."""
    unnamed = [f.rel for f in files if f.split is None]
    if unnamed and len(unnamed) < len(files):
        raise DataSourceError(
            f"Cannot tell which split '{unnamed[0]}' holds, while other files name theirs. "
            "Name it as the Hub does (SPLIT-00000-of-00001.parquet, or put it in a SPLIT/ "
            "folder), or point --data at one file."
        )


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataSourceError(
            f"'{path}' is not readable JSON ({exc}). Copy it again from the original dataset."
        ) from exc
