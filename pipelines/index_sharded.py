"""An IVF index built in parts from the store: train once, add shard ranges in parallel.

``bob-cache index build ... --kind ivf|ivfsq|ivfpq --shards N [--local-cluster W |
--scheduler ADDR]``:

1. **Train** the coarse quantizer and codes once, on a sample read from the store (the rows a
   single build trains on, capped so the sample fits the memory budget, with a message), and
   store the trained, empty index as the blob ``trained`` of a new version group recording the
   build's identity (:mod:`bob_cache.stores.index_parts`).
2. **Parts**: the committed shards are split into N contiguous ranges; each part reads the
   trained index, adds its range's usable rows (ids = row numbers) one store shard at a time,
   and writes its populated index as blob ``parts/<k>``, committed last. One more part holds
   the rows kept out of the others for tuning (added last, as a single build adds them). Parts
   run in this process, or as Dask tasks on workers that reach the store. Memory per part:
   the trained index, one store shard's vectors, and the part's codes.
3. **Tune** the search parameter on the held-out rows against exact search (streamed over the
   store), searching part by part with the parts' results merged in a ``faiss.ResultHeap``:
   an IVF part probes the same lists as the merged index would, so the merged top-k equals
   the merged index's, and memory stays one part (never the whole index).
4. **Record** (layout ``sharded``, the parts' commits) written last, then older versions
   pruned.

A kill at any step loses only the blob being written: rerunning the same command finds the
unfinished version by its identity, keeps the trained blob and every committed part whose
plan matches, and computes the rest. Merged in part order, the inverted lists equal a
single-process build's (same ids in the same order per list). ``index update`` adds the
newly committed shards as new parts of the same version and rewrites its record.
"""

from __future__ import annotations

import itertools
import logging
import time
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from bob_cache.errors import SpecError
from bob_cache.pipelines.index import (
    MIN_HELD_OUT,
    IndexConfig,
    IndexSummary,
    _maybe_gpu,
    _versions,
    _without,
    drop_self,
    training_rows,
)
from bob_cache.progress import progress_bar
from bob_cache.provenance import utc_now
from bob_cache.retrieval import faiss_ops, ivf_lists
from bob_cache.retrieval.auto import Choice, parse_memory
from bob_cache.retrieval.kinds import IndexKind, get_kind
from bob_cache.retrieval.vectors import read_rows, sample_rows, shard_vectors
from bob_cache.stores import FeatureSet, index_parts, open_store
from bob_cache.stores.index_store import IndexRecord, check_index, prune_versions

# A training sample costs its float32 rows about this many times over (the rows, their
# normalized copy, k-means' assignments and PQ residuals).
SAMPLE_COPIES = 3
FALLBACK_MEMORY = 2 * 2**30  # the budget without --max-memory when psutil is missing
logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class PartTask:
    """What a worker needs to compute one part (picklable: shipped to Dask workers)."""

    store: str
    storage_options: dict[str, Any]
    path: str
    key: str
    metric: str
    part: int
    plan: dict[str, Any]


def build_sharded(
    config: IndexConfig, fs: FeatureSet, choice: Choice, *, name: str, generations: dict
) -> IndexSummary:
    """Build index ``name`` of ``choice.kind`` in ``choice.shards`` parts (resuming an
    unfinished build of the same identity)."""
    started = time.perf_counter()
    shards = sorted(generations)
    n_train, notes = _training_rows(choice.params, fs.dim, config.max_memory)
    build = {
        "layout": "sharded", "feature_key": fs.key, "kind": choice.kind.name,
        "params": choice.params, "metric": config.metric, "seed": config.seed,
        "parts": choice.shards, "train_rows": n_train, "tune_queries": config.tune_queries,
        "generations": {str(s): generations[s] for s in shards},
    }  # fmt: skip
    key = index_parts.find_version(fs, name, build) or index_parts.create_version(fs, name, build)
    notes += _ensure_trained(config, fs, key, choice, n_train=n_train, shards=shards)
    queries, held = _held_out(fs, shards, config)
    plans = plan_parts(fs, shards, int(choice.shards or 1), generations, held, base=0)
    commits = run_parts(config, fs, key, plans)
    searched = [c["part"] for c in commits if not _is_new_held(c, plans, held)]
    tuning = _tune(config, fs, key, searched, choice.kind, shards, queries, held)
    trained = index_parts.blob_commit(index_parts.version_group(fs, key), index_parts.TRAINED)
    record = IndexRecord(
        name=name, kind=choice.kind.name, metric=config.metric, params=choice.params,
        feature_key=fs.key, feature_set=fs.path, feature_set_created=fs.attrs["created"],
        shards=shards, generations=build["generations"], rows=sum(c["rows"] for c in commits),
        dim=fs.dim, search_param=choice.kind.search_param, search_value=tuning.value,
        recall=tuning.recall, target_recall=config.target_recall, recall_k=config.k,
        recall_queries=tuning.queries, rerank=tuning.rerank, reason=choice.reason,
        versions=_versions(),
        created=utc_now(), key=key, layout="sharded", parts=commits,
        bytes=int((trained or {}).get("bytes", 0)) + sum(c["bytes"] for c in commits),
    )  # fmt: skip
    record.build_seconds = round(time.perf_counter() - started, 3)
    index_parts.commit_record(fs, record)
    summary = IndexSummary(fs.path, "built", record.to_dict(), record.rows, sweep=tuning.sweep)
    summary.notes = notes
    return summary


def update_sharded(config: IndexConfig, fs: FeatureSet, record: IndexRecord) -> IndexSummary:
    """Add the shards committed since ``record`` was built as new parts, re-tune, rewrite
    the record."""
    pending = check_index(fs, record)
    if not pending:
        index_parts.drop_stray_parts(fs, record)  # what a killed update left
        prune_versions(fs, record)
        return IndexSummary(fs.path, "up-to-date", record.to_dict())
    started = time.perf_counter()
    generations = fs.generations()
    config = replace(
        config, target_recall=record.target_recall, k=record.recall_k, metric=record.metric
    )
    kind = get_kind(record.kind)
    ranges = sum(1 for p in record.parts if p["plan"].get("shards"))
    n_parts = min(len(pending), config.shards or max(1, ranges))
    queries, held = _held_out(fs, pending, config)
    base = max(index_parts.part_numbers(record)) + 1
    plans = plan_parts(fs, pending, n_parts, generations, held, base=base)
    new = run_parts(config, fs, record.key, plans)
    shards = sorted(record.shards + pending)
    searched = [c["part"] for c in record.parts + new if not _is_new_held(c, plans, held)]
    tuning = _tune(config, fs, record.key, searched, kind, shards, queries, held)
    added = sum(c["rows"] for c in new)
    record.parts, record.shards, record.rows = record.parts + new, shards, record.rows + added
    record.generations = {str(s): generations[s] for s in shards}
    record.search_value, record.recall = tuning.value, tuning.recall
    record.recall_queries, record.versions, record.created = tuning.queries, _versions(), utc_now()
    record.rerank = tuning.rerank
    record.bytes += sum(c["bytes"] for c in new)
    record.build_seconds = round(record.build_seconds + time.perf_counter() - started, 3)
    index_parts.commit_record(fs, record)
    index_parts.drop_stray_parts(fs, record)
    return IndexSummary(fs.path, "updated", record.to_dict(), added, sweep=tuning.sweep)


# --- training -------------------------------------------------------------------------------
def memory_budget(max_memory: str | None) -> int:
    """``--max-memory`` in bytes, else a quarter of the available memory (psutil), else
    :data:`FALLBACK_MEMORY`."""
    parsed = parse_memory(max_memory)
    if parsed is not None:
        return parsed
    try:
        import psutil
    except ImportError:
        return FALLBACK_MEMORY
    return int(psutil.virtual_memory().available // 4)


def _training_rows(params: dict[str, Any], dim: int, max_memory: str | None) -> tuple[int, list]:
    """The rows to train on (a single build's count, capped to the memory budget) and the
    message saying it was capped."""
    wanted = training_rows(params)
    budget = memory_budget(max_memory)
    fits = int(budget // (SAMPLE_COPIES * 4 * dim))
    if wanted <= fits:
        return wanted, []
    nlist = int(params.get("nlist", 1))
    if fits < nlist:
        raise SpecError(
            f"A training sample for {nlist} IVF lists needs at least {nlist} rows of {dim} "
            f"dims, but the memory budget ({budget} bytes) holds {fits}. Raise --max-memory, "
            "or pass a smaller --nlist."
        )
    note = (
        f"The training sample was capped at {fits} rows (of the {wanted} this index kind "
        f"trains on) to fit the memory budget of {budget / 2**30:.2f} GiB "
        f"(--max-memory{'' if max_memory else ', default: a quarter of the available memory'})."
        " Raise --max-memory to train on more rows."
    )
    logger.warning("%s", note)
    return fits, [note]


def _ensure_trained(
    config: IndexConfig, fs: FeatureSet, key: str, choice: Choice, *, n_train: int, shards: list
) -> list[str]:
    """Train on the sample and store the empty index as blob ``trained`` (once); the notes
    :func:`faiss_ops.train` gave (a sample small for the index)."""
    group = index_parts.version_group(fs, key)
    if index_parts.blob_commit(group, index_parts.TRAINED) is not None:
        return []
    index = faiss_ops.create_index(choice.kind, fs.dim, config.metric, choice.params)
    index = _maybe_gpu(index, choice.kind, choice.params, config.gpu)
    x, _ = sample_rows(fs, shards, n_train, config.metric, seed=config.seed)
    notes = faiss_ops.train(index, x)
    del x
    index_parts.write_blob(
        fs, group, index_parts.TRAINED, lambda sink: faiss_ops.write_index(index, sink),
        commit={"rows": n_train}, step="index-trained",
    )  # fmt: skip
    return notes


# --- parts ----------------------------------------------------------------------------------
def _held_out(fs: FeatureSet, shards: list[int], config: IndexConfig) -> tuple[Any, np.ndarray]:
    """The tuning queries kept out of the range parts and their row numbers (as a single build
    draws them), or ``(None, [])`` when there are too few rows to hold any out."""
    n_rows = sum(b - a for a, b in (fs.layout.shard_bounds(s, fs.n_rows) for s in shards))
    n_held = min(config.tune_queries, n_rows // 10)
    if n_held < MIN_HELD_OUT:
        return None, np.zeros(0, np.int64)
    return sample_rows(fs, shards, n_held, config.metric, seed=config.seed + 1)


def plan_parts(
    fs: FeatureSet,
    shards: list[int],
    n_parts: int,
    generations: dict[int, str],
    held: np.ndarray,
    *,
    base: int,
) -> list[dict[str, Any]]:
    """The parts' plans, numbered from ``base``: ``n_parts`` contiguous ranges of ``shards``
    (each with its generations and the held-out rows it skips), then one part of the held
    rows (when any)."""
    bounds = np.linspace(0, len(shards), n_parts + 1).round().astype(int)
    plans = []
    for i, (a, b) in enumerate(itertools.pairwise(bounds.tolist())):
        mine = shards[a:b]
        rows = [fs.layout.shard_bounds(s, fs.n_rows) for s in (mine[0], mine[-1])]
        skip = held[(held >= rows[0][0]) & (held < rows[1][1])]
        plans.append({
            "part": base + i, "shards": mine, "generations": {str(s): generations[s] for s in mine},
            "skip": skip.tolist(), "rows": [],
        })  # fmt: skip
    if len(held):
        plans.append({"part": base + n_parts, "shards": [], "generations": {}, "skip": [],
                      "rows": held.tolist()})  # fmt: skip
    return plans


def run_parts(
    config: IndexConfig, fs: FeatureSet, key: str, plans: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Compute the parts not yet committed with their plan (on the cluster when one is
    named, then here for any a worker could not finish); returns every part's commit."""
    done = {k: c for k, c in index_parts.part_commits(fs, key).items() if "plan" in c}
    todo = [p for p in plans if done.get(p["part"], {}).get("plan") != p]
    if todo and (config.local_cluster or config.scheduler):
        done.update(_on_cluster(config, fs, key, todo))
    left = [p for p in todo if done.get(p["part"], {}).get("plan") != p]
    with progress_bar(len(left), desc=f"index parts {fs.path}", quiet=config.quiet) as bar:
        for plan in left:
            done[plan["part"]] = write_part(fs, key, plan, metric=config.metric)
            bar.update(1)
    return [done[p["part"]] for p in plans]


def write_part(fs: FeatureSet, key: str, plan: dict[str, Any], *, metric: str) -> dict:
    """Add ``plan``'s rows to the trained index and store it as ``parts/<k>`` (committed
    last); returns the commit. Memory: the trained index, one store shard, the part."""
    group = index_parts.version_group(fs, key)
    parts = group.require_group(index_parts.PARTS)
    name = str(plan["part"])
    existing = index_parts.blob_commit(parts, name)
    if existing is not None and existing.get("plan") == plan:
        return existing
    index = index_parts.load_blob(fs, key, index_parts.TRAINED)
    rows = np.asarray(plan["rows"], dtype=np.int64)
    if len(rows):
        index.add_with_ids(read_rows(fs, rows, metric), rows)
    else:
        chunks = shard_vectors(fs, plan["shards"], metric)
        for x, ids in _without(chunks, np.asarray(plan["skip"], dtype=np.int64)):
            if len(ids):
                index.add_with_ids(x, ids)
    commit = {"part": plan["part"], "plan": plan, "rows": int(index.ntotal)}

    def write(sink: index_parts.Sink) -> None:  # the lists alone: every part shares the rest
        with ivf_lists.without_quantizer(index):
            faiss_ops.write_index(index, sink)

    return index_parts.write_blob(fs, parts, name, write, commit=commit, step="index-part")


def run_part(task: PartTask) -> dict[str, Any]:
    """One part on a Dask worker (module-level, so Dask ships it by reference)."""
    store = open_store(task.store, mode="a", storage_options=task.storage_options or None)
    return write_part(store.get(task.path), task.key, task.plan, metric=task.metric)


def _on_cluster(
    config: IndexConfig, fs: FeatureSet, key: str, plans: list[dict[str, Any]]
) -> dict[int, dict[str, Any]]:
    """Run ``plans`` as Dask tasks; returns the commits of those that finished (a part that
    failed for good is logged and left to this process)."""
    from bob_cache.pipelines.cluster import dask_client, task_result

    location = config.store if "://" in config.store else str(Path(config.store).resolve())
    token = uuid.uuid4().hex[:8]
    done: dict[int, dict[str, Any]] = {}
    with dask_client(scheduler=config.scheduler, workers=config.local_cluster, gpus=0) as client:
        futures = {
            p["part"]: client.submit(
                run_part, PartTask(location, config.storage_options, fs.path, key,
                                   config.metric, p["part"], p),
                key=f"index-part-{p['part']}-{token}", pure=False,
            )
            for p in plans
        }  # fmt: skip
        for part, future in futures.items():
            commit = task_result(future, lambda reason, part=part: logger.warning(
                "Index part %d failed on the cluster (%s); it is computed in this process "
                "after the others.", part, reason,
            ))  # fmt: skip
            if commit is not None:
                done[part] = commit
    return done


def _is_new_held(commit: dict[str, Any], plans: list[dict[str, Any]], held: np.ndarray) -> bool:
    """Whether ``commit`` is the part of rows this run holds out for tuning."""
    return bool(len(held)) and commit["part"] == plans[-1]["part"]


# --- tuning ---------------------------------------------------------------------------------
def _tune(
    config: IndexConfig,
    fs: FeatureSet,
    key: str,
    parts: list[int],
    kind: IndexKind,
    shards: list[int],
    queries: Any,
    held: np.ndarray,
) -> faiss_ops.Tuning:
    """Tune on the held-out rows against exact search over the others (searching ``parts``,
    which leave them out); with none held out, on indexed rows, each left out of its own
    neighbour lists (as a single build does)."""
    k, own = config.k, None
    if queries is None:
        queries, own = sample_rows(
            fs, shards, config.tune_queries, config.metric, seed=config.seed + 1
        )
        chunks = shard_vectors(fs, shards, config.metric)
        _, truth = faiss_ops.exact_neighbours(queries, chunks, k + 1, config.metric)
        truth = drop_self(truth, own, k)
    else:
        chunks = _without(shard_vectors(fs, shards, config.metric), held)
        _, truth = faiss_ops.exact_neighbours(queries, chunks, k, config.metric)
    tuning = tune_over_parts(
        fs, key, parts, kind, queries, truth, k=k, target=config.target_recall, own=own,
        metric=config.metric,
    )  # fmt: skip
    tuning.queries = len(queries)
    return tuning


def tune_over_parts(
    fs: FeatureSet,
    key: str,
    parts: list[int],
    kind: IndexKind,
    queries: np.ndarray,
    truth: np.ndarray,
    *,
    k: int,
    target: float,
    metric: str,
    own: np.ndarray | None = None,
) -> faiss_ops.Tuning:
    """:func:`faiss_ops.tune` over the union of ``parts``: each part is loaded once and
    searched at every sweep value, its top-k merged into one result heap per value.

    ``own``: each query's row, left out of what it finds (queries drawn from indexed rows).
    """
    import faiss

    depths = faiss_ops.rerank_depths(kind, k, fs.n_rows)
    kk = max([k, *depths]) + (1 if own is not None else 0)
    values: list[int] = []
    heaps: dict[int, Any] = {}
    seconds: dict[int, float] = {}
    trained = index_parts.load_blob(fs, key, index_parts.TRAINED)
    for part in parts:
        stored = index_parts.load_blob(fs, key, index_parts.part_path(part), ivf_lists.read_flags())
        index = ivf_lists.with_quantizer(stored, trained)
        del stored
        if not values:
            nlist = faiss.extract_index_ivf(index).nlist
            values = [v for v in kind.sweep if v <= nlist] or [kind.sweep[0]]
            heaps = {v: faiss.ResultHeap(len(queries), kk, keep_max=metric == "cosine")
                     for v in values}  # fmt: skip
            seconds = dict.fromkeys(values, 0.0)
        for value in values:
            faiss_ops.set_search_param(index, kind, value)
            started = time.perf_counter()
            scores, ids = index.search(queries, kk)
            seconds[value] += time.perf_counter() - started
            heaps[value].add_result(scores, ids)
        del index
    return _pick(values, heaps, seconds, truth, k=k, target=target, own=own, depths=depths)


def _pick(
    values: list[int],
    heaps: dict[int, Any],
    seconds: dict[int, float],
    truth: np.ndarray,
    *,
    k: int,
    target: float,
    own: np.ndarray | None,
    depths: list[int],
) -> faiss_ops.Tuning:
    """The smallest value whose merged results reach ``target`` recall@k (else the best), and
    per re-ranking depth the same for its candidates (see :func:`faiss_ops.tune`)."""
    rows: list[dict[str, Any]] = []
    deepest = max([k, *depths])
    for value in values:
        heaps[value].finalize()
        found = heaps[value].I if own is None else drop_self(heaps[value].I, own, deepest)
        rows.append(faiss_ops.sweep_row(value, found, truth, k, depths, seconds[value]))
        if rows[-1]["recall"] >= target:
            break
    if not rows:
        return faiss_ops.Tuning(None, 1.0, target, True, rows)
    return faiss_ops.tuning_of(rows, target)
