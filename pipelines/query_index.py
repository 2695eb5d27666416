"""What a searcher searches: the index, read into memory or (sharded) merged once into on-disk
inverted lists in the local index cache, and the float16 vector copy that ``--rerank`` rescores.

The cache is ``--index-cache`` (default ``$BOB_CACHE_INDEX_CACHE`` or
``~/.cache/bob-cache/indexes``), one folder per index version or vector state, keyed by the
feature set's key: a folder counts only once its merge completed
(:mod:`bob_cache.retrieval.ondisk`), and a recomputed shard gives the vectors a new folder.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from bob_cache.hashing import stable_hash
from bob_cache.retrieval import faiss_ops
from bob_cache.stores import FeatureSet
from bob_cache.stores.index_store import IndexRecord, index_reader

if TYPE_CHECKING:
    from bob_cache.pipelines.query import QueryConfig

log = logging.getLogger(__name__)


def load_index(fs: FeatureSet, record: IndexRecord, config: QueryConfig) -> Any:
    """``record``'s index: read into memory, or for a sharded one, its parts merged once into
    on-disk inverted lists in the local index cache and opened memory-mapped."""
    if record.layout != "sharded":
        return faiss_ops.read_index(index_reader(fs, record))
    from bob_cache.retrieval import ondisk
    from bob_cache.stores.index_parts import iter_parts, read_trained

    folder = index_cache_folder(fs, record.key, config)
    if not ondisk.is_complete(folder, name=record.key):
        log.info("Merging index '%s' of '%s' into %s (once).", record.name, fs.path, folder)
        parts = (blob for _, blob in iter_parts(fs, record))
        ondisk.merge_to_disk(read_trained(fs, record), parts, folder, name=record.key)
    return ondisk.open_on_disk(folder)


def index_cache_folder(fs: FeatureSet, name: str, config: QueryConfig) -> Path:
    """The local cache folder of ``name`` (an index version, or a vector copy) of ``fs``."""
    from bob_cache.retrieval import ondisk

    root = Path(config.index_cache).expanduser() if config.index_cache else None
    return ondisk.cache_folder(f"{fs.key}/{name}", root=root)


def open_reranker(fs: FeatureSet, record: IndexRecord, config: QueryConfig) -> Any:
    """A :class:`~bob_cache.retrieval.rerank.Reranker` over a float16 copy of every row of
    ``fs`` in the local index cache, written once per state of the set (its shard
    generations)."""
    from bob_cache.retrieval import rerank

    state = stable_hash(sorted(fs.generations().items()), length=12)
    folder = index_cache_folder(fs, f"vectors-{state}", config)
    path = folder / rerank.VECTORS_FILE
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        log.info("Writing the float16 vectors of '%s' to %s for --rerank (once).", fs.path, path)
        rerank.write_vector_file(_all_rows(fs), path, n=fs.n_rows, dim=fs.dim)
    return rerank.Reranker(path, metric=record.metric, rows=fs.n_rows)


def _all_rows(fs: FeatureSet) -> Iterator[np.ndarray]:
    """Every row's stored vector in row order, shard by shard (zeros where not committed)."""
    committed = set(fs.committed_shards())
    for shard in range(fs.n_shards):
        start, stop = fs.layout.shard_bounds(shard, fs.n_rows)
        if shard in committed:
            yield np.nan_to_num(np.asarray(fs.features[start:stop], dtype=np.float16))
        else:
            yield np.zeros((stop - start, fs.dim), np.float16)
