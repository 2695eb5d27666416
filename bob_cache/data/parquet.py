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

import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import pyarrow as pa
from PIL import Image

from bob_cache.data.hf_files import (
    DataFile,
    check_split_names,
    discover,
    is_hf_layout,
    split_name,
)
from bob_cache.data.hf_schema import (
    class_names_of,
    is_image_struct,
    pick_image,
    pick_label,
    read_schema,
)
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
_CACHE_SIZE = 2  # row groups (or record batches) of image data kept per process
_cache: OrderedDict[tuple[str, int, str], pa.Array] = OrderedDict()
_cache_lock = threading.Lock()


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
    files, info_features = discover(root)
    check_split_names(files)
    schema, features = read_schema(files, info_features)
    image = pick_image(schema, features, options.get("image"), root)
    label = pick_label(schema, features, options.get("label"), root)
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
    if split_name(root.name) is None:
        return root.stem
    parent = root.parent
    return parent.parent.name if parent.name == "data" else parent.name


def _ordered(rows: dict[str | None, list[Sample]]) -> list[str]:
    order = {"train": 0, "val": 1, "test": 2}
    return sorted((s for s in rows if s is not None), key=lambda s: (order.get(s, 3), s))


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
    path_column = f"{image}.path" if is_image_struct(schema.field(image).type) else None
    wanted = [c for c in (label, id_column, path_column) if c]
    read = [f.values(wanted) if wanted else {} for f in files]
    raw_labels = [r.get(label, [None] * sum(f.chunks)) for f, r in zip(files, read, strict=True)]
    class_names, to_index = class_names_of(
        features.get(label) if label else None, raw_labels, label
    )
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
