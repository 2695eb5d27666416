"""Reading a feature set's rows as search vectors, one shard at a time."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

from bob_cache.retrieval.faiss_ops import prepare
from bob_cache.stores import FeatureSet


def committed_shards(fs: FeatureSet) -> list[int]:
    """Shards whose rows are stored and committed."""
    return fs.committed_shards()


def shard_vectors(
    fs: FeatureSet, shards: Sequence[int], metric: str
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(vectors, row ids)`` of each shard's usable rows (valid and finite), ready to index."""
    for shard in shards:
        start, stop = fs.layout.shard_bounds(shard, fs.n_rows)
        x = fs.features[start:stop]
        usable = fs.array("valid")[start:stop] & np.isfinite(x).all(axis=1)
        rows = np.flatnonzero(usable)
        yield prepare(x[rows], metric), (rows + start).astype(np.int64)


def sample_rows(
    fs: FeatureSet, shards: Sequence[int], n: int, metric: str, *, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Up to ``n`` usable rows of ``shards`` drawn uniformly at random (sorted row numbers).

    Uniform over all rows, not whole shards: datasets are often stored class by class.
    """
    rng = np.random.default_rng(seed)
    bounds = [fs.layout.shard_bounds(shard, fs.n_rows) for shard in shards]
    candidates = np.concatenate([np.arange(a, b) for a, b in bounds] or [np.zeros(0, int)])
    candidates = candidates[fs.array("valid")[:][candidates]]
    rows = np.sort(rng.choice(candidates, size=min(n, len(candidates)), replace=False))
    if not len(rows):
        return np.zeros((0, fs.dim), np.float32), rows.astype(np.int64)
    x = read_rows(fs, rows, metric)
    finite = np.isfinite(x).all(axis=1)
    return x[finite], rows[finite].astype(np.int64)


def read_rows(fs: FeatureSet, rows: np.ndarray, metric: str) -> np.ndarray:
    """Vectors of the given row numbers (any order)."""
    unique, inverse = np.unique(rows, return_inverse=True)
    x = fs.features.get_orthogonal_selection((unique, slice(None)))
    return prepare(np.asarray(x, dtype=np.float32)[inverse], metric)
