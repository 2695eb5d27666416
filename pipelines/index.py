"""The index stage: build a FAISS index beside a feature set, or add newly committed shards.

Build → resolve the kind (``auto`` picks by size and ``--max-memory``), train on a random
sample when the kind needs it, add every committed shard streamed from the store, then tune
the search parameter for ``--target-recall`` against exact search on held-out rows and store
the index with the recall it measured. Update → add only the committed shards the index does
not cover yet, re-measure, store. With ``--shards N`` (or when ``auto`` finds no index that
fits ``--max-memory`` whole) an IVF index is built in parts, in this process or on Dask
(``--local-cluster``/``--scheduler``): see :mod:`bob_cache.pipelines.index_sharded`.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from bob_cache.errors import DeviceError, SpecError
from bob_cache.extras import faiss_gpu_hint
from bob_cache.pipelines.registry import register_stage
from bob_cache.pipelines.selection import select_feature_sets
from bob_cache.progress import progress_bar
from bob_cache.provenance import library_versions, utc_now
from bob_cache.retrieval import faiss_ops
from bob_cache.retrieval.auto import parse_memory, resolve_kind
from bob_cache.retrieval.kinds import get_kind, parse_metric
from bob_cache.retrieval.vectors import sample_rows, shard_vectors
from bob_cache.stores import FeatureSet, open_store
from bob_cache.stores.index_store import (
    IndexRecord,
    check_index,
    get_record,
    index_exists,
    index_reader,
    index_writer,
    prune_versions,
)

TRAIN_ROWS_PER_LIST = 64
MAX_TRAIN_ROWS = 300_000
MIN_HELD_OUT = 100  # fewer new rows than this to hold out: tune on indexed rows


@dataclass
class IndexConfig:
    """Options of ``bob-cache index build|update``."""

    store: str
    dataset: str
    backbone: str
    feature: str | None = None
    split: str = "train"
    kind: str = "auto"
    metric: str = "cosine"
    max_memory: str | None = None
    target_recall: float = 0.95
    k: int = 10
    name: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    gpu: bool | None = None  # None: use faiss-gpu when it sees a GPU
    force: bool = False
    update: bool = False
    tune_queries: int = 1000
    seed: int = 0
    quiet: bool = False
    storage_options: dict[str, Any] = field(default_factory=dict)
    shards: int | None = None  # build in this many parts (update: new parts to add)
    local_cluster: int | None = None  # run the parts on a LocalCluster of this many workers
    scheduler: str | None = None  # or on the Dask cluster at this address

    def __post_init__(self) -> None:
        parse_metric(self.metric)
        if self.kind != "auto":
            get_kind(self.kind)
        self._check_parts()
        if not 0 < self.target_recall <= 1:
            raise SpecError(f"--target-recall must be in (0, 1], got {self.target_recall}.")
        if self.k < 1:
            raise SpecError(f"-k must be at least 1, got {self.k}.")

    def _check_parts(self) -> None:
        if self.shards is not None and self.shards < 1:
            raise SpecError(f"--shards must be at least 1, got {self.shards}.")
        if self.local_cluster is not None and self.local_cluster < 1:
            raise SpecError(f"--local-cluster must be at least 1, got {self.local_cluster}.")
        if self.local_cluster and self.scheduler:
            raise SpecError("Pass --local-cluster or --scheduler, not both.")
        if (self.local_cluster or self.scheduler) and self.shards is None and not self.update:
            raise SpecError(
                "--local-cluster and --scheduler run a build in parts: add --shards N (e.g. "
                "--shards 2 per worker)."
            )
        if self.shards is not None and self.kind in ("flat", "hnsw"):
            raise SpecError(
                f"--shards builds an IVF index in parts, but --kind {self.kind} has no "
                "inverted lists to split. Use --kind ivf, ivfsq or ivfpq (or auto), or drop "
                "--shards."
            )


@dataclass
class IndexSummary:
    """What the stage did, and the index record it stored."""

    group: str
    action: str  # built | updated | up-to-date | exists
    record: dict[str, Any]
    rows_added: int = 0
    pending_rows: int = 0
    sweep: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0
    notes: list[str] = field(default_factory=list)  # e.g. a training sample capped to memory

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@register_stage("index")
def build_index(config: IndexConfig) -> IndexSummary:
    """Build (or with ``config.update``, extend) the index of one feature set."""
    started = time.perf_counter()
    store = open_store(config.store, mode="a", storage_options=config.storage_options or None)
    (fs,) = select_feature_sets(
        store, dataset=config.dataset, backbone=config.backbone, feature=config.feature,
        splits=(config.split,),
    ).values()  # fmt: skip
    summary = _update(config, fs) if config.update else _build(config, fs)
    summary.seconds = time.perf_counter() - started
    return summary


def _build(config: IndexConfig, fs: FeatureSet) -> IndexSummary:
    generations = fs.generations()  # taken before reading: a shard recomputed later is stale
    shards = sorted(generations)
    if not shards:
        raise SpecError(
            f"Feature set '{fs.path}' has no committed rows yet. Run `bob-cache extract` first."
        )
    if config.shards is not None and config.shards > len(shards):
        raise SpecError(
            f"--shards {config.shards} asks for more parts than the {len(shards)} committed "
            f"shards of '{fs.path}' (a part holds one store shard or more). Pass --shards "
            f"{len(shards)} or fewer."
        )
    max_memory = parse_memory(config.max_memory)
    choice = resolve_kind(
        config.kind, fs.n_rows, fs.dim, max_memory=max_memory, params=config.params,
        target_recall=config.target_recall, shards=config.shards, max_shards=len(shards),
    )  # fmt: skip
    name = config.name or (choice.kind.name if config.kind != "auto" else "auto")
    if index_exists(fs, name) and not config.force:
        record = get_record(fs, name)
        prune_versions(fs, record)  # what a killed build of this name left behind
        return IndexSummary(fs.path, "exists", record.to_dict())
    if choice.shards is not None:
        from bob_cache.pipelines.index_sharded import build_sharded

        return build_sharded(config, fs, choice, name=name, generations=generations)
    started = time.perf_counter()
    index = faiss_ops.create_index(choice.kind, fs.dim, config.metric, choice.params)
    index = _maybe_gpu(index, choice.kind, choice.params, config.gpu)
    notes: list[str] = []
    if not index.is_trained:
        n_train = training_rows(choice.params)
        x, _ = sample_rows(fs, shards, n_train, config.metric, seed=config.seed)
        notes = faiss_ops.train(index, x)
    added, tuning = _add_and_tune(index, fs, shards, shards, choice.kind, config)
    record = IndexRecord(
        name=name, kind=choice.kind.name, metric=config.metric, params=choice.params,
        feature_key=fs.key, feature_set=fs.path, feature_set_created=fs.attrs["created"],
        shards=shards, generations={str(s): generations[s] for s in shards}, rows=added,
        dim=fs.dim, search_param=choice.kind.search_param,
        search_value=tuning.value, recall=tuning.recall, target_recall=config.target_recall,
        recall_k=config.k, recall_queries=tuning.queries, rerank=tuning.rerank,
        reason=choice.reason, versions=_versions(), created=utc_now(),
    )  # fmt: skip
    record.build_seconds = round(time.perf_counter() - started, 3)
    _store(fs, record, index)
    return IndexSummary(fs.path, "built", record.to_dict(), added, sweep=tuning.sweep, notes=notes)


def training_rows(params: dict[str, Any]) -> int:
    """Rows an IVF kind trains on: :data:`TRAIN_ROWS_PER_LIST` × 4 per list, between 10,000
    and :data:`MAX_TRAIN_ROWS`."""
    return max(min(MAX_TRAIN_ROWS, TRAIN_ROWS_PER_LIST * params.get("nlist", 1) * 4), 10_000)


def _update(config: IndexConfig, fs: FeatureSet) -> IndexSummary:
    record = get_record(fs, config.name)
    if record.layout == "sharded":
        from bob_cache.pipelines.index_sharded import update_sharded

        return update_sharded(config, fs, record)
    if config.shards is not None or config.local_cluster or config.scheduler:
        raise SpecError(
            f"Index '{record.name}' of '{fs.path}' was built in one piece; --shards, "
            "--local-cluster and --scheduler apply to an index built in parts. Drop them, or "
            f"rebuild it in parts with `bob-cache index build ... --name {record.name} --shards "
            "N --force`."
        )
    generations = fs.generations()
    pending = check_index(fs, record)
    if not pending:
        prune_versions(fs, record)  # what a killed update left behind
        return IndexSummary(fs.path, "up-to-date", record.to_dict())
    started = time.perf_counter()
    kind = get_kind(record.kind)
    index = faiss_ops.read_index(index_reader(fs, record))
    index = _maybe_gpu(index, kind, record.params, config.gpu)
    config.target_recall, config.k = record.target_recall, record.recall_k
    shards = sorted(record.shards + pending)
    added, tuning = _add_and_tune(index, fs, pending, shards, kind, config)
    record.shards, record.rows = shards, record.rows + added
    record.generations = {str(s): generations[s] for s in shards}
    record.search_value, record.recall = tuning.value, tuning.recall
    record.recall_queries, record.versions, record.created = tuning.queries, _versions(), utc_now()
    record.rerank = tuning.rerank
    record.build_seconds = round(record.build_seconds + time.perf_counter() - started, 3)
    _store(fs, record, index)
    return IndexSummary(fs.path, "updated", record.to_dict(), added, sweep=tuning.sweep)


def _store(fs: FeatureSet, record: IndexRecord, index: Any) -> None:
    with index_writer(fs, record) as sink:
        faiss_ops.write_index(index, sink)


def _add_and_tune(
    index: Any, fs: FeatureSet, new: list[int], shards: list[int], kind: Any, config: IndexConfig
) -> tuple[int, faiss_ops.Tuning]:
    """Add shards ``new`` and tune the search parameter on held-out rows.

    ``tune_queries`` of the new rows (at most a tenth of them) stay out of the index while the
    parameter is tuned against exact search over the other rows of ``shards``, so recall is
    measured on queries the index has not seen (an indexed query finds its own neighbourhood
    too easily: a graph links it straight to its neighbours). Then they are added too. An
    update with too few new rows to hold out re-measures on indexed rows instead, each
    excluded from its own neighbour lists.
    """
    if kind.exact:
        return _add(index, fs, new, config), faiss_ops.Tuning(None, 1.0, config.target_recall, True)
    n_new = sum(b - a for a, b in (fs.layout.shard_bounds(s, fs.n_rows) for s in new))
    n_held = min(config.tune_queries, n_new // 10)
    if n_held < MIN_HELD_OUT:
        added = _add(index, fs, new, config)
        return added, _tune_on_indexed(index, fs, shards, kind, config)
    queries, held = sample_rows(fs, new, n_held, config.metric, seed=config.seed + 1)
    added = _add(index, fs, new, config, skip=held)
    others = _without(shard_vectors(fs, shards, config.metric), held)
    _, truth = faiss_ops.exact_neighbours(queries, others, config.k, config.metric)
    tuning = faiss_ops.tune(index, kind, queries, truth, k=config.k, target=config.target_recall)
    tuning.queries = len(queries)
    index.add_with_ids(queries, held)
    return added + len(held), tuning


def _add(
    index: Any, fs: FeatureSet, shards: list[int], config: IndexConfig, skip: Any = None
) -> int:
    """Add the usable rows of ``shards`` (less the row numbers in ``skip``)."""
    added, chunks = 0, shard_vectors(fs, shards, config.metric)
    with progress_bar(len(shards), desc=f"index {fs.path}", quiet=config.quiet) as bar:
        for x, rows in chunks if skip is None else _without(chunks, skip):
            if len(rows):
                index.add_with_ids(x, rows)
            added += len(rows)
            bar.update(1)
    return added


def _without(
    chunks: Iterable[tuple[np.ndarray, np.ndarray]], skip: np.ndarray
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(vectors, row ids)`` chunks less the rows numbered in ``skip``."""
    for x, rows in chunks:
        keep = ~np.isin(rows, skip)
        yield x[keep], rows[keep]


def _tune_on_indexed(
    index: Any, fs: FeatureSet, shards: list[int], kind: Any, config: IndexConfig
) -> faiss_ops.Tuning:
    """Tune on indexed rows used as queries, each excluded from its own neighbour lists."""
    queries, own = sample_rows(fs, shards, config.tune_queries, config.metric, seed=config.seed + 1)
    k = config.k
    _, truth = faiss_ops.exact_neighbours(
        queries, shard_vectors(fs, shards, config.metric), k + 1, config.metric
    )
    truth = drop_self(truth, own, k)

    def search(q: np.ndarray, kk: int) -> np.ndarray:  # like the truth: the query row dropped
        return drop_self(index.search(q, kk + 1)[1], own, kk)

    tuning = faiss_ops.tune(
        index, kind, queries, truth, k=k, target=config.target_recall, search=search
    )
    tuning.queries = len(queries)
    return tuning


def drop_self(found: np.ndarray, own: np.ndarray, k: int) -> np.ndarray:
    """Each row's first ``k`` ids other than its own (``-1``-padded)."""
    out = np.full((len(found), k), -1, dtype=np.int64)
    for i, (row, me) in enumerate(zip(found, own, strict=True)):
        others = row[row != me][:k]
        out[i, : len(others)] = others
    return out


def _maybe_gpu(index: Any, kind: Any, params: dict[str, Any], gpu: bool | None) -> Any:
    """A GPU copy of ``index`` when faiss-gpu sees a GPU and holds this kind (else ``index``)."""
    if gpu is False:
        return index
    available = faiss_ops.gpu_available()
    if gpu and not available:
        raise DeviceError(
            f"--gpu was requested but faiss sees no GPU. Drop --gpu, or {faiss_gpu_hint()}."
        )
    return faiss_ops.to_gpu(index) if available and kind.gpu(params) else index


def _versions() -> dict[str, str]:
    import faiss

    return {**library_versions(), "faiss": faiss.__version__}
