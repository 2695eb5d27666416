"""The columns of a Hugging Face dataset: its schema and HF features, which column holds the
images and which the labels, and the class names a label column implies."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from bob_cache.data.hf_files import DataFile, open_arrow
from bob_cache.errors import DataSourceError, did_you_mean


def read_schema(files: list[DataFile], info_features: dict[str, Any]) -> tuple[pa.Schema, dict]:
    """The files' common schema and HF features (schema metadata, else dataset_info.json).

    Raises:
        DataSourceError: two files have different columns (two configs mixed).
    """
    schemas = [open_arrow(f.path).schema if f.arrow else pq.read_schema(f.path) for f in files]
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


def is_image_struct(kind: pa.DataType) -> bool:
    if not pa.types.is_struct(kind):
        return False
    names = {kind.field(i).name: kind.field(i).type for i in range(kind.num_fields)}
    return "bytes" in names and _is_binary(names["bytes"]) and "path" in names


def pick_image(schema: pa.Schema, features: dict, wanted: str | None, root: Path) -> str:
    """The image column: ``wanted``, else the HF Image feature, else the one binary column."""
    columns = ", ".join(schema.names)
    if wanted:
        if wanted not in schema.names:
            raise DataSourceError(
                f"Image column '{wanted}' is not in '{root}'.{did_you_mean(wanted, schema.names)}"
                f" Its columns: {columns}."
            )
        kind = schema.field(wanted).type
        if not (is_image_struct(kind) or _is_binary(kind) or pa.types.is_string(kind)):
            raise DataSourceError(
                f"Column '{wanted}' of '{root}' holds {kind}, not images. An image column holds "
                "encoded bytes, an HF Image {bytes, path} struct, or file paths."
            )
        return wanted
    marked = [n for n in schema.names if _feature_type(features.get(n)) == "Image"]
    marked = marked or [n for n in schema.names if is_image_struct(schema.field(n).type)]
    marked = marked or [n for n in schema.names if _is_binary(schema.field(n).type)]
    if len(marked) == 1:
        return marked[0]
    what = f"several ({', '.join(marked)})" if marked else "none"
    raise DataSourceError(
        f"Cannot tell which column of '{root}' holds the images: {what} of its columns "
        f"({columns}) is an HF Image or binary column. Name it: hf:{root}?image=COLUMN."
    )


def pick_label(schema: pa.Schema, features: dict, wanted: str | None, root: Path) -> str | None:
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


def class_names_of(feature: Any, raw: list[list[Any]], label: str | None) -> tuple[list[str], Any]:
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
