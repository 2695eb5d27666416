"""Hugging Face datasets on disk: parquet shards and ``save_to_disk`` folders.

Three layouts, read with pyarrow (the ``datasets`` package is not needed):

- a ``.parquet`` file, or a folder of parquet shards as the Hub stores them
  (``data/train-00000-of-00002.parquet``, ``plain_text/train/0000.parquet``, ...);
- a ``Dataset.save_to_disk`` folder (``data-00000-of-00001.arrow`` Arrow IPC stream files,
  ``dataset_info.json``, ``state.json``);
- a ``DatasetDict.save_to_disk`` folder (``dataset_dict.json`` and one such folder per split).

Splits come from the files' names (``validation`` → ``val``); a dataset with no split names is
split by id hash (:mod:`bob_cache.data.splits`). The image column is the one whose feature is
the HF ``Image`` (a ``{bytes, path}`` struct) or a binary column; labels come from ``label``
(class names from its ``ClassLabel`` feature); ``hf:DIR?image=img&label=fine_label`` names
others. A row's id is its ``id`` column, else its image's path where those are unique, else
``FILE#ROW``. Null or negative labels make unlabeled rows (-1), counted in a warning.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from bob_cache.data.images import open_image_file
from bob_cache.data.source import (
    AS_DISTRIBUTED,
    DataSource,
    Sample,
    default_name,
    register_source,
)
from bob_cache.data.splits import SplitFractions, split_rows
from bob_cache.errors import DataNotFoundError, DataSourceError, did_you_mean

logger = logging.getLogger(__name__)

PREFIX = "hf:"
OPTIONS = ("image", "label")
SPLIT_ALIASES = {
    "train": "train", "training": "train", "validation": "val", "valid": "val", "val": "val",
    "dev": "val", "test": "test", "testing": "test",
}  # fmt: skip
_SHARD = re.compile(r"^(?P<split>[A-Za-z][A-Za-z0-9_.]*?)-\d{5}-of-\d{5}")
_CACHE_SIZE = 2  # row groups (or record batches) of image data kept per process
_cache: OrderedDict[tuple[str, int, str], pa.Array] = OrderedDict()
_cache_lock = threading.Lock()


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
            table = _open_arrow(self.path)
        else:
            table = pq.ParquetFile(self.path).read(columns=columns)
        return {c: _arrow_column(table, c).to_pylist() for c in columns}

    def read_chunk(self, chunk: int, column: str) -> pa.Array:
        """One row group (parquet) or record batch (Arrow) of ``column``."""
        if not self.arrow:
            part = pq.ParquetFile(self.path).read_row_group(chunk, columns=[column])
            return part.column(column).combine_chunks()
        return _open_arrow(self.path).column(column).chunk(chunk)


@dataclass
class ParquetSource(DataSource):
    """Rows of Hugging Face parquet or Arrow files; ``location`` is ``(file, chunk, row)``."""

    files: list[DataFile] = field(default_factory=list)
    image_column: str = ""

    kind = "parquet"

    def read_bytes(self, sample: Sample) -> bytes | None:
        file_index, chunk, row = sample.location
        data = self.files[file_index]
        value = _chunk(data, chunk, self.image_column)[row].as_py()
        if isinstance(value, dict):
            if value.get("bytes") is not None:
                return bytes(value["bytes"])
            value = value.get("path")
        if isinstance(value, bytes | bytearray):
            return bytes(value)
        if not value:
            raise DataSourceError(
                f"Row '{sample.id}' of '{data.path}' has no image (column "
                f"'{self.image_column}' is null). Drop the row or fill its image."
            )
        return _read_path(str(value), data)

    def open_image(self, sample: Sample) -> Image.Image:
        import io

        return open_image_file(io.BytesIO(self.read_bytes(sample) or b""), name=sample.id)

    def fingerprint_rows(self) -> list[Any]:
        files = [(f.rel, f.split, os.path.getsize(f.path), sum(f.chunks)) for f in self.files]
        return [files, self.image_column, super().fingerprint_rows()]


def _chunk(data: DataFile, chunk: int, column: str) -> pa.Array:
    """``column`` of one chunk of ``data``, through a small per-process LRU cache."""
    key = (data.path, chunk, column)
    with _cache_lock:
        if key in _cache:
            _cache.move_to_end(key)
            return _cache[key]
    array = data.read_chunk(chunk, column)
    with _cache_lock:
        _cache[key] = array
        while len(_cache) > _CACHE_SIZE:
            _cache.popitem(last=False)
    return array


def _read_path(path: str, data: DataFile) -> bytes:
    """An image stored as a path: absolute, or relative to the data file's folder or above."""
    here = Path(data.path).parent
    candidates = [Path(path)] if os.path.isabs(path) else [d / path for d in (here, *here.parents)]
    for candidate in candidates[:4]:
        if candidate.is_file():
            return candidate.read_bytes()
    raise DataNotFoundError(
        f"Image '{path}' named in '{data.path}' was not found (looked beside the file and in "
        "the folders above it). Copy the images next to the dataset, or save the dataset "
        "with its image bytes embedded."
    )


def _open_arrow(path: str) -> pa.Table:
    """A ``save_to_disk`` Arrow file, memory-mapped (IPC stream, or IPC file format)."""
    source = pa.memory_map(path)
    try:
        return pa.ipc.open_stream(source).read_all()
    except pa.ArrowInvalid:
        return pa.ipc.open_file(pa.memory_map(path)).read_all()


def _arrow_column(table: pa.Table, name: str) -> pa.ChunkedArray:
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


def _matches(spec: str) -> bool:
    if spec.startswith(PREFIX):
        return True
    return is_hf_layout(Path(spec).expanduser())


@register_source(
    "parquet",
    _matches,
    before="folder",
    syntax="[hf:]PATH[?image=COL&label=COL]",
    layout="Hugging Face datasets on disk: a .parquet file or a folder of parquet shards "
    "(data/train-00000-of-00001.parquet, ...), or a save_to_disk folder (state.json + "
    "*.arrow, or dataset_dict.json + one such folder per split). Splits from the file names; "
    "image column: the HF Image or binary column; labels: 'label' (class names from its "
    "ClassLabel feature).",
    example="hf:~/data/cifar100?image=img&label=fine_label",
)
def load_parquet(
    spec: str,
    *,
    name: str | None = None,
    split: str = "all",
    fractions: SplitFractions | None = None,
) -> ParquetSource:
    """List a Hugging Face parquet or ``save_to_disk`` dataset (see the module docstring)."""
    root, options = parse_hf_spec(spec)
    files, info_features = _discover(root)
    _check_split_names(files)
    schema, features = _schema(files, info_features)
    image = _pick_image(schema, features, options.get("image"), root)
    label = _pick_label(schema, features, options.get("label"), root)
    class_names, rows = _list_rows(files, schema, features, image=image, label=label)
    if None in rows:
        splits, rule = split_rows(rows[None], split=split, fractions=fractions)
    else:
        splits, rule = {s: rows[s] for s in _ordered(rows)}, AS_DISTRIBUTED
    _warn_unlabeled(root, splits, labelled=label is not None)
    query = {k: v for k, v in (("image", image), ("label", options.get("label"))) if v}
    return ParquetSource(
        name=name or default_name(_dataset_stem(root)),
        origin=f"{PREFIX}{root}" + (f"?{urlencode(query)}" if query else ""),
        splits=splits,
        class_names=class_names,
        split_rule=rule,
        files=files,
        image_column=image,
    )


def parse_hf_spec(spec: str) -> tuple[Path, dict[str, str]]:
    """``hf:PATH?image=COL&label=COL`` → (absolute path, options); the prefix is optional."""
    body = spec[len(PREFIX) :] if spec.startswith(PREFIX) else spec
    path, _, query = body.partition("?")
    options = dict(parse_qsl(query, keep_blank_values=True))
    unknown = [k for k in options if k not in OPTIONS]
    if unknown:
        raise DataSourceError(
            f"Unknown option(s) {unknown} in '{spec}'.{did_you_mean(unknown[0], OPTIONS)} "
            "A Hugging Face dataset takes image=COLUMN and label=COLUMN, e.g. "
            "hf:DIR?image=img&label=fine_label."
        )
    root = Path(path).expanduser().resolve()
    if not root.exists():
        raise DataNotFoundError(
            f"Hugging Face dataset '{path}' does not exist. Expected a .parquet file, a folder "
            "of parquet shards, or a save_to_disk folder."
        )
    return root, options


def _dataset_stem(root: Path) -> str:
    if root.is_dir():
        return root.name
    if _split_name(root.name) is None:
        return root.stem
    parent = root.parent
    return parent.parent.name if parent.name == "data" else parent.name


def _discover(root: Path) -> tuple[list[DataFile], dict[str, Any]]:
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
    table = _open_arrow(str(path))
    first = table.column(0).chunks if table.num_columns else []
    chunks = tuple(len(c) for c in first)
    rel = path.relative_to(root).as_posix()
    return DataFile(str(path), rel, _normalize_split(split), arrow=True, chunks=chunks)


def _split_of(rel: Path) -> str | None:
    """The split a file holds, from its name (``test-00000-of-00001``) or its folders."""
    named = _split_name(rel.name)
    if named:
        return named
    for part in reversed(rel.parts[:-1]):
        word = part.removeprefix("partial-").lower()
        if word in SPLIT_ALIASES:
            return SPLIT_ALIASES[word]
    return None


def _split_name(filename: str) -> str | None:
    shard = _SHARD.match(filename)
    if shard:
        return _normalize_split(shard.group("split"))
    word = re.split(r"[-_.]", filename, maxsplit=1)[0].lower()
    return SPLIT_ALIASES.get(word)


def _normalize_split(split: str | None) -> str | None:
    if split is None:
        return None
    return SPLIT_ALIASES.get(split.lower(), default_name(split))


def _check_split_names(files: list[DataFile]) -> None:
    """Refuse files of no named split beside files of named splits."""
    unnamed = [f.rel for f in files if f.split is None]
    if unnamed and len(unnamed) < len(files):
        raise DataSourceError(
            f"Cannot tell which split '{unnamed[0]}' holds, while other files name theirs. "
            "Name it as the Hub does (SPLIT-00000-of-00001.parquet, or put it in a SPLIT/ "
            "folder), or point --data at one file."
        )


def _ordered(rows: dict[str | None, list[Sample]]) -> list[str]:
    order = {"train": 0, "val": 1, "test": 2}
    return sorted((s for s in rows if s is not None), key=lambda s: (order.get(s, 3), s))


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise DataSourceError(
            f"'{path}' is not readable JSON ({exc}). Copy it again from the original dataset."
        ) from exc


def _schema(files: list[DataFile], info_features: dict[str, Any]) -> tuple[pa.Schema, dict]:
    """The files' common schema and HF features (schema metadata, else dataset_info.json).

    Raises:
        DataSourceError: two files have different columns (two configs mixed).
    """
    schemas = [_open_arrow(f.path).schema if f.arrow else pq.read_schema(f.path) for f in files]
    first = schemas[0]
    for f, s in zip(files, schemas, strict=True):
        if s.names != first.names:
            raise DataSourceError(
                f"'{f.path}' has columns {s.names}, but '{files[0].path}' has {first.names}. "
                "The folder mixes datasets (or Hub configs); point --data at one of them."
            )
    meta = (first.metadata or {}).get(b"huggingface")
    features: Any = None
    if meta:
        try:
            features = json.loads(meta).get("info", {}).get("features")
        except (json.JSONDecodeError, AttributeError):
            features = None
    return first, features if isinstance(features, dict) else info_features


def _feature_type(feature: Any) -> str:
    return str(feature.get("_type", "")) if isinstance(feature, dict) else ""


def _is_binary(kind: pa.DataType) -> bool:
    return pa.types.is_binary(kind) or pa.types.is_large_binary(kind)


def _is_image_struct(kind: pa.DataType) -> bool:
    if not pa.types.is_struct(kind):
        return False
    names = {kind.field(i).name: kind.field(i).type for i in range(kind.num_fields)}
    return "bytes" in names and _is_binary(names["bytes"]) and "path" in names


def _pick_image(schema: pa.Schema, features: dict, wanted: str | None, root: Path) -> str:
    """The image column: ``wanted``, else the HF Image feature, else the one binary column."""
    columns = ", ".join(schema.names)
    if wanted:
        if wanted not in schema.names:
            raise DataSourceError(
                f"Image column '{wanted}' is not in '{root}'.{did_you_mean(wanted, schema.names)}"
                f" Its columns: {columns}."
            )
        kind = schema.field(wanted).type
        if not (_is_image_struct(kind) or _is_binary(kind) or pa.types.is_string(kind)):
            raise DataSourceError(
                f"Column '{wanted}' of '{root}' holds {kind}, not images. An image column holds "
                "encoded bytes, an HF Image {bytes, path} struct, or file paths."
            )
        return wanted
    marked = [n for n in schema.names if _feature_type(features.get(n)) == "Image"]
    marked = marked or [n for n in schema.names if _is_image_struct(schema.field(n).type)]
    marked = marked or [n for n in schema.names if _is_binary(schema.field(n).type)]
    if len(marked) == 1:
        return marked[0]
    what = f"several ({', '.join(marked)})" if marked else "none"
    raise DataSourceError(
        f"Cannot tell which column of '{root}' holds the images: {what} of its columns "
        f"({columns}) is an HF Image or binary column. Name it: hf:{root}?image=COLUMN."
    )


def _pick_label(schema: pa.Schema, features: dict, wanted: str | None, root: Path) -> str | None:
    """The label column: ``wanted``, else ``label``, else the one ClassLabel feature."""
    if wanted:
        if wanted not in schema.names:
            raise DataSourceError(
                f"Label column '{wanted}' is not in '{root}'.{did_you_mean(wanted, schema.names)}"
                f" Its columns: {', '.join(schema.names)}."
            )
        chosen: str | None = wanted
    elif "label" in schema.names:
        chosen = "label"
    else:
        marked = [n for n in schema.names if _feature_type(features.get(n)) == "ClassLabel"]
        if len(marked) > 1:
            raise DataSourceError(
                f"'{root}' has several label columns ({', '.join(marked)}). Name one: "
                f"hf:{root}?label={marked[0]}."
            )
        chosen = marked[0] if marked else None
    if chosen is not None:
        kind = schema.field(chosen).type
        if not (pa.types.is_integer(kind) or pa.types.is_string(kind)):
            raise DataSourceError(
                f"Label column '{chosen}' of '{root}' holds {kind}; a label is one integer class "
                "index or class name per row (multi-label rows: use a .jsonl manifest)."
            )
    return chosen


def _list_rows(
    files: list[DataFile],
    schema: pa.Schema,
    features: dict,
    *,
    image: str,
    label: str | None,
) -> tuple[list[str], dict[str | None, list[Sample]]]:
    """Class names, and every split's samples (labels: -1 where null or negative)."""
    named = [c for c in ("id", "path") if c in schema.names and c not in (image, label)]
    id_column = named[0] if named else None
    path_column = f"{image}.path" if _is_image_struct(schema.field(image).type) else None
    wanted = [c for c in (label, id_column, path_column) if c]
    read = [f.values(wanted) if wanted else {} for f in files]
    raw_labels = [r.get(label, [None] * sum(f.chunks)) for f, r in zip(files, read, strict=True)]
    class_names, to_index = _classes(features.get(label) if label else None, raw_labels, label)
    rows: dict[str | None, list[tuple[str, int, tuple, str | None, str | None]]] = {}
    for fi, (f, r, labels) in enumerate(zip(files, read, raw_labels, strict=True)):
        ids, paths = r.get(id_column or ""), r.get(path_column or "")
        locations = [(fi, ci, j) for ci, n in enumerate(f.chunks) for j in range(n)]
        for k, where in enumerate(locations):
            own = None if ids is None or ids[k] is None else str(ids[k])
            path = None if paths is None else paths[k]
            fallback = f"{f.rel}#{k}"
            rows.setdefault(f.split, []).append((fallback, to_index(labels[k]), where, own, path))
    return class_names, {split: _samples(split_rows_) for split, split_rows_ in rows.items()}


def _samples(rows: list[tuple[str, int, tuple, str | None, str | None]]) -> list[Sample]:
    """Samples with ids: the id column, else the image paths where unique, else FILE#ROW."""
    own = [r[3] for r in rows]
    if None in own or len(set(own)) < len(own):
        own = [r[4] for r in rows]
    if None in own or len(set(own)) < len(own):
        own = [r[0] for r in rows]
    return [Sample(str(i), r[1], r[2]) for i, r in zip(own, rows, strict=True)]


def _classes(feature: Any, raw: list[list[Any]], label: str | None) -> tuple[list[str], Any]:
    """Class names and a value → label function (ClassLabel names, string names, or ints)."""
    if label is None:
        return [], lambda value: -1
    values = {v for part in raw for v in part if v is not None}
    names = feature.get("names") if _feature_type(feature) == "ClassLabel" else None
    if any(isinstance(v, str) for v in values):
        class_names = list(names) if names else sorted(values)
        index = {c: i for i, c in enumerate(class_names)}
        unknown = sorted(values - set(index))
        if unknown:
            raise DataSourceError(
                f"Labels {unknown[:5]} of column '{label}' are not among its class names "
                f"{class_names[:10]}. Fix the labels or the ClassLabel feature."
            )
        return class_names, lambda value: -1 if value is None else index[value]
    top = max(values, default=-1)
    class_names = [str(c) for c in names] if names else [str(i) for i in range(top + 1)]
    if top >= len(class_names):
        raise DataSourceError(
            f"Label {top} of column '{label}' is beyond its {len(class_names)} ClassLabel names. "
            "The data and its features disagree; fix the feature's names or the labels."
        )
    return class_names, lambda value: -1 if value is None or value < 0 else int(value)


def _warn_unlabeled(root: Path, splits: dict[str, list[Sample]], *, labelled: bool) -> None:
    """Log how many rows of a labelled dataset have no label (they are kept, as -1)."""
    if not labelled:
        return
    counts = {s: sum(r.label == -1 for r in rows) for s, rows in splits.items()}
    missing = {s: n for s, n in counts.items() if n}
    if missing:
        listed = ", ".join(f"{s}: {n} of {len(splits[s])}" for s, n in missing.items())
        logger.warning(
            "'%s': rows without a label (null or -1) are kept as unlabeled rows (-1), left out "
            "of probes and scores (%s).",
            root,
            listed,
        )
