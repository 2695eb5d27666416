"""CSV and JSON-lines manifests with ``path,label[,split][,id]`` columns.

Relative paths resolve against the manifest's folder. Labels may be class names (mapped to
sorted indices) or integers (kept); an empty label means unlabeled (-1). A multi-label set
(CheXpert-style) has one ``label:<name>`` column per label instead, holding 1, 0, or -1/empty
for unknown; its labels are stored as an N × L matrix. Without a ``split``
column the rows are split into train/val/test by id hash, stratified by label
(:mod:`bob_cache.data.splits`); a manifest without any label stays whole, ``train`` unless
``--split`` names another.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd

from bob_cache.data.folder import FolderSource
from bob_cache.data.source import AS_DISTRIBUTED, Sample, default_name, register_source
from bob_cache.data.splits import SplitFractions, split_rows
from bob_cache.errors import DataNotFoundError, ManifestError

REQUIRED = ("path", "label")
MULTI_PREFIX = "label:"
_SUFFIXES = (".csv", ".jsonl")


class ManifestSource(FolderSource):
    """Files listed by a manifest (decoded and fingerprinted like a folder)."""

    kind = "manifest"


def _is_manifest(spec: str) -> bool:
    return spec.lower().endswith(_SUFFIXES)


@register_source(
    "manifest",
    _is_manifest,
    syntax="FILE.csv | FILE.jsonl",
    layout="Columns path,label[,split][,id] (or one label:<name> column per label of a "
    "multi-label set); relative paths resolve against the manifest's folder.",
    example="data/photos.csv",
)
def load_manifest(
    spec: str,
    *,
    name: str | None = None,
    split: str = "all",
    fractions: SplitFractions | None = None,
) -> ManifestSource:
    """Read and validate a manifest; every listed file must exist."""
    path = Path(spec).expanduser()
    if not path.is_file():
        raise DataNotFoundError(
            f"Manifest '{spec}' does not exist. Check the path passed to --data."
        )
    table = _read(path)
    multi = [c for c in map(str, table.columns) if c.startswith(MULTI_PREFIX)]
    missing_cols = [c for c in REQUIRED if c not in table.columns and not (c == "label" and multi)]
    if missing_cols:
        raise ManifestError(
            f"Manifest '{spec}' lacks column(s) {', '.join(missing_cols)}; it has "
            f"{', '.join(map(str, table.columns)) or 'none'}. Expected path,label[,split][,id] "
            "(label may be empty for unlabeled images), or one 'label:<name>' column per label "
            "of a multi-label set (1, 0, or -1/empty for unknown)."
        )
    if table.empty:
        raise ManifestError(f"Manifest '{spec}' has no rows. Add one row per image.")
    base = path.resolve().parent
    files = [str(base / p) if not os.path.isabs(p) else p for p in table["path"].astype(str)]
    absent = [f for f in files if not os.path.isfile(f)]
    if absent:
        raise ManifestError(
            f"{len(absent)} of {len(files)} files listed in '{spec}' do not exist, e.g. "
            f"{', '.join(absent[:3])}. Relative paths resolve against the manifest's folder "
            f"({base}); fix the paths or move the manifest."
        )
    labels, class_names = (
        _multilabels(table, multi, spec)
        if "label" not in table.columns
        else _labels(table["label"], spec)
    )
    ids = (
        table["id"].astype(str).tolist()
        if "id" in table.columns
        else table["path"].astype(str).tolist()
    )
    duplicated = pd.Series(ids)[pd.Series(ids).duplicated()].tolist()
    if duplicated:
        raise ManifestError(
            f"Manifest '{spec}' repeats ids, e.g. {', '.join(duplicated[:3])}. Each row needs a "
            "unique id (or path, when there is no id column)."
        )
    samples = [Sample(*row) for row in zip(ids, labels, files, strict=True)]
    if "split" in table.columns:
        splits, rule = _split_column(table["split"], samples, spec), AS_DISTRIBUTED
    else:
        splits, rule = split_rows(samples, split=split, fractions=fractions)
    return ManifestSource(
        name=name or default_name(path.stem),
        origin=str(path.resolve()),
        splits=splits,
        class_names=class_names,
        split_rule=rule,
    )


def _split_column(column: pd.Series, samples: list[Sample], spec: str) -> dict[str, list[Sample]]:
    """The rows of each split the manifest names; an empty split cell is an error."""
    names = column.fillna("").astype(str).tolist()
    splits: dict[str, list[Sample]] = {}
    for i, (row_split, sample) in enumerate(zip(names, samples, strict=True)):
        if not row_split:
            raise ManifestError(
                f"Row {i + 2} of '{spec}' has an empty split. Fill in train, val or test "
                "(or drop the split column to have the rows split by id hash)."
            )
        splits.setdefault(row_split, []).append(sample)
    return splits


def _read(path: Path) -> pd.DataFrame:
    try:
        if path.suffix.lower() == ".csv":
            return pd.read_csv(path, dtype=str, keep_default_na=False)
        return pd.read_json(path, lines=True, dtype=False)
    except (ValueError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ManifestError(
            f"Cannot parse manifest '{path}' ({str(exc).splitlines()[0]}). Expected a CSV with a "
            "header row, or one JSON object per line."
        ) from exc


def _multilabels(table: pd.DataFrame, columns: list[str], spec: str) -> tuple[list, list[str]]:
    """CheXpert-style columns: 1 positive, 0 negative, -1 or empty unknown."""
    values = (
        table[columns]
        .astype(str)
        .apply(lambda col: col.str.strip())
        .replace({"": "-1", "nan": "-1"})
    )
    try:
        matrix = values.astype(float).astype(int).to_numpy()
    except ValueError as exc:
        raise ManifestError(
            f"Multi-label columns of '{spec}' must hold 1, 0, -1 or nothing ({exc})."
        ) from exc
    if not np.isin(matrix, (-1, 0, 1)).all():
        raise ManifestError(f"Multi-label columns of '{spec}' must hold 1, 0, -1 or nothing.")
    return [tuple(int(v) for v in row) for row in matrix], [c[len(MULTI_PREFIX) :] for c in columns]


def _labels(column: pd.Series, spec: str) -> tuple[list[int], list[str]]:
    text = column.map(lambda v: "" if v is None or (isinstance(v, float) and v != v) else str(v))
    named = sorted({t for t in text if t})
    if all(t.lstrip("-").isdigit() for t in named):
        values = [int(t) if t else -1 for t in text]
        if any(v < -1 for v in values):
            raise ManifestError(
                f"Manifest '{spec}' has negative labels; use -1 or empty for unlabeled."
            )
        top = max(values, default=-1)
        return values, [str(i) for i in range(top + 1)]
    index = {c: i for i, c in enumerate(named)}
    return [index[t] if t else -1 for t in text], named
