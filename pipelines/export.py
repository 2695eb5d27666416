"""The export stage: a feature set as the embedding files that autofaiss and clip-retrieval read.

``npy`` writes embedding_reader's numpy layout, clip-retrieval's output folder:
``OUT/img_emb/img_emb_0000.npy`` (rows × dim) with ``OUT/metadata/metadata_0000.parquet`` beside
each (same rows, same order: ``id``, ``label``, ``row``). ``parquet`` writes
``OUT/emb/emb_0000.parquet`` with those columns and an ``embedding`` list column. Only usable
rows are written (valid, finite), in row order; ``row`` is the row's number in the feature set,
so results map back to the store. Files hold at most ``rows_per_file`` rows; memory holds one
store shard at a time (an ``.npy`` is filled in place through a memory map).

Every file is written under a temporary name and renamed into place; ``export.json`` (the
feature set's key and shard generations, the files and their rows) is written last, so a
folder without it is unfinished and the same command writes it again. A folder whose
``export.json`` matches the set as it is now is left alone.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from bob_cache.errors import SpecError, StoreError
from bob_cache.hashing import stable_hash
from bob_cache.pipelines.registry import register_stage
from bob_cache.pipelines.selection import select_feature_sets
from bob_cache.progress import progress_bar
from bob_cache.provenance import utc_now
from bob_cache.stores import FeatureSet, open_store
from bob_cache.stores.atomic import atomic_write, crash_point, remove_temporaries, write_text

FORMATS = ("npy", "parquet")
DTYPES = ("float16", "float32")
MANIFEST = "export.json"
_FOLDERS = {"npy": ("img_emb", "metadata"), "parquet": ("emb",)}


@dataclass
class ExportConfig:
    """Options of ``bob-cache export``."""

    store: str
    dataset: str
    backbone: str
    out: str
    feature: str | None = None
    split: str = "train"
    format: str = "npy"
    dtype: str | None = None  # None: float16 for npy, float32 for parquet
    rows_per_file: int = 1_000_000
    quiet: bool = False
    storage_options: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.format not in FORMATS:
            raise SpecError(f"--format must be one of {', '.join(FORMATS)}, got '{self.format}'.")
        if self.dtype is not None and self.dtype not in DTYPES:
            raise SpecError(f"--dtype must be one of {', '.join(DTYPES)}, got '{self.dtype}'.")
        if self.rows_per_file < 1:
            raise SpecError(f"--rows-per-file must be at least 1, got {self.rows_per_file}.")

    @property
    def out_dtype(self) -> str:
        return self.dtype or ("float16" if self.format == "npy" else "float32")


@dataclass
class ExportSummary:
    """What the stage wrote."""

    out: str
    group: str
    action: str  # written | up-to-date
    format: str
    dtype: str
    rows: int = 0
    dim: int = 0
    files: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@register_stage("export")
def export(config: ExportConfig) -> ExportSummary:
    """Write ``config``'s feature set as embedding files (see the module docstring)."""
    store = open_store(config.store, storage_options=config.storage_options or None)
    fs = select_feature_sets(
        store, dataset=config.dataset, backbone=config.backbone, feature=config.feature,
        splits=(config.split,),
    )[config.split]  # fmt: skip
    if fs.is_dense:
        raise SpecError(f"Feature set {fs.path} holds dense grids; export takes pooled vectors.")
    if fs.missing_shards():
        raise StoreError(
            f"Feature set {fs.path} is incomplete ({len(fs.missing_shards())} shard(s) "
            "missing). Finish it with the same `bob-cache extract` command, then export."
        )
    out = Path(config.out).expanduser()
    ident = _identity(fs, config)
    summary = ExportSummary(str(out), fs.path, "up-to-date", config.format, config.out_dtype)
    summary.dim = fs.dim
    done = _read_manifest(out)
    if done is not None and done.get("identity") == stable_hash(ident, length=16):
        summary.files, summary.rows = done["files"], done["rows"]
        return summary
    started = time.perf_counter()
    _clear(out, config.format)
    summary.action = "written"
    summary.files = _write_files(fs, out, config)
    summary.rows = sum(f["rows"] for f in summary.files)
    manifest = {
        "identity": stable_hash(ident, length=16), **ident, "files": summary.files,
        "rows": summary.rows, "dim": fs.dim, "created": utc_now(),
    }  # fmt: skip
    crash_point("export:before-manifest")
    write_text(out / MANIFEST, json.dumps(manifest, indent=2) + "\n")
    summary.seconds = time.perf_counter() - started
    return summary


def _identity(fs: FeatureSet, config: ExportConfig) -> dict[str, Any]:
    """What the files depend on: the set (key, shard generations) and the export's options."""
    return {
        "feature_key": fs.key, "group": fs.path,
        "generations": {str(k): v for k, v in fs.generations().items()},
        "format": config.format, "dtype": config.out_dtype, "rows_per_file": config.rows_per_file,
    }  # fmt: skip


def _read_manifest(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _clear(out: Path, fmt: str) -> None:
    """Remove an earlier export's files (only the names an export writes) and temporaries."""
    (out / MANIFEST).unlink(missing_ok=True)
    for folder in {name for names in _FOLDERS.values() for name in names}:
        path = out / folder
        if path.is_dir():
            remove_temporaries(path)
            for old in list(path.glob(f"{folder}_*.npy")) + list(path.glob(f"{folder}_*.parquet")):
                old.unlink()
    for folder in _FOLDERS[fmt]:
        (out / folder).mkdir(parents=True, exist_ok=True)


def _file_groups(fs: FeatureSet, usable: np.ndarray, rows_per_file: int) -> list[list[int]]:
    """Consecutive shards per file, each file at most ``rows_per_file`` usable rows (a shard
    with more rows than that gets a file of its own)."""
    groups: list[list[int]] = [[]]
    count = 0
    for shard in range(fs.n_shards):
        start, stop = fs.layout.shard_bounds(shard, fs.n_rows)
        n = int(usable[start:stop].sum())
        if groups[-1] and count + n > rows_per_file:
            groups.append([])
            count = 0
        groups[-1].append(shard)
        count += n
    return [g for g in groups if g]


def _usable(fs: FeatureSet) -> np.ndarray:
    """Rows to export: valid, and finite (read shard by shard)."""
    usable = np.asarray(fs.array("valid")[:], dtype=bool)
    for shard in range(fs.n_shards):
        start, stop = fs.layout.shard_bounds(shard, fs.n_rows)
        if usable[start:stop].any():
            usable[start:stop] &= np.isfinite(fs.features[start:stop]).all(axis=1)
    return usable


def _write_files(fs: FeatureSet, out: Path, config: ExportConfig) -> list[dict[str, Any]]:
    usable = _usable(fs)
    ids = np.asarray(fs.array("ids")[:], dtype=object)
    labels = np.asarray(fs.array("labels")[:])
    files = []
    groups = _file_groups(fs, usable, config.rows_per_file)
    with progress_bar(int(usable.sum()), desc=f"export {fs.path}", quiet=config.quiet) as bar:
        for i, shards in enumerate(groups):
            rows = np.concatenate([_shard_rows(fs, s, usable) for s in shards])
            meta = {"id": ids[rows], "label": labels[rows], "row": rows.astype(np.int64)}
            write = _write_npy if config.format == "npy" else _write_parquet
            name = write(fs, out, i, shards, usable, meta, config.out_dtype)
            files.append({"name": name, "rows": len(rows)})
            bar.update(len(rows))
            crash_point("export:file-written")
    return files


def _shard_rows(fs: FeatureSet, shard: int, usable: np.ndarray) -> np.ndarray:
    start, stop = fs.layout.shard_bounds(shard, fs.n_rows)
    return np.flatnonzero(usable[start:stop]) + start


def _vectors(fs: FeatureSet, shards: list[int], usable: np.ndarray, dtype: str) -> Any:
    """``(shard rows, vectors)`` of each shard in turn (one shard in memory at a time)."""
    for shard in shards:
        start, stop = fs.layout.shard_bounds(shard, fs.n_rows)
        keep = usable[start:stop]
        yield np.asarray(fs.features[start:stop])[keep].astype(dtype, copy=False)


def _metadata_table(meta: dict[str, np.ndarray]) -> Any:
    import pyarrow as pa

    label = meta["label"]
    labels = pa.array(list(label)) if label.ndim > 1 else pa.array(label.astype(np.int64))
    return pa.table({"id": pa.array(meta["id"]), "label": labels, "row": pa.array(meta["row"])})


def _write_npy(
    fs: FeatureSet, out: Path, i: int, shards: list[int], usable: np.ndarray,
    meta: dict[str, np.ndarray], dtype: str,
) -> str:  # fmt: skip
    import pyarrow.parquet as pq

    name = f"img_emb_{i:04d}.npy"

    def fill(path: Path) -> None:
        array = np.lib.format.open_memmap(
            path, mode="w+", dtype=dtype, shape=(len(meta["row"]), fs.dim)
        )
        at = 0
        for block in _vectors(fs, shards, usable, dtype):
            array[at : at + len(block)] = block
            at += len(block)
        array.flush()
        del array

    atomic_write(out / "img_emb" / name, fill)
    table = _metadata_table(meta)
    atomic_write(out / "metadata" / f"metadata_{i:04d}.parquet", lambda p: pq.write_table(table, p))
    return name


def _write_parquet(
    fs: FeatureSet, out: Path, i: int, shards: list[int], usable: np.ndarray,
    meta: dict[str, np.ndarray], dtype: str,
) -> str:  # fmt: skip
    import pyarrow as pa
    import pyarrow.parquet as pq

    name = f"emb_{i:04d}.parquet"
    table = _metadata_table(meta)
    value_type = pa.float16() if dtype == "float16" else pa.float32()
    schema = table.schema.append(pa.field("embedding", pa.list_(value_type, fs.dim)))

    def fill(path: Path) -> None:
        with pq.ParquetWriter(path, schema) as writer:
            at = 0
            for block in _vectors(fs, shards, usable, dtype):
                flat = pa.array(block.reshape(-1), type=value_type)
                column = pa.FixedSizeListArray.from_arrays(flat, fs.dim)
                part = table.slice(at, len(block)).append_column("embedding", column)
                writer.write_table(part)
                at += len(block)

    atomic_write(out / "emb" / name, fill)
    return name
