"""Nearest-neighbour queries: a feature set and its index, loaded once, answering queries by
vector, by stored id, or by image (embedded with the set's own backbone and preprocessing).

Everything a result row needs (ids, labels, class names) is read into memory when the
:class:`Searcher` opens, so answering costs the index search plus O(k) lookups, whatever
the number of stored rows. A feature set without a built index is searched exactly (its
stored rows in an in-memory flat index), and the searcher says so (:attr:`Searcher.note`).

Bad input cannot hurt: ragged, wrong-sized or non-finite vectors, ids of rows without
features, and images whose header claims more pixels than the limits are refused with a
:class:`~bob_cache.errors.QueryError` before any search or decode; images are decoded a
bounded number of pixels at a time.
"""

from __future__ import annotations

import contextvars
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bob_cache.errors import InvalidRowError, QueryError, UnknownIdError, did_you_mean
from bob_cache.pipelines.query_index import index_cache_folder, load_index, open_reranker
from bob_cache.pipelines.registry import register_stage
from bob_cache.pipelines.selection import select_feature_sets
from bob_cache.provenance import utc_now
from bob_cache.retrieval import coarse, faiss_ops, ondisk
from bob_cache.retrieval.exact import EXACT_METRIC, exact_index
from bob_cache.retrieval.kinds import get_kind
from bob_cache.retrieval.query_inputs import (
    MAX_IMAGE_PIXELS,
    MAX_REQUEST_PIXELS,
    check_request_pixels,
    decode_image,
    group_by_pixels,
    image_size,
    parse_vectors,
)
from bob_cache.retrieval.rerank import check_rerank
from bob_cache.retrieval.vectors import read_rows
from bob_cache.retrieval.warm import Warmer
from bob_cache.stores import FeatureSet, open_store
from bob_cache.stores.index_store import (
    IndexRecord,
    check_index,
    get_record,
    list_indexes,
)

RESULT_COLUMNS = ("query", "rank", "row", "id", "label", "class", "score")
EXACT_KIND = "exact (no index built)"
COMPUTE_THREAD = "bob-cache-compute"
SEARCH_SLICE = 32  # queries searched in one turn (FAISS's flat scan uses BLAS from 20 up)
log = logging.getLogger(__name__)
_compute: ThreadPoolExecutor | None = None
_compute_lock = threading.Lock()


def on_compute_thread(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)`` on the process's one compute thread, in a copy of the caller's context.

    torch and faiss share one GNU OpenMP runtime (faiss binds to the one torch loaded, and
    importing this module loads torch). It gives every thread that runs a parallel region a
    team of its own, and stops spinning between regions (it sleeps and wakes its threads
    instead) once all teams together outnumber the cores. A service whose forwards and
    searches ran on whichever worker thread took the request kept several teams: on 2 cores
    a resnet18 forward took 20–26 ms instead of 14–16. Building the model, its forwards and
    the index searches all run here, so the process keeps one team.
    """
    global _compute
    if threading.current_thread().name.startswith(COMPUTE_THREAD):
        return fn(*args)
    with _compute_lock:
        if _compute is None:
            _compute = ThreadPoolExecutor(1, thread_name_prefix=COMPUTE_THREAD)
        pool = _compute
    return pool.submit(contextvars.copy_context().run, fn, *args).result()


def _forget_compute_thread() -> None:  # a forked child does not have the parent's thread
    global _compute
    _compute = None


os.register_at_fork(after_in_child=_forget_compute_thread)


@dataclass
class QueryConfig:
    """Where to search: the feature set (dataset, backbone, split, key) and its index."""

    store: str
    dataset: str
    backbone: str
    feature: str | None = None
    split: str = "train"
    index: str | None = None
    weights: str | None = None
    device: str = "cpu"
    storage_options: dict[str, Any] = field(default_factory=dict)
    rerank: int | None = None  # rescore the index's top K exactly from the float16 vectors
    index_cache: str | None = None  # where sharded indexes are merged to disk (default: ondisk)

    def __post_init__(self) -> None:
        if self.rerank is not None and self.rerank < 1:
            raise QueryError(f"--rerank must be at least 1, got {self.rerank}.")


class Searcher:
    """An opened feature set + index. Thread-safe: searches and forwards run on one thread.

    ``exact``: the set has no built index; ``index`` is an in-memory flat index of its
    committed rows, built at open (exact neighbours, memory of 4·D bytes per row). A sharded
    index is merged once into on-disk inverted lists in the local index cache and searched
    memory-mapped (:mod:`bob_cache.retrieval.ondisk`); ``config.rerank`` rescores each query's
    top K candidates exactly from a float16 copy of the vectors beside it
    (:mod:`bob_cache.retrieval.rerank`).
    """

    def __init__(
        self,
        fs: FeatureSet,
        record: IndexRecord,
        index: Any,
        *,
        config: QueryConfig,
        exact: bool = False,
    ) -> None:
        self.fs, self.record, self.index, self.config = fs, record, index, config
        self.exact = exact
        self.pending_shards = [] if exact else check_index(fs, record)
        scores_exact = exact or get_kind(record.kind).exact
        self.rerank_depth = None if scores_exact else config.rerank  # None: no re-ranking
        self.search_value, self.expected_recall = self._search_setting(record, self.rerank_depth)
        self._rerank_note = (
            rerank_ignored(config.rerank, EXACT_KIND if exact else record.kind)
            if scores_exact and config.rerank
            else rerank_shortfall(record, self.rerank_depth)
        )
        faiss_ops.set_search_param(index, get_kind(record.kind), self.search_value)
        self.coarse_graph = not exact and coarse.use_graph(index)  # many lists: HNSW finds them
        self.ids = fs.array("ids")[:]
        self.labels = fs.array("labels")[:]
        self.valid = fs.array("valid")[:]
        names = fs.attrs.get("dataset", {}).get("class_names") or []
        self.class_names = np.asarray(names, dtype=object)
        self._row_of: dict[str, int] | None = None
        self._embedder: Any = None
        self._lock = threading.RLock()
        self._decode_lock = threading.Lock()
        self.observe: Callable[[str, float], None] | None = None  # (phase, seconds): metrics
        self.on_disk = record.layout == "sharded"
        self.index_folder = index_cache_folder(fs, record.key, config) if self.on_disk else None
        self.reranker = open_reranker(fs, record, config) if self.rerank_depth else None

    @staticmethod
    def _search_setting(record: IndexRecord, depth: int | None) -> tuple[int | None, float]:
        """The search parameter's value and the recall@k it was measured to give: the one
        tuned for re-ranking ``depth`` when the index has one (the top K candidates then
        hold the target share of the true top k), else the k-level one."""
        tuned = faiss_ops.rerank_value(record.rerank, depth) if depth else None
        if tuned is None:
            return record.search_value, record.recall
        return int(tuned["value"]), float(tuned["recall"])

    @contextmanager
    def _phase(self, name: str) -> Iterator[None]:
        """Time a phase of a query (``decode``, ``embed``, ``search``) for :attr:`observe`."""
        started = time.perf_counter()
        try:
            yield
        finally:
            if self.observe is not None:
                self.observe(name, time.perf_counter() - started)

    @classmethod
    def open(cls, config: QueryConfig) -> Searcher:
        """Select the feature set, load its index and metadata (refusing a stale index)."""
        store = open_store(config.store, storage_options=config.storage_options or None)
        (fs,) = select_feature_sets(
            store, dataset=config.dataset, backbone=config.backbone, feature=config.feature,
            splits=(config.split,),
        ).values()  # fmt: skip
        if config.index is None and not list_indexes(fs):
            return cls._open_exact(fs, config)
        record = get_record(fs, config.index)
        return cls(fs, record, load_index(fs, record, config), config=config)

    @classmethod
    def _open_exact(cls, fs: FeatureSet, config: QueryConfig) -> Searcher:
        """No index built: search the committed rows exactly, from an in-memory flat index."""
        index, shards = exact_index(fs)
        record = IndexRecord(
            name="", kind="flat", metric=EXACT_METRIC, params={}, feature_key=fs.key,
            feature_set=fs.path, feature_set_created=str(fs.attrs.get("created", "")),
            shards=shards, rows=int(index.ntotal), dim=fs.dim, reason=EXACT_KIND,
            created=utc_now(),
        )  # fmt: skip
        searcher = cls(fs, record, index, config=config, exact=True)
        log.info("%s", searcher.note)
        return searcher

    @property
    def n_indexed(self) -> int:
        return int(self.index.ntotal)

    @property
    def index_name(self) -> str | None:
        """The built index searched (None: no index built, exact search)."""
        return None if self.exact else self.record.name

    @property
    def index_kind(self) -> str:
        return EXACT_KIND if self.exact else self.record.kind

    @property
    def note(self) -> str | None:
        """What a user should know about how queries are answered (None: nothing)."""
        notes = [self._rerank_note]  # every answer carries it: worked out once, at open
        if self.exact:
            notes.append(
                f"No index is built for '{self.fs.path}': searching its {self.n_indexed} stored "
                f"rows exactly ({EXACT_METRIC}, in memory). Build one with `bob-cache index "
                "build` for faster queries on large sets."
            )
        return " ".join(n for n in notes if n) or None

    def warmer(self, *, available: int | None = None) -> Warmer:
        """A :class:`~bob_cache.retrieval.warm.Warmer` (not started) for this searcher's
        memory-mapped files: the on-disk inverted lists and the ``--rerank`` vector copy."""
        regions = [ondisk.mapped_lists(self.index) if self.on_disk else None]
        regions.append(self.reranker.mapped() if self.reranker is not None else None)
        return Warmer([r for r in regions if r is not None], available=available)

    # --- queries: Hits (arrays, the lean path the server uses) -------------------------------
    def search(self, vectors: np.ndarray | Sequence[Sequence[float]], k: int = 10) -> Hits:
        """Neighbours of each row of ``vectors`` (``(D,)`` or ``(N, D)``).

        Raises:
            QueryError: ragged or non-numeric rows, the wrong dimension, NaN/inf, bad ``k``.
        """
        x = parse_vectors(vectors, self.fs.dim, where=self.fs.path)
        self._check_k(k)
        return self._hits(*self._search(faiss_ops.prepare(x, self.record.metric), k))

    def search_by_ids(self, ids: Sequence[str], k: int = 10) -> Hits:
        """Neighbours of stored rows named by id; each query's own row is left out.

        Raises:
            UnknownIdError: an id names no stored row.
            InvalidRowError: an id names a row without features (unreadable image, or its
                shard not extracted yet).
        """
        rows = np.asarray([self._row(i) for i in ids], dtype=np.int64)
        for id_, row in zip(ids, rows.tolist(), strict=True):
            self._check_usable(id_, row)
        self._check_k(k, extra=1)
        x = read_rows(self.fs, rows, self.record.metric)
        if not np.isfinite(x).all():  # valid rows hold finite features; never search NaN
            bad = int(rows[~np.isfinite(x).all(axis=1)][0])
            raise InvalidRowError(
                f"Row '{self.ids[bad]}' (row {bad}) of '{self.fs.path}' holds NaN or inf "
                "features. Re-extract the set (`bob-cache extract --overwrite`), or query "
                "another id."
            )
        scores, found = self._search(x, k + 1)
        keep = found != rows[:, None]
        scores = np.stack([s[m][:k] for s, m in zip(scores, keep, strict=True)])
        found = np.stack([f[m][:k] for f, m in zip(found, keep, strict=True)])
        return self._hits(scores, found, queries=[str(i) for i in ids])

    def search_by_images(
        self,
        images: Sequence[str | Path | bytes],
        k: int = 10,
        *,
        max_image_pixels: int = MAX_IMAGE_PIXELS,
        max_request_pixels: int = MAX_REQUEST_PIXELS,
    ) -> Hits:
        """Neighbours of image files or encoded image bytes, embedded like the stored rows.

        Every image's header is checked against ``max_image_pixels`` and their sum against
        ``max_request_pixels`` before anything is decoded; images are then decoded and
        embedded in groups of at most ``max_image_pixels`` decoded pixels (one image when it
        alone is that large), one group at a time across all threads, so memory stays
        bounded whatever requests hold.

        Raises:
            ImageTooLargeError: an image, or the images together, over the pixel limits.
            QueryError: an image that cannot be decoded.
        """
        self._check_k(k)
        sizes = [image_size(image, max_pixels=max_image_pixels) for image in images]
        check_request_pixels(sizes, max_request_pixels)
        vectors = self._embed(images, sizes, group_pixels=max_image_pixels)
        scores, rows = self._search(faiss_ops.prepare(vectors, self.record.metric), k)
        return self._hits(scores, rows)

    # --- queries: tables ---------------------------------------------------------------------
    def search_vectors(self, vectors: np.ndarray, k: int = 10) -> pd.DataFrame:
        """:meth:`search` as a table (one row per query and rank)."""
        return self.search(vectors, k).to_frame()

    def search_ids(self, ids: Sequence[str], k: int = 10) -> pd.DataFrame:
        """:meth:`search_by_ids` as a table, with a ``query_id`` column."""
        return self.search_by_ids(ids, k).to_frame()

    def search_images(
        self, images: Sequence[str | Path | bytes], k: int = 10, **limits: int
    ) -> pd.DataFrame:
        """:meth:`search_by_images` as a table (``limits``: its pixel limits)."""
        return self.search_by_images(images, k, **limits).to_frame()

    @property
    def embedder(self) -> Any:
        """The feature set's backbone, rebuilt on first use from its provenance."""
        if self._embedder is None:
            from bob_cache.backbones.rebuild import embedder_from_provenance

            self._embedder = on_compute_thread(
                lambda: embedder_from_provenance(
                    self.fs.attrs, weights=self.config.weights, device=self.config.device
                )
            )
        return self._embedder

    # --- internals -------------------------------------------------------------------------
    def _search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Search ``x`` on the compute thread, :data:`SEARCH_SLICE` queries at a time.

        The compute thread runs one submission at a time, first come first served (it, not a
        lock, serializes searches and forwards), so a large batch's slices take turns with
        other requests' (a lone query waits for one slice, not for the whole batch); the
        neighbours are the same.
        """
        slices = [x[i : i + SEARCH_SLICE] for i in range(0, max(len(x), 1), SEARCH_SLICE)]
        with self._phase("search"):
            parts = [on_compute_thread(self._search_slice, part, k) for part in slices]
        if len(parts) == 1:
            return parts[0]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _search_slice(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The index's top ``k`` (or its top ``--rerank`` K rescored exactly to the best k)."""
        if self.reranker is None:
            return faiss_ops.search(self.index, x, k)
        candidates = max(int(self.rerank_depth or k), k)  # by id asks k + 1 (itself dropped)
        return self.reranker.search(self.index, x, k=k, candidates=candidates)

    def _embed(
        self,
        images: Sequence[str | Path | bytes],
        sizes: Sequence[tuple[int, int]],
        *,
        group_pixels: int,
    ) -> np.ndarray:
        """Embeddings of ``images``, decoded a group of at most ``group_pixels`` at a time.

        Decoding a group and embedding it hold the decode lock, so across all concurrent
        requests one group of decoded pixels is in memory at a time; searches only wait for
        the model forward (the search lock), not for decoding.
        """
        out: list[np.ndarray] = []
        for group in group_by_pixels(sizes, group_pixels):
            with self._decode_lock:
                with self._phase("decode"):
                    decoded = [decode_image(images[i], max_pixels=group_pixels) for i in group]
                with self._lock, self._phase("embed"):  # one forward at a time (CPU threads)
                    out.append(on_compute_thread(self.embedder.embed, decoded))
                del decoded  # freed before the next group (of any request) is decoded
        return np.concatenate(out) if out else np.zeros((0, self.fs.dim), np.float32)

    def _check_usable(self, id_: str, row: int) -> None:
        """Refuse a row without features: its image was unreadable, or not extracted yet."""
        if self.valid[row]:
            return
        where = f"Row '{id_}' (row {row}) of '{self.fs.path}'"
        reason = str(self.fs.array("error")[row])
        if reason:
            raise InvalidRowError(
                f"{where} has no features: its image could not be read when the set was "
                f"extracted ({reason}). Query another id, or fix the image and re-extract."
            )
        shard = row // self.fs.layout.shard_rows
        raise InvalidRowError(
            f"{where} has no features yet: its shard {shard} is not extracted. Finish "
            "`bob-cache extract` (rerun it to resume), or query another id."
        )

    def _check_k(self, k: int, *, extra: int = 0) -> None:
        if k < 1:
            raise QueryError(f"-k must be at least 1, got {k}.")
        check_rerank(self.rerank_depth, k)
        if self.n_indexed - extra < 1:
            raise QueryError(
                f"'{self.fs.path}' has {self.n_indexed} searchable rows, too few to answer. "
                "Extract more images (`bob-cache extract`), then query again."
            )
        if k + extra > self.n_indexed:
            raise QueryError(
                f"-k {k} asks for more neighbours than the {self.n_indexed - extra} rows the "
                f"index of '{self.fs.path}' can return. Pass -k {self.n_indexed - extra} or less."
            )

    def _row(self, id_: str) -> int:
        if self._row_of is None:
            self._row_of = {str(v): i for i, v in enumerate(self.ids)}
        row = self._row_of.get(str(id_))
        if row is None:
            sample = list(self._row_of)[:5]
            hint = did_you_mean(str(id_), self._row_of) if len(self._row_of) < 200_000 else ""
            raise UnknownIdError(
                f"No row with id '{id_}' in '{self.fs.path}'.{hint} Ids look like: "
                f"{', '.join(sample)}. List them with `bob-cache info`, or query by --image."
            )
        return row

    def _hits(
        self, scores: np.ndarray, rows: np.ndarray, *, queries: list[str] | None = None
    ) -> Hits:
        return Hits(scores, rows, self, queries)

    def flat_labels(self, rows: Sequence[int] | np.ndarray) -> np.ndarray:
        """Labels of ``rows`` (multi-label rows: their first positive label)."""
        labels = self.labels[np.asarray(rows, dtype=np.int64)]
        return labels if labels.ndim == 1 else labels.argmax(axis=1)

    def class_name(self, label: int) -> str:
        return str(self.class_names[label]) if 0 <= label < len(self.class_names) else ""


@dataclass
class Hits:
    """Search results as arrays: ``scores`` and ``rows`` ``(n_queries, k)`` (row -1: none).

    Metadata (ids, labels, class names) is looked up only for the returned rows, so turning
    hits into records or a table costs O(n_queries · k).
    """

    scores: np.ndarray
    rows: np.ndarray
    searcher: Searcher
    queries: list[str] | None = None

    def records(self) -> list[list[dict[str, Any]]]:
        """Per query, its neighbours as ``{rank, row, id, label, class, score}`` dicts."""
        s = self.searcher
        out = []
        for scores, rows in zip(self.scores.tolist(), self.rows.tolist(), strict=True):
            found = [(r, sc) for r, sc in zip(rows, scores, strict=True) if r >= 0]
            labels = s.flat_labels([r for r, _ in found])
            out.append([_record(s, i, r, sc, lab) for i, ((r, sc), lab) in enumerate(
                zip(found, labels, strict=True))])  # fmt: skip
        return out

    def to_frame(self) -> pd.DataFrame:
        """One row per (query, rank): ``query, [query_id,] rank, row, id, label, class, score``."""
        q, rank = np.nonzero(self.rows >= 0)
        found = self.rows[q, rank]
        labels = self.searcher.flat_labels(found)
        frame = pd.DataFrame(
            {
                "query": q,
                "rank": rank + 1,
                "row": found,
                "id": self.searcher.ids[found].astype(object),
                "label": labels,
                "class": [self.searcher.class_name(int(v)) for v in labels],
                "score": self.scores[q, rank],
            },
            columns=list(RESULT_COLUMNS),
        )
        if self.queries is not None:
            frame.insert(1, "query_id", [self.queries[i] for i in q])
        return frame


def _record(s: Searcher, i: int, row: int, score: float, label: Any) -> dict[str, Any]:
    label = int(label)
    return {"rank": i + 1, "row": row, "id": str(s.ids[row]), "label": label,
            "class": s.class_name(label), "score": score}  # fmt: skip


def rerank_shortfall(record: IndexRecord, depth: int | None) -> str | None:
    """Why ``--rerank depth`` falls short of the index's recall target, and the depth that
    reached it when the index was tuned (None: it does not fall short, or was not tuned)."""
    tuned = faiss_ops.rerank_value(record.rerank, depth) if depth else None
    if tuned is None or tuned["reached"]:
        return None
    deeper = sorted((int(d), t) for d, t in record.rerank.items() if t["reached"])
    fix = (
        f"--rerank {deeper[0][0]} reached {deeper[0][1]['recall']:.3f}."
        if deeper
        else "No tuned depth reached it: rebuild the index with larger codes (--pq-bytes)."
    )
    return (
        f"With --rerank {depth}, the top candidates held {tuned['recall']:.3f} of the true top "
        f"{record.recall_k} when the index was tuned ({record.search_param}="
        f"{tuned['value']}; target {record.target_recall}): the codes rank some true "
        f"neighbours lower than that. {fix}"
    )


def rerank_ignored(depth: int, kind: str) -> str:
    """Why ``--rerank depth`` does nothing on an index that already scores exactly."""
    return (
        f"--rerank {depth} is ignored: the index is exact ({kind}), so its scores already are "
        "the exact ones. Drop --rerank, or use it with an approximate index (ivf, ivfsq, "
        "ivfpq, hnsw)."
    )


@register_stage("query")
def open_searcher(config: QueryConfig) -> Searcher:
    """The query stage's entry point: an opened :class:`Searcher`."""
    return Searcher.open(config)


def query(
    store: str,
    *,
    dataset: str,
    backbone: str,
    vectors: np.ndarray | None = None,
    ids: Sequence[str] | None = None,
    images: Sequence[str | Path | bytes] | None = None,
    k: int = 10,
    **options: Any,
) -> pd.DataFrame:
    """One-shot query from Python: exactly one of ``vectors``, ``ids`` or ``images``.

    ``options`` are the other :class:`QueryConfig` fields (``split``, ``feature``, ``index``,
    ``weights``, ``device``). Returns one row per (query, rank).
    """
    given = [
        name
        for name, v in (("vectors", vectors), ("ids", ids), ("images", images))
        if v is not None
    ]
    if len(given) != 1:
        raise QueryError("Pass exactly one of vectors=, ids= or images=.")
    searcher = Searcher.open(QueryConfig(store, dataset, backbone, **options))
    if vectors is not None:
        return searcher.search_vectors(vectors, k)
    if ids is not None:
        return searcher.search_ids(ids, k)
    return searcher.search_images(images or [], k)
