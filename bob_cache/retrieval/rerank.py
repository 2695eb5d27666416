"""Exact re-ranking of an approximate index's top candidates from the stored float16 vectors.

A compressed index (IVF-PQ, IVF-SQ) ranks by approximate distances, so its recall is capped by
its code size however many lists it probes. Asking it for ``K ≥ k`` candidates and rescoring
them exactly lifts that cap at the cost of reading ``K`` vectors per query. Those reads need
fast random row access: the store's chunks are compressed and hold many rows each, so the
vectors are first copied once (:func:`write_vector_file`) into a plain float16 ``.npy`` beside
the merged index in the local cache, which :class:`Reranker` maps read-only.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from bob_cache.errors import FeatureOverflowError, QueryError, StoreError
from bob_cache.retrieval.faiss_ops import prepare
from bob_cache.retrieval.kinds import parse_metric
from bob_cache.retrieval.warm import Region
from bob_cache.stores.atomic import crash_point, full_disk_is_reported, temporary_name

VECTORS_FILE = "vectors.npy"
_SLICE = 64  # queries rescored together (bounds their gathered rows at 64·K·D floats)
TORCH_GRAIN = 32_000  # elements: below at::internal::GRAIN_SIZE (32,768), copies stay serial


class VectorFileError(StoreError, ValueError):
    """A re-ranking vector file that is missing, malformed or does not fit its index."""


@full_disk_is_reported("the re-ranking vector file", "run the same command again")
def write_vector_file(blocks: Iterable[np.ndarray], path: Path, *, n: int, dim: int) -> Path:
    """Write the ``(n, dim)`` rows given as consecutive ``blocks`` to a float16 ``.npy``.

    Written under a temporary name (its disk space reserved first, so a full disk is an
    error, not a crash in the memory map) and renamed into place: ``path`` exists only whole.

    Raises:
        VectorFileError: blocks of another width, or not ``n`` rows in all.
        FeatureOverflowError: values beyond float16's range.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=(n, dim))
        with open(tmp, "r+b") as handle:
            os.posix_fallocate(handle.fileno(), 0, os.fstat(handle.fileno()).st_size)
        written = _fill(out, blocks, n=n, dim=dim)
        if written != n:
            raise VectorFileError(
                f"The vector blocks held {written} rows, expected {n}. Pass every stored row "
                "in order (invalid rows too: rows are addressed by their row number)."
            )
        out.flush()
        del out
        with open(tmp, "r+b") as handle:
            os.fsync(handle.fileno())
        crash_point("rerank-vectors")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def _fill(out: np.ndarray, blocks: Iterable[np.ndarray], *, n: int, dim: int) -> int:
    """Copy ``blocks`` into ``out`` row after row; the number of rows given."""
    start = 0
    for block in blocks:
        block = np.asarray(block)
        if block.ndim != 2 or block.shape[1] != dim:
            raise VectorFileError(
                f"A vector block has shape {block.shape}, expected (rows, {dim}). Pass the "
                "feature set's rows as 2-D blocks."
            )
        if start + len(block) > n:
            return start + len(block)
        with np.errstate(over="ignore"):
            half = block.astype(np.float16)
        overflow = np.isinf(half) & np.isfinite(block)
        if overflow.any():
            raise FeatureOverflowError(
                f"Rows {start}..{start + len(block)} hold values beyond float16's range "
                f"(max |x| {np.abs(block[np.isfinite(block)]).max():.3g}). Store them as "
                "float32 or scale them."
            )
        out[start : start + len(block)] = half
        start += len(block)
    return start


class Reranker:
    """Exact rescoring of candidate rows from a float16 vector file, memory-mapped.

    Scores follow the index's: inner product of L2-normalized vectors for ``cosine`` (higher
    first), squared L2 distance for ``l2`` (lower first), both on the stored float16 values
    cast to float32, as :func:`bob_cache.retrieval.faiss_ops.prepare` gives the index.
    """

    def __init__(self, path: Path, *, metric: str, rows: int | None = None) -> None:
        """Map ``path`` read-only; ``rows``, when given, is the row count it must have."""
        self.path, self.metric = Path(path), parse_metric(metric)
        fix = "Delete it and rerun the command that writes it (e.g. `bob-cache query --rerank`)"
        try:
            self.vectors = np.load(self.path, mmap_mode="r")
        except (OSError, ValueError) as exc:
            raise VectorFileError(
                f"Cannot read vector file '{self.path}' ({exc}). {fix}."
            ) from None
        if self.vectors.dtype != np.float16 or self.vectors.ndim != 2:
            raise VectorFileError(
                f"'{self.path}' holds {self.vectors.dtype} of shape {self.vectors.shape}, "
                f"expected float16 rows. {fix}."
            )
        self._rows = np.asarray(self.vectors)  # ndarray view: take() skips memmap's wrapper
        _float32(np.zeros((1, 1), np.float16))  # torch loaded at open, not on the first query
        if rows is not None and len(self.vectors) != rows:
            raise VectorFileError(
                f"'{self.path}' holds {len(self.vectors)} rows, its feature set {rows}. {fix}."
            )

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def mapped(self) -> Region:
        """The mapped rows, for :class:`~bob_cache.retrieval.warm.Warmer`."""
        return Region(str(self.path), self._rows.ctypes.data, self._rows.nbytes, owner=self)

    def rerank(
        self, queries: np.ndarray, candidates: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """The best ``k`` of each query's ``candidates`` (row numbers, ``-1`` for none) by exact
        score: ``(scores, ids)`` of shape ``(nq, k)``, padded with ``-1`` ids and ``∓inf``."""
        x = prepare(queries, self.metric)
        candidates = np.asarray(candidates, dtype=np.int64)
        if x.ndim != 2 or x.shape[1] != self.dim or candidates.shape[:1] != x.shape[:1]:
            raise QueryError(
                f"Re-ranking needs queries of shape (nq, {self.dim}) and candidates of shape "
                f"(nq, K); got {x.shape} and {candidates.shape}."
            )
        if candidates.size and candidates.max() >= len(self.vectors):
            raise VectorFileError(
                f"Candidate row {candidates.max()} is past the end of '{self.path}' "
                f"({len(self.vectors)} rows): the index covers rows the vector file lacks. "
                "Delete the vector file and rerun to write it again."
            )
        parts = [
            self._rerank_slice(x[i : i + _SLICE], candidates[i : i + _SLICE], k)
            for i in range(0, len(x), _SLICE)
        ]
        if not parts:
            return np.zeros((0, k), np.float32), np.zeros((0, k), np.int64)
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _rerank_slice(
        self, x: np.ndarray, candidates: np.ndarray, k: int
    ) -> tuple[np.ndarray, np.ndarray]:
        valid = candidates >= 0
        unique, inverse = np.unique(candidates[valid], return_inverse=True)
        rows = _float32(self._rows.take(unique, axis=0))  # one sorted gather per slice
        row_of = np.zeros(candidates.shape, np.int64)
        row_of[valid] = inverse
        dots = np.zeros(candidates.shape, np.float32)
        squares = np.zeros(candidates.shape, np.float32)
        if len(rows):
            for i, (query, at) in enumerate(zip(x, row_of, strict=True)):
                dots[i] = rows[at] @ query  # this query's K rows only, not the slice's
            squares = np.einsum("ud,ud->u", rows, rows)[row_of]
        keep_max = self.metric == "cosine"
        if keep_max:  # the stored rows normalized as prepare() does, after the product
            scores = dots / np.maximum(np.sqrt(squares), 1e-12)
        else:  # squared L2 = |v|² − 2 v·q + |q|²
            scores = squares - 2 * dots + (x * x).sum(axis=1)[:, None]
        worst = -np.inf if keep_max else np.inf
        scores = np.where(valid, scores, worst).astype(np.float32)
        order = np.argsort(-scores if keep_max else scores, axis=1, kind="stable")[:, :k]
        top_scores = np.take_along_axis(scores, order, 1)
        top_ids = np.where(np.isinf(top_scores), -1, np.take_along_axis(candidates, order, 1))
        if order.shape[1] == k:
            return np.ascontiguousarray(top_scores), np.ascontiguousarray(top_ids)
        pad = ((0, 0), (0, k - order.shape[1]))
        return (
            np.ascontiguousarray(np.pad(top_scores, pad, constant_values=worst)),
            np.ascontiguousarray(np.pad(top_ids, pad, constant_values=-1)),
        )

    def search(
        self, index: Any, queries: np.ndarray, *, k: int, candidates: int
    ) -> tuple[np.ndarray, np.ndarray]:
        """``index``'s top ``candidates`` for each query, re-ranked exactly to the best ``k``.

        Raises:
            QueryError: ``candidates`` smaller than ``k``.
        """
        check_rerank(candidates, k)
        from bob_cache.retrieval import faiss_ops

        x = prepare(queries, self.metric)
        _, found = faiss_ops.search(index, x, candidates)
        return self.rerank(x, found, k)


def _float32(half: np.ndarray) -> np.ndarray:
    """``half`` (float16 rows) as float32, converted by torch on this thread alone.

    numpy converts float16 element by element: 0.63 ms for 500 × 768 rows, 40 % of a
    batch-1 ``--rerank 500`` query at 10M rows; torch's vectorized copy takes 0.09 ms. One
    torch copy of that size opens an OpenMP parallel region, though, and when another process
    holds the second core (a client, a build) the region waits for it: 3.3 ms a call. Copies
    below :data:`TORCH_GRAIN` elements run on the calling thread, so the rows go over in
    slices of that size (0.13 ms for the 500 rows with both cores busy).
    """
    import torch

    source = torch.from_numpy(np.ascontiguousarray(half))
    out = torch.empty(source.shape, dtype=torch.float32)
    step = max(1, TORCH_GRAIN // max(1, half.shape[-1]))
    for i in range(0, len(source), step):
        out[i : i + step] = source[i : i + step]
    return out.numpy()


def check_rerank(candidates: int | None, k: int) -> None:
    """Refuse ``--rerank K`` below ``k`` (re-ranking cannot return more than it rescored)."""
    if candidates is not None and candidates < k:
        raise QueryError(
            f"--rerank {candidates} is smaller than k={k}: re-ranking rescores the index's top "
            f"K candidates and returns the best k of them. Pass --rerank {max(k, 4 * k)} (or "
            "more), or drop --rerank."
        )
