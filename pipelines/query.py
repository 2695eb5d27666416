"""Nearest-neighbour queries: a feature set and its index, loaded once, answering queries by
vector, by stored id, or by image (embedded with the set's own backbone and preprocessing).

Everything a result row needs (ids, labels, class names) is read into memory when the
:class:`Searcher` opens, so answering costs the index search plus O(k) lookups, whatever
the number of stored rows.
"""

from __future__ import annotations

import io
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from bob_cache.errors import DataNotFoundError, QueryError, UnknownIdError, did_you_mean
from bob_cache.pipelines.registry import register_stage
from bob_cache.pipelines.selection import select_feature_sets
from bob_cache.retrieval import faiss_ops
from bob_cache.retrieval.kinds import get_kind
from bob_cache.retrieval.vectors import read_rows
from bob_cache.stores import FeatureSet, open_store
from bob_cache.stores.index_store import IndexRecord, check_index, get_record, index_reader

RESULT_COLUMNS = ("query", "rank", "row", "id", "label", "class", "score")
MAX_IMAGE_PIXELS = 80_000_000  # refuse decompression bombs beyond ~9000 × 9000


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


class Searcher:
    """An opened feature set + index. Thread-safe: searches are serialized by a lock."""

    def __init__(
        self, fs: FeatureSet, record: IndexRecord, index: Any, *, config: QueryConfig
    ) -> None:
        self.fs, self.record, self.index, self.config = fs, record, index, config
        self.pending_shards = check_index(fs, record)
        faiss_ops.set_search_param(index, get_kind(record.kind), record.search_value)
        self.ids = fs.group["ids"][:]
        self.labels = fs.group["labels"][:]
        names = fs.attrs.get("dataset", {}).get("class_names") or []
        self.class_names = np.asarray(names, dtype=object)
        self._row_of: dict[str, int] | None = None
        self._embedder: Any = None
        self._lock = threading.RLock()

    @classmethod
    def open(cls, config: QueryConfig) -> Searcher:
        """Select the feature set, load its index and metadata (refusing a stale index)."""
        store = open_store(config.store, storage_options=config.storage_options or None)
        (fs,) = select_feature_sets(
            store, dataset=config.dataset, backbone=config.backbone, feature=config.feature,
            splits=(config.split,),
        ).values()  # fmt: skip
        record = get_record(fs, config.index)
        index = faiss_ops.read_index(index_reader(fs, record.name))
        return cls(fs, record, index, config=config)

    @property
    def n_indexed(self) -> int:
        return int(self.index.ntotal)

    # --- queries: Hits (arrays, the lean path the server uses) -------------------------------
    def search(self, vectors: np.ndarray, k: int = 10) -> Hits:
        """Neighbours of each row of ``vectors`` (``(D,)`` or ``(N, D)``)."""
        x = np.asarray(vectors, dtype=np.float32)
        x = x[None] if x.ndim == 1 else x
        if x.ndim != 2 or x.shape[1] != self.fs.dim:
            raise QueryError(
                f"Query vectors have shape {tuple(np.shape(vectors))}, but the index holds "
                f"{self.fs.dim}-dimensional features of '{self.fs.path}'. Pass (N, "
                f"{self.fs.dim}) vectors from the same backbone and layer."
            )
        if not np.isfinite(x).all():
            raise QueryError("Query vectors contain NaN or inf; pass finite values.")
        self._check_k(k)
        return self._hits(*self._search(faiss_ops.prepare(x, self.record.metric), k))

    def search_by_ids(self, ids: Sequence[str], k: int = 10) -> Hits:
        """Neighbours of stored rows named by id; each query's own row is left out."""
        rows = np.asarray([self._row(i) for i in ids], dtype=np.int64)
        self._check_k(k, extra=1)
        x = read_rows(self.fs, rows, self.record.metric)
        scores, found = self._search(x, k + 1)
        keep = found != rows[:, None]
        scores = np.stack([s[m][:k] for s, m in zip(scores, keep, strict=True)])
        found = np.stack([f[m][:k] for f, m in zip(found, keep, strict=True)])
        return self._hits(scores, found, queries=[str(i) for i in ids])

    def search_by_images(self, images: Sequence[str | Path | bytes], k: int = 10) -> Hits:
        """Neighbours of image files or encoded image bytes, embedded like the stored rows."""
        self._check_k(k)
        decoded = [decode_image(image) for image in images]
        with self._lock:  # one model forward at a time: threads would oversubscribe the CPU
            vectors = self.embedder.embed(decoded)
            scores, rows = self._search(faiss_ops.prepare(vectors, self.record.metric), k)
        return self._hits(scores, rows)

    # --- queries: tables ---------------------------------------------------------------------
    def search_vectors(self, vectors: np.ndarray, k: int = 10) -> pd.DataFrame:
        """:meth:`search` as a table (one row per query and rank)."""
        return self.search(vectors, k).to_frame()

    def search_ids(self, ids: Sequence[str], k: int = 10) -> pd.DataFrame:
        """:meth:`search_by_ids` as a table, with a ``query_id`` column."""
        return self.search_by_ids(ids, k).to_frame()

    def search_images(self, images: Sequence[str | Path | bytes], k: int = 10) -> pd.DataFrame:
        """:meth:`search_by_images` as a table."""
        return self.search_by_images(images, k).to_frame()

    @property
    def embedder(self) -> Any:
        """The feature set's backbone, rebuilt on first use from its provenance."""
        if self._embedder is None:
            from bob_cache.backbones.rebuild import embedder_from_provenance

            self._embedder = embedder_from_provenance(
                self.fs.attrs, weights=self.config.weights, device=self.config.device
            )
        return self._embedder

    # --- internals -------------------------------------------------------------------------
    def _search(self, x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        with self._lock:
            return faiss_ops.search(self.index, x, k)

    def _check_k(self, k: int, *, extra: int = 0) -> None:
        if k < 1:
            raise QueryError(f"-k must be at least 1, got {k}.")
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


def decode_image(image: str | Path | bytes) -> Any:
    """A PIL RGB image from a path or encoded bytes, with a clear error when it is not one."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    if isinstance(image, (str, Path)) and not Path(image).is_file():
        raise DataNotFoundError(f"Query image '{image}' does not exist. Check the path.")
    what = f"'{image}'" if isinstance(image, (str, Path)) else "the uploaded file"
    try:
        source = io.BytesIO(image) if isinstance(image, bytes) else image
        with Image.open(source) as img:
            img.load()
            return img.convert("RGB")
    except Exception as exc:  # PIL raises many types for undecodable input
        raise QueryError(
            f"Cannot decode {what} as an image ({type(exc).__name__}: {exc}). Pass a JPEG, "
            "PNG, WebP, BMP, TIFF or GIF file."
        ) from exc


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
