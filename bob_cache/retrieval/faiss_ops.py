"""FAISS operations every index kind shares: vectors in, index built, searched and tuned.

``faiss`` is imported inside the functions: it is heavy and only retrieval stages need it.
"""

from __future__ import annotations

import logging
import time
import weakref
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from bob_cache.extras import import_faiss
from bob_cache.retrieval import coarse
from bob_cache.retrieval.kinds import IndexKind

logger = logging.getLogger(__name__)


def prepare(vectors: np.ndarray, metric: str) -> np.ndarray:
    """float32, C-contiguous, L2-normalized for cosine (so inner product is cosine)."""
    x = np.ascontiguousarray(vectors, dtype=np.float32)
    if metric == "cosine":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    return x


def faiss_metric(metric: str) -> int:
    faiss = import_faiss()

    return faiss.METRIC_INNER_PRODUCT if metric == "cosine" else faiss.METRIC_L2


def create_index(kind: IndexKind, dim: int, metric: str, params: dict[str, Any]) -> Any:
    """An empty (untrained) FAISS index of ``kind``."""
    faiss = import_faiss()

    index = faiss.index_factory(dim, kind.factory(params), faiss_metric(metric))
    if "efConstruction" in params:
        faiss.downcast_index(faiss.downcast_index(index).index).hnsw.efConstruction = params[
            "efConstruction"
        ]
    return index


#: FAISS's k-means wants this many training rows per centroid (``min_points_per_centroid``).
ROWS_PER_CENTROID = 39


def train(index: Any, x: np.ndarray) -> list[str]:
    """Train ``index`` on ``x``; a sample below FAISS's 39 rows per centroid (the IVF lists, the
    256 codes of each PQ sub-quantizer) gives one note naming the figures (logged, and
    returned), instead of the warning FAISS prints to stderr once per k-means (64 times for
    64-byte codes)."""
    faiss = import_faiss()

    wanted, what = 0, []
    ivf = faiss.try_extract_index_ivf(index)
    if ivf is not None:
        ivf = faiss.downcast_index(ivf)  # IndexIVFPQ, not IndexIVF
        ivf.cp.min_points_per_centroid = 1
        wanted, what = ROWS_PER_CENTROID * ivf.nlist, [f"{ivf.nlist} lists"]
        pq = getattr(ivf, "pq", None)
        if pq is not None:
            pq.cp.min_points_per_centroid = 1
            wanted = max(wanted, ROWS_PER_CENTROID * pq.ksub)
            what.append(f"{pq.ksub} codes per PQ sub-quantizer")
    index.train(x)
    if len(x) >= wanted:
        return []
    note = (
        f"Trained on {len(x):,} rows; FAISS's k-means wants {wanted:,} for this index "
        f"({' and '.join(what)}, {ROWS_PER_CENTROID} rows each), so its codes are coarser "
        "than a larger set would give (the recall measured below says by how much). For a "
        "set this small, --kind auto, flat or hnsw needs no training."
    )
    logger.warning("%s", note)
    return [note]


def gpu_available() -> bool:
    faiss = import_faiss()

    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def to_gpu(index: Any) -> Any:
    """A GPU copy of ``index`` (faiss-gpu); the caller checked :func:`gpu_available`."""
    import faiss

    return faiss.index_cpu_to_gpu(faiss.StandardGpuResources(), 0, index)


def to_cpu(index: Any) -> Any:
    import faiss

    return faiss.index_gpu_to_cpu(index) if "Gpu" in type(index).__name__ else index


def set_search_param(index: Any, kind: IndexKind, value: int | None) -> None:
    """Set the kind's speed/recall knob (``nprobe``, ``efSearch``) on ``index``."""
    if kind.search_param is None or value is None:
        return
    import faiss

    if "Gpu" in type(index).__name__:
        faiss.GpuParameterSpace().set_index_parameter(index, kind.search_param, value)
    else:
        faiss.ParameterSpace().set_index_parameter(index, kind.search_param, value)
        coarse.follow(index)  # a graph over the centroids searches as wide as nprobe asks


# Exact search of at most this many queries goes through BLAS matrix-vector products: FAISS
# scans for one query on one thread at ~40% of memory bandwidth (1M × 768: 3.0 q/s, where a
# multithreaded sgemv over the same vectors reaches 7.3 q/s on 2 cores).
BLAS_SCAN_MAX_QUERIES = 4
BLAS_SCAN_MIN_ROWS = 100_000
_SQ_NORMS: weakref.WeakKeyDictionary[Any, np.ndarray] = weakref.WeakKeyDictionary()
_IO_BLOCK = 16 * 2**20


def search(index: Any, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """``index.search(x, k)``, with two shortcuts that give the same neighbours.

    An ``IDMap``/``IDMap2`` wrapper is searched through: the inner index answers and the ids
    are mapped in numpy. FAISS's wrapper maps them in an OpenMP parallel loop on every call,
    which wakes every OpenMP thread for a lone query; on a machine where another process
    holds a core, that cost 40× in batch-1 queries/s (BENCHMARKS.md, issue 10). A few queries
    on a large exact CPU index are answered by a BLAS scan of its vectors (scores equal to
    float rounding).
    """
    import faiss

    if not isinstance(index, faiss.IndexIDMap):
        return index.search(x, k)
    flat = _flat_of(index)
    if flat is None or len(x) > BLAS_SCAN_MAX_QUERIES or flat.ntotal < BLAS_SCAN_MIN_ROWS:
        inner, ids = _unwrapped(index)
        scores, rows = inner.search(x, k)
        if ids is None:
            return scores, rows
        found = ids[rows]
        found[rows < 0] = -1
        return scores, found
    n, d = flat.ntotal, flat.d
    vectors = faiss.rev_swig_ptr(flat.get_xb(), n * d).reshape(n, d)
    ids = faiss.rev_swig_ptr(index.id_map.data(), n)
    keep_max = index.metric_type == faiss.METRIC_INNER_PRODUCT
    scores = vectors @ x.T  # (n, nq)
    if not keep_max:  # squared L2 = |v|² − 2 v·q + |q|²; the stored norms are kept per index
        norms = _SQ_NORMS.get(index)
        if norms is None or len(norms) != n:
            norms = _SQ_NORMS[index] = np.einsum("ij,ij->i", vectors, vectors)
        scores = norms[:, None] - 2 * scores + (x * x).sum(axis=1)[None, :]
    order = (-scores if keep_max else scores).T  # (nq, n), best first when sorted ascending
    kk = min(k, n)
    top = np.argpartition(order, kk - 1, axis=1)[:, :kk]
    top = np.take_along_axis(top, np.argsort(np.take_along_axis(order, top, 1), 1), 1)
    top_scores = np.take_along_axis(scores.T, top, 1).astype(np.float32)
    return _padded(top_scores, ids[top], k, keep_max)


_INNER: weakref.WeakKeyDictionary[Any, Any] = weakref.WeakKeyDictionary()


def _unwrapped(index: Any) -> tuple[Any, np.ndarray | None]:
    """The index inside an ``IDMap`` wrapper (its downcast cached: it costs as much as a small
    search) and a fresh view of its ids (None when empty)."""
    import faiss

    inner = _INNER.get(index)
    if inner is None:
        inner = _INNER[index] = faiss.downcast_index(index.index)
    n = index.ntotal
    return inner, (faiss.rev_swig_ptr(index.id_map.data(), n) if n else None)


def _padded(
    scores: np.ndarray, rows: np.ndarray, k: int, keep_max: bool
) -> tuple[np.ndarray, np.ndarray]:
    """``(scores, rows)`` widened to ``k`` columns with empty results, C-contiguous."""
    pad = ((0, 0), (0, k - scores.shape[1]))
    scores = np.pad(scores, pad, constant_values=-np.inf if keep_max else np.inf)
    return np.ascontiguousarray(scores), np.ascontiguousarray(np.pad(rows, pad, constant_values=-1))


def _flat_of(index: Any) -> Any:
    """The ``IndexFlat`` under an ``IDMap2,Flat`` CPU index (None for any other index)."""
    import faiss

    if not isinstance(index, faiss.IndexIDMap):
        return None
    inner = faiss.downcast_index(index.index)
    return inner if type(inner) in (faiss.IndexFlat, faiss.IndexFlatIP, faiss.IndexFlatL2) else None


def write_index(index: Any, sink: Callable[[bytes], int]) -> None:
    """Serialize ``index`` (a GPU one via its CPU copy) into ``sink`` in blocks."""
    import faiss

    faiss.write_index(to_cpu(index), faiss.PyCallbackIOWriter(sink, _IO_BLOCK))


def read_index(source: Callable[[int], bytes], flags: int = 0) -> Any:
    """An index read from ``source(n) → bytes`` in blocks (``flags``: FAISS's ``IO_FLAG_*``)."""
    faiss = import_faiss()

    return faiss.read_index(faiss.PyCallbackIOReader(source, _IO_BLOCK), flags)


def exact_neighbours(
    queries: np.ndarray, chunks: Iterable[tuple[np.ndarray, np.ndarray]], k: int, metric: str
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` (scores, ids) of ``queries`` over ``(vectors, ids)`` chunks, streamed."""
    faiss = import_faiss()

    keep_max = metric == "cosine"
    heap = faiss.ResultHeap(len(queries), k, keep_max=keep_max)
    for vectors, ids in chunks:
        if not len(vectors):
            continue
        kk = min(k, len(vectors))
        scores, rows = faiss.knn(queries, vectors, kk, metric=faiss_metric(metric))
        found = np.where(rows >= 0, ids[np.clip(rows, 0, None)], -1)
        heap.add_result(*_padded(scores, found, k, keep_max))
    heap.finalize()
    return heap.D, heap.I


def recall_at_k(found: np.ndarray, truth: np.ndarray, k: int) -> float:
    """Mean share of each query's true top-``k`` ids that ``found`` returned in its top ``k``."""
    return candidate_recall(found, truth, k, k)


def candidate_recall(found: np.ndarray, truth: np.ndarray, k: int, depth: int) -> float:
    """Mean share of each query's true top-``k`` ids among ``found``'s top ``depth``: the
    recall@k an exact re-ranking of those ``depth`` candidates reaches."""
    hits = [
        len(set(f[:depth][f[:depth] >= 0].tolist()) & set(t[:k][t[:k] >= 0].tolist()))
        / max(1, int((t[:k] >= 0).sum()))
        for f, t in zip(found, truth, strict=True)
    ]
    return float(np.mean(hits)) if hits else 1.0


# Re-ranking depths (--rerank K) the search parameter is also tuned for: nprobe kinds only (an
# HNSW search widens itself to K, so its k-level value already serves any K).
RERANK_DEPTHS = (20, 50, 100, 200, 300, 500, 1000)


def rerank_depths(kind: IndexKind, k: int, rows: int) -> list[int]:
    """The :data:`RERANK_DEPTHS` tuned for ``kind`` at recall@``k`` over ``rows`` rows."""
    if kind.search_param != "nprobe":
        return []
    return [d for d in RERANK_DEPTHS if k < d <= rows]


@dataclass
class Tuning:
    """The search parameter chosen for a target recall, and the sweep that chose it.

    ``rerank``: for each re-ranking depth K (as a string), the smallest value whose top K
    candidates hold ``target`` of the true top k (``value``, ``recall``; else the cheapest
    value of the best plateau, see :func:`pick_rerank`), so ``--rerank K`` searches only as
    wide as it needs.
    """

    value: int | None
    recall: float
    target: float
    reached: bool
    sweep: list[dict[str, Any]] = field(default_factory=list)
    queries: int = 0
    rerank: dict[str, dict[str, Any]] = field(default_factory=dict)


def sweep_row(
    value: int, found: np.ndarray, truth: np.ndarray, k: int, depths: list[int], seconds: float
) -> dict[str, Any]:
    """One sweep value's recall@k, q/s, and (``depths``) candidate recall per re-rank depth."""
    row: dict[str, Any] = {"value": value, "recall": recall_at_k(found, truth, k),
                           "qps": len(truth) / max(seconds, 1e-9)}  # fmt: skip
    if depths:
        row["candidates"] = {str(d): candidate_recall(found, truth, k, d) for d in depths}
    return row


def tuning_of(rows: list[dict[str, Any]], target: float) -> Tuning:
    """The sweep's pick (its last row when that reached ``target``, else its best) and the
    re-ranking depths' picks."""
    reached = rows[-1]["recall"] >= target
    best = rows[-1] if reached else max(rows, key=lambda r: r["recall"])
    rerank = pick_rerank(rows, target)
    return Tuning(int(best["value"]), best["recall"], target, reached, rows, rerank=rerank)


PLATEAU = 0.005  # recall an unreached depth gives up for the cheapest value of its plateau


def pick_rerank(rows: list[dict[str, Any]], target: float) -> dict[str, dict[str, Any]]:
    """Per depth: the smallest swept value whose candidate recall reaches ``target``; else
    the smallest within :data:`PLATEAU` of the best (past it, more lists cost time and no
    longer help: the codes, not the lists, keep the rest out). ``reached`` says which."""
    depths = rows[0].get("candidates", {}) if rows else {}
    out: dict[str, dict[str, Any]] = {}
    for depth in depths:
        scored = [(r["value"], r["candidates"][depth]) for r in rows]
        hit = next(((v, c) for v, c in scored if c >= target), None)
        if hit is None:
            best = max(c for _, c in scored)
            hit_or_plateau = next((v, c) for v, c in scored if c >= best - PLATEAU)
        else:
            hit_or_plateau = hit
        value, recall = hit_or_plateau
        out[depth] = {"value": int(value), "recall": float(recall), "reached": hit is not None}
    return out


def rerank_value(rerank: dict[str, dict[str, Any]], depth: int) -> dict[str, Any] | None:
    """The tuned entry for ``--rerank depth``: the deepest tuned depth ≤ it (its candidate
    recall is at most what ``depth`` candidates hold), or None below every tuned depth."""
    fitting = [d for d in rerank if int(d) <= depth]
    return rerank[max(fitting, key=int)] if fitting else None


def tune(
    index: Any,
    kind: IndexKind,
    queries: np.ndarray,
    truth: np.ndarray,
    *,
    k: int,
    target: float,
    search: Callable[[np.ndarray, int], np.ndarray] | None = None,
) -> Tuning:
    """Smallest sweep value whose recall@k on ``queries`` reaches ``target`` (else the best),
    and for nprobe kinds the same per re-ranking depth (:data:`RERANK_DEPTHS`; each value's
    search then returns the deepest depth's candidates, and its q/s is for that search).
    The sweep stops once recall@k reaches ``target``: every depth has reached it by then.

    ``search(queries, k) → ids`` defaults to ``index.search``; the index stage passes one
    that leaves each query's own row out.
    """
    search = search or (lambda q, kk: index.search(q, kk)[1])
    if kind.exact:
        return Tuning(None, 1.0, target, True)
    limit = _param_limit(index, kind)
    values = [v for v in kind.sweep if v <= limit] or [kind.sweep[0]]
    depths = rerank_depths(kind, k, int(index.ntotal))
    rows: list[dict[str, Any]] = []
    for value in values:
        set_search_param(index, kind, value)
        started = time.perf_counter()
        found = search(queries, max([k, *depths]))
        rows.append(sweep_row(value, found, truth, k, depths, time.perf_counter() - started))
        if rows[-1]["recall"] >= target:
            break
    tuning = tuning_of(rows, target)
    set_search_param(index, kind, tuning.value)
    return tuning


def _param_limit(index: Any, kind: IndexKind) -> int:
    import faiss

    if kind.search_param == "nprobe":
        nlist = getattr(index, "nlist", None)  # GPU IVF indexes expose it directly
        return int(nlist if nlist is not None else faiss.extract_index_ivf(index).nlist)
    return max(kind.sweep)
