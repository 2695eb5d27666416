"""Exact search over a feature set that has no built index: its committed rows, streamed a
shard at a time into an in-memory flat FAISS index (exact neighbours; 4·D bytes per row)."""

from __future__ import annotations

from typing import Any

from bob_cache.retrieval import faiss_ops
from bob_cache.retrieval.kinds import get_kind
from bob_cache.retrieval.vectors import committed_shards, shard_vectors
from bob_cache.stores import FeatureSet

EXACT_METRIC = "cosine"  # the default of `bob-cache index build`


def exact_index(fs: FeatureSet, metric: str = EXACT_METRIC) -> tuple[Any, list[int]]:
    """A flat index of ``fs``'s usable committed rows (FAISS ids = row numbers), and the
    shards it covers."""
    shards = committed_shards(fs)
    index = faiss_ops.create_index(get_kind("flat"), fs.dim, metric, {})
    for x, rows in shard_vectors(fs, shards, metric):
        if len(rows):
            index.add_with_ids(x, rows)
    return index, shards
