"""Retrieval indexes (issue 4): build cost, recall/speed sweeps, exact search against its
bounds, ``--kind auto`` against autofaiss, and bob-cache's query-path overhead.

Data: clustered synthetic vectors (Gaussian clusters grouped in superclusters, each cluster
spread along a low-rank, decaying-variance subspace plus a little isotropic noise), stored
through the feature store as float16. Queries are fresh draws from the same clusters (not
database rows). Exact truth is faiss ``IndexFlatIP`` over the stored vectors as the index sees
them (float16 round-trip, float32, L2-normalized), so recall is measured against exactly what
the index holds.

Every build runs in a fresh child process; its peak memory is the child's ``ru_maxrss``
(reported beside the RSS before the build, and the growth). Throughput figures are taken in
the parent, one index loaded at a time; autofaiss runs in its own venv
(``benchmarks/peers/setup_autofaiss.sh``) and bob's auto index is re-measured after it, so the
side-by-side figures bracket the peer's run.

    python benchmarks/retrieval_index.py --rows 200000          # end-to-end check (~20 min)
    python benchmarks/retrieval_index.py                        # 1M × 768 (issue 4's figures)

Steps that finished are kept in ``<out>.partial.json`` and skipped when the same command is
run again (``--fresh`` starts over); data, store and autofaiss work files go under
``benchmarks/out/retrieval-<rows>x<dim>/``.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
DATASET, BACKBONE, KEY = "synthetic", "synthetic.clusters", "synthclusters01"
KINDS = ("flat", "hnsw", "ivf", "ivfsq", "ivfpq")
K = 10
SHARD_ROWS = 4096


# --- data ------------------------------------------------------------------------------------
class ClusterModel:
    """Clusters in superclusters; each cluster spreads along a low-rank subspace.

    Centers: 10 clusters per supercluster; supercluster centers have norm ≈ 1, a cluster's
    offset from its supercluster ≈ ``offset``. Within a cluster a point is the center plus
    ``z @ B`` (``z`` standard normal of ``rank`` dims, ``B`` one of 16 random bases with
    a 1/√i spectrum scaled so the spread has norm ≈ ``spread``) plus isotropic noise of norm ≈
    ``noise``. Cluster sizes are log-normal (imbalanced, as in real collections).
    """

    def __init__(
        self,
        dim: int,
        clusters: int,
        *,
        seed: int,
        spread: float,
        offset: float = 0.6,
        noise: float = 0.1,
        rank: int = 64,
        n_bases: int = 16,
    ) -> None:
        rng = np.random.default_rng(seed)
        n_super = max(1, clusters // 10)
        supers = rng.normal(0, 1 / np.sqrt(dim), (n_super, dim))
        offsets = rng.normal(0, offset / np.sqrt(dim), (clusters, dim))
        self.centers = (supers[np.arange(clusters) % n_super] + offsets).astype(np.float32)
        spectrum = (1.0 + np.arange(rank)) ** -0.5
        spectrum *= spread / np.sqrt((spectrum**2).sum())
        bases = rng.normal(0, 1 / np.sqrt(dim), (n_bases, rank, dim)) * spectrum[None, :, None]
        self.bases = bases.astype(np.float32)
        weights = rng.lognormal(0, 0.5, clusters)
        self.weights = weights / weights.sum()
        self.dim, self.rank, self.noise, self.clusters = dim, rank, noise, clusters
        self.params = {
            "clusters": clusters,
            "superclusters": n_super,
            "spread": spread,
            "offset": offset,
            "noise": noise,
            "rank": rank,
            "bases": n_bases,
            "seed": seed,
        }

    def labels(self, n: int, rng: np.random.Generator) -> np.ndarray:
        return rng.choice(self.clusters, size=n, p=self.weights).astype(np.int64)

    def sample(self, labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        n = len(labels)
        x = self.centers[labels].copy()
        z = rng.standard_normal((n, self.rank), dtype=np.float32)
        which = labels % len(self.bases)
        for b in range(len(self.bases)):
            rows = np.flatnonzero(which == b)
            if len(rows):
                x[rows] += z[rows] @ self.bases[b]
        x += rng.standard_normal((n, self.dim), dtype=np.float32) * (self.noise / np.sqrt(self.dim))
        return x


def normalized(x: np.ndarray) -> np.ndarray:
    from bob_cache.retrieval.faiss_ops import prepare

    return prepare(x, "cosine")


def make_data(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Store (float16), float32 normalized .npy copy, queries, exact truth."""
    from numpy.lib.format import open_memmap

    from bob_cache.stores import FeatureSetRequest, open_store, resolve_layout
    from bob_cache.stores.feature_set import ShardRows

    model = ClusterModel(
        args.dim,
        args.clusters,
        seed=args.seed,
        spread=args.spread,
        offset=getattr(args, "offset", 0.6),
        noise=getattr(args, "noise", 0.1),
        rank=getattr(args, "rank", 64),
    )
    started = time.perf_counter()
    labels = model.labels(args.rows, np.random.default_rng([args.seed, 1]))
    fstore = open_store(work / "store", mode="a")
    layout = resolve_layout(shard_rows=SHARD_ROWS)
    request = FeatureSetRequest(
        path=f"{DATASET}/train/{BACKBONE}/{KEY}",
        key=KEY,
        spec={"layer": "final", "pool": "head", "dtype": "float16", "synthetic": model.params},
        provenance={
            "dataset": {"name": DATASET, "class_names": []},
            "split": "train",
            "backbone": {"slug": BACKBONE, "name": BACKBONE, "arch": "synthetic"},
        },
        n_rows=args.rows,
        dim=args.dim,
        dtype="float16",
    )
    ids = [f"v{i:08d}" for i in range(args.rows)]
    fs = fstore.require(request, layout, overwrite=True)
    vectors = open_memmap(
        work / "vectors.npy", mode="w+", dtype=np.float32, shape=(args.rows, args.dim)
    )
    n_shards = layout.n_shards(args.rows)
    for shard in range(n_shards):
        a, b = layout.shard_bounds(shard, args.rows)
        x = model.sample(labels[a:b], np.random.default_rng([args.seed, 2, shard]))
        fs.write_shard(shard, x, ShardRows(labels[a:b], ids[a:b], [""] * (b - a), [""] * (b - a)))
        vectors[a:b] = normalized(x.astype(np.float16))
        if shard == 0:  # what the store holds is what the .npy holds
            back = normalized(fs.features[a:b])
            assert np.array_equal(back, vectors[a:b]), "float16 round-trip differs from store"
        if shard % 25 == 0:
            print(f"  data: shard {shard + 1}/{n_shards}", file=sys.stderr, flush=True)
    fs.finalize()
    vectors.flush()
    write_seconds = time.perf_counter() - started

    qrng = np.random.default_rng([args.seed, 3])
    qlabels = model.labels(args.queries, qrng)
    raw = model.sample(qlabels, qrng)
    np.save(work / "queries_raw.npy", raw)
    np.save(work / "queries.npy", normalized(raw))
    np.save(work / "query_labels.npy", qlabels)
    np.save(work / "labels.npy", labels)

    started = time.perf_counter()
    truth_scores, truth = exact_truth(np.load(work / "queries.npy"), vectors, K)
    truth_seconds = time.perf_counter() - started
    np.save(work / "truth.npy", truth)
    same = (labels[truth] == qlabels[:, None]).mean()
    margin = truth_scores[:, 0] - truth_scores[:, -1]
    del vectors
    return {
        "model": model.params,
        "store_write_seconds": round(write_seconds, 1),
        "truth_seconds": round(truth_seconds, 1),
        "truth_share_same_cluster": round(float(same), 4),
        "truth_top1_score_median": round(float(np.median(truth_scores[:, 0])), 4),
        "truth_top1_minus_top10_median": round(float(np.median(margin)), 4),
        "store_bytes": dir_bytes(work / "store"),
    }


def exact_truth(q: np.ndarray, vectors: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k by ``IndexFlatIP`` over the (memory-mapped) vectors, 131072 rows at a time."""
    import faiss

    heap = faiss.ResultHeap(len(q), k, keep_max=True)
    step = 131072
    for a in range(0, len(vectors), step):
        index = faiss.IndexFlatIP(vectors.shape[1])
        index.add(np.ascontiguousarray(vectors[a : a + step]))
        d, i = index.search(q, k)
        heap.add_result(d, np.where(i >= 0, i + a, -1))
    heap.finalize()
    return heap.D, heap.I


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


# --- hardware bounds -------------------------------------------------------------------------
def measure_bounds(rows: int, dim: int) -> dict[str, Any]:
    """Memory read bandwidth (numpy sums; 1 and 2 threads) and sgemm rate (numpy matmul)."""
    from concurrent.futures import ThreadPoolExecutor

    a = np.ones((2**28,), np.float32)  # 1 GiB
    a.sum()

    def best(fn: Any, reps: int = 5) -> float:
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        return min(times)

    one = a.nbytes / best(lambda: a.sum())
    halves = [a[: len(a) // 2], a[len(a) // 2 :]]
    with ThreadPoolExecutor(2) as pool:
        two = a.nbytes / best(lambda: list(pool.map(np.sum, halves)))
    b = np.empty_like(a)
    copy = 2 * a.nbytes / best(lambda: np.copyto(b, a))
    rng = np.random.default_rng(0)
    q = rng.standard_normal((1000, dim), dtype=np.float32)
    db = rng.standard_normal((131072, dim), dtype=np.float32)
    q @ db[:4096].T
    t = best(lambda: q @ db.T, reps=3)
    sgemm = 2 * 1000 * dim * len(db) / t
    bandwidth = max(one, two)
    return {
        "read_GBps_1thread": round(one / 1e9, 2),
        "read_GBps_2threads": round(two / 1e9, 2),
        "copy_GBps_read_plus_write": round(copy / 1e9, 2),
        "sgemm_GFLOPs": round(sgemm / 1e9, 1),
        "sgemm_shape": [1000, dim, len(db)],
        "bound_batch1_qps": round(bandwidth / (rows * dim * 4), 2),
        "bound_batch1000_qps": round(sgemm / (2 * rows * dim), 2),
    }


# --- builds (child processes) ----------------------------------------------------------------
def rss_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 2**20
    return float("nan")


def child_build(spec: dict[str, Any]) -> None:
    import faiss  # noqa: F401  (imported before the baseline RSS, as the build needs it)

    from bob_cache.pipelines.index import IndexConfig, build_index

    before = rss_gib()
    summary = build_index(IndexConfig(**spec, quiet=True, force=True))
    out = {
        "record": summary.record,
        "sweep": summary.sweep,
        "seconds": summary.seconds,
        "action": summary.action,
        "rss_before_gib": round(before, 3),
        "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
    }
    print(json.dumps(out, default=str))


def build(
    work: Path,
    name: str,
    kind: str,
    max_memory: str | None,
    target: float,
    *,
    store: str | None = None,
    dataset: str = DATASET,
    backbone: str = BACKBONE,
) -> dict:
    spec = {
        "store": store or str(work / "store"),
        "dataset": dataset,
        "backbone": backbone,
        "kind": kind,
        "max_memory": max_memory,
        "target_recall": target,
        "k": K,
        "name": name,
    }
    cmd = [sys.executable, __file__, "--child-build", json.dumps(spec)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"build {name} failed:\n{done.stderr[-4000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["rss_growth_gib"] = round(out["peak_rss_gib"] - out["rss_before_gib"], 3)
    return out


# --- measurements ----------------------------------------------------------------------------
def recall(found: np.ndarray, truth: np.ndarray, k: int = K) -> float:
    return float(
        np.mean([len(np.intersect1d(f[:k], t[:k])) / k for f, t in zip(found, truth, strict=True)])
    )


def qps_batch1(
    index: Any,
    q: np.ndarray,
    *,
    min_seconds: float = 1.0,
    min_queries: int = 200,
    max_seconds: float = 30.0,
) -> tuple[float, int]:
    """Single-query calls, cycling the queries, until ≥ min_seconds and ≥ min_queries (or
    max_seconds)."""
    rows = [q[i : i + 1] for i in range(len(q))]
    for r in rows[:3]:
        index.search(r, K)
    n, t0 = 0, time.perf_counter()
    while True:
        index.search(rows[n % len(rows)], K)
        n += 1
        el = time.perf_counter() - t0
        if (el >= min_seconds and n >= min_queries) or el >= max_seconds:
            return n / el, n


def qps_batched(index: Any, q: np.ndarray, *, min_seconds: float = 1.0) -> tuple[float, Any]:
    """Whole-batch calls until ≥ min_seconds; returns queries/s and the first call's ids."""
    n, t0, first = 0, time.perf_counter(), None
    while True:
        _, ids = index.search(q, K)
        first = ids if first is None else first
        n += len(q)
        el = time.perf_counter() - t0
        if el >= min_seconds:
            return n / el, first


def open_searcher(
    work: Path,
    name: str,
    *,
    store: str | None = None,
    dataset: str = DATASET,
    backbone: str = BACKBONE,
) -> Any:
    from bob_cache.pipelines.query import QueryConfig, Searcher

    config = QueryConfig(store or str(work / "store"), dataset, backbone, index=name)
    return Searcher.open(config)


def sweep_index(work: Path, name: str, q: np.ndarray, truth: np.ndarray) -> dict[str, Any]:
    """recall@10, queries/s at batch 1 and 1000 over the kind's sweep (stop at recall ≥ .999)."""
    from bob_cache.retrieval.faiss_ops import _param_limit, set_search_param
    from bob_cache.retrieval.kinds import get_kind

    s = open_searcher(work, name)
    kind = get_kind(s.record.kind)
    batch = q[:1000]
    if kind.exact:
        values: list[int | None] = [None]
    else:
        limit = _param_limit(s.index, kind)
        values = [v for v in kind.sweep if v <= limit]
    points = []
    for value in values:
        set_search_param(s.index, kind, value)
        qb, ids = qps_batched(s.index, batch)
        r = recall(ids, truth[: len(batch)])
        q1, n1 = qps_batch1(s.index, q)
        points.append(
            {
                "value": value,
                "recall": round(r, 4),
                "qps_batch1": round(q1, 2),
                "batch1_queries": n1,
                "qps_batch1000": round(qb, 2),
            }
        )
        print(f"  {name} {kind.search_param}={value}: {points[-1]}", file=sys.stderr, flush=True)
        if r >= 0.999:
            break
    tuned = s.record.search_value
    at_tuned = next((p for p in points if p["value"] == tuned), None)
    if at_tuned is None:  # tuned value beyond the stop point: measure it too
        set_search_param(s.index, kind, tuned)
        qb, ids = qps_batched(s.index, batch)
        q1, n1 = qps_batch1(s.index, q)
        at_tuned = {
            "value": tuned,
            "recall": round(recall(ids, truth[: len(batch)]), 4),
            "qps_batch1": round(q1, 2),
            "batch1_queries": n1,
            "qps_batch1000": round(qb, 2),
        }
    return {
        "kind": kind.name,
        "search_param": kind.search_param,
        "points": points,
        "tuned": at_tuned,
    }


def measure_at_tuned(work: Path, name: str, q: np.ndarray, truth: np.ndarray) -> dict:
    s = open_searcher(work, name)
    qb, ids = qps_batched(s.index, q[:1000], min_seconds=2.0)
    q1, n1 = qps_batch1(s.index, q, min_seconds=2.0)
    out = {
        "value": s.record.search_value,
        "recall": round(recall(ids, truth[:1000]), 4),
        "qps_batch1": round(q1, 2),
        "batch1_queries": n1,
        "qps_batch1000": round(qb, 2),
    }
    return out


def match_peer(work: Path, name: str, peer: dict, q: np.ndarray, truth: np.ndarray) -> dict:
    """bob's auto index searched deeper than its sweep, until it reaches the peer's recall,
    and at the peer's own value of the same search parameter (when the families match)."""
    from bob_cache.retrieval.faiss_ops import _param_limit, set_search_param
    from bob_cache.retrieval.kinds import get_kind

    s = open_searcher(work, name)
    kind = get_kind(s.record.kind)
    theirs = (peer.get("search_params_set") or {}).get(kind.search_param or "")
    if kind.exact:
        return {}
    limit = _param_limit(s.index, kind) if kind.search_param == "nprobe" else 2**31
    top = max(kind.sweep)
    extra = {int(top * 1.5**i) for i in range(1, 9)}
    values = sorted(
        v for v in {*kind.sweep, *extra} if v <= limit and v <= max(top, 2 * (theirs or 0))
    )
    batch, target, out = q[:1000], peer["recall_at_k"], {}

    def point(value: int) -> dict:
        set_search_param(s.index, kind, value)
        qb, ids = qps_batched(s.index, batch)
        q1, n1 = qps_batch1(s.index, q, max_seconds=20.0)
        return {
            "value": value,
            "recall": round(recall(ids, truth[: len(batch)]), 4),
            "qps_batch1": round(q1, 2),
            "batch1_queries": n1,
            "qps_batch1000": round(qb, 2),
        }

    for value in values:
        set_search_param(s.index, kind, value)
        r = recall(s.index.search(batch, K)[1], truth[: len(batch)])
        if r >= target:
            out["at_peer_recall"] = point(value)
            break
    if theirs is not None and theirs <= limit:
        out["at_peer_value"] = point(int(theirs))
    return out


def overhead(work: Path, name: str, raw: np.ndarray, q: np.ndarray, rounds: int = 6) -> dict:
    """bob-cache's query path against ``s.index.search`` on pre-normalized queries, batch 1,
    on the same index object: ``Searcher.search_vectors`` (a table) and, where it exists,
    ``Searcher.search`` (the arrays the server uses). Variants run in interleaved blocks of
    >= 1 s, their order rotating between rounds."""
    from bob_cache.retrieval import faiss_ops

    s = open_searcher(work, name)
    raw_rows = [raw[i : i + 1] for i in range(len(raw))]
    q_rows = [q[i : i + 1] for i in range(len(q))]
    variants: dict[str, Any] = {
        "direct": lambda i: s.index.search(q_rows[i], K),
        "search_vectors": lambda i: s.search_vectors(raw_rows[i], K),
    }
    if hasattr(s, "search"):
        variants["search"] = lambda i: s.search(raw_rows[i], K)
    for fn in variants.values():
        for i in range(5):
            fn(i)
    lat: dict[str, list[float]] = {v: [] for v in variants}
    names = list(variants)
    start = 0
    for r in range(rounds):
        n_block = 0
        for which in names[r % len(names) :] + names[: r % len(names)]:
            fn, t_block, i = variants[which], time.perf_counter(), 0
            while True:
                t = time.perf_counter()
                fn((start + i) % len(q_rows))
                lat[which].append(time.perf_counter() - t)
                i += 1
                if (time.perf_counter() - t_block >= 1.0 and i >= 10) or i >= 2000:
                    break
            n_block = max(n_block, i)
        start += n_block
    d = np.asarray(lat["direct"])
    out: dict[str, Any] = {
        "kind": s.record.kind,
        "search_value": s.record.search_value,
        "direct_qps": round(len(d) / d.sum(), 2),
        "direct_p50_ms": round(float(np.median(d)) * 1e3, 4),
    }
    for which in names[1:]:
        b = np.asarray(lat[which])
        out[which] = {
            "calls": len(b),
            "qps": round(len(b) / b.sum(), 2),
            "p50_ms": round(float(np.median(b)) * 1e3, 4),
            "overhead_mean": round(float(b.mean() / d.mean() - 1), 4),
            "overhead_p50": round(float(np.median(b) / np.median(d) - 1), 4),
            "extra_us_p50": round(float(np.median(b) - np.median(d)) * 1e6, 1),
        }
    # where the extra time goes (per call, batch 1)
    x = raw_rows[0]
    scores, rows = s.index.search(q_rows[0], K)
    parts = {
        "prepare_us": _per_call(lambda: faiss_ops.prepare(x, "cosine")),
        "checks_us": _per_call(lambda: (np.asarray(x, dtype=np.float32), np.isfinite(x).all())),
    }
    parts["search_minus_index_us"] = (
        round(
            _per_call(lambda: s.search(x, K)) - _per_call(lambda: s.index.search(q_rows[0], K)), 1
        )
        if hasattr(s, "search")
        else None
    )
    if hasattr(s, "_hits"):
        parts["hits_us"] = _per_call(lambda: s._hits(scores, rows))
        hits = s._hits(scores, rows)
        parts["to_frame_us"] = _per_call(hits.to_frame)
        parts["records_us"] = _per_call(hits.records)
    out["breakdown_us"] = parts
    return out


def _per_call(fn: Any, seconds: float = 0.5) -> float:
    """Mean µs per call over ≥ 5 calls and ≥ ``seconds``."""
    fn()
    n, t = 0, time.perf_counter()
    while n < 5 or time.perf_counter() - t < seconds:
        fn()
        n += 1
    return round((time.perf_counter() - t) / n * 1e6, 1)


def peer_target(target: float, peer: dict[str, Any]) -> float:
    """The recall bob's auto build aims at beside a peer: the peer's, rounded up to 0.01."""
    return min(0.999, max(target, math.ceil(peer["recall_at_k"] * 100) / 100))


def run_autofaiss(work: Path, budget: str, target: float, python: str) -> dict[str, Any]:
    wd = work / f"autofaiss-{budget}"
    cmd = [
        python,
        str(HERE / "peers" / "autofaiss_run.py"),
        "--vectors",
        str(work / "vectors.npy"),
        "--queries",
        str(work / "queries.npy"),
        "--truth",
        str(work / "truth.npy"),
        "--max-memory",
        budget,
        "--metric",
        "ip",
        "--k",
        str(K),
        "--workdir",
        str(wd),
        "--target-recall",
        str(target),
    ]
    wd.mkdir(parents=True, exist_ok=True)
    with open(wd / "stderr.log", "w") as err:
        done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=err, text=True)
    if done.returncode:
        raise RuntimeError(f"autofaiss {budget} failed; see {wd / 'stderr.log'}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    for f in (wd / "knn.index",):  # the index file is large; its size is in the figures
        f.unlink(missing_ok=True)
    return out


# --- orchestration ---------------------------------------------------------------------------
class State:
    """Finished steps, persisted after each one so a rerun resumes."""

    def __init__(self, path: Path, fresh: bool, args: dict[str, Any]) -> None:
        self.path = path
        self.data: dict[str, Any] = {}
        if path.exists() and not fresh:
            data = json.loads(path.read_text())
            if data.get("args") == args:
                self.data = data
        self.data["args"] = args

    def step(self, key: str, fn: Any) -> Any:
        if key in self.data:
            return self.data[key]
        print(f"[{time.strftime('%H:%M:%S')}] {key} ...", file=sys.stderr, flush=True)
        started = time.perf_counter()
        self.data[key] = fn()
        gc.collect()  # drop the index a measurement loaded before the next one
        print(
            f"[{time.strftime('%H:%M:%S')}] {key} done in {time.perf_counter() - started:.0f} s",
            file=sys.stderr,
            flush=True,
        )
        self.path.write_text(json.dumps(self.data, indent=1, default=str))
        return self.data[key]


def machine() -> dict[str, Any]:
    import faiss

    model = ""
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = next(
            (ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name")),
            "",
        )
    except OSError:
        pass
    return {
        "cpu": model,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "faiss": faiss.__version__,
        "faiss_omp_threads": faiss.omp_get_max_threads(),
        "distance_compute_blas_threshold": faiss.cvar.distance_compute_blas_threshold,
        "ram_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--clusters", type=int, default=None, help="default: rows/500, 100..4000")
    p.add_argument("--spread", type=float, default=1.25, help="within-cluster spread (norm)")
    p.add_argument("--offset", type=float, default=0.6, help="cluster offset from its supercluster")
    p.add_argument("--noise", type=float, default=0.1, help="isotropic noise (norm)")
    p.add_argument("--rank", type=int, default=64, help="rank of a cluster's spread subspace")
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--budgets", default="4GB,1GB")
    p.add_argument("--target-recall", type=float, default=0.95)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None)
    p.add_argument("--skip-autofaiss", action="store_true")
    p.add_argument("--autofaiss-python", default=str(ROOT / ".venv-autofaiss" / "bin" / "python"))
    p.add_argument("--fresh", action="store_true", help="ignore finished steps of an earlier run")
    p.add_argument("--child-build", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_build:
        child_build(json.loads(args.child_build))
        return
    args.clusters = args.clusters or int(np.clip(args.rows // 500, 100, 4000))
    out = args.out or HERE / "out" / f"retrieval-{args.rows}x{args.dim}.json"
    work = HERE / "out" / f"retrieval-{args.rows}x{args.dim}"
    work.mkdir(parents=True, exist_ok=True)
    budgets = [b.strip() for b in args.budgets.split(",") if b.strip()]
    key_args = {
        k: getattr(args, k)
        for k in ("rows", "dim", "clusters", "spread", "queries", "target_recall", "seed")
    }
    for k, default in (("offset", 0.6), ("noise", 0.1), ("rank", 64)):  # older runs lack these
        if getattr(args, k) != default:
            key_args[k] = getattr(args, k)
    state = State(out.with_suffix(".partial.json"), args.fresh, key_args)
    state.data["machine"] = machine()

    state.step("data", lambda: make_data(args, work))
    raw = np.load(work / "queries_raw.npy")
    q = np.load(work / "queries.npy")
    truth = np.load(work / "truth.npy")

    # autofaiss first: it takes no recall target (it spends a query-time budget), so bob's
    # auto index under the same budget is built for the recall autofaiss reached (rounded up
    # to 0.01, and at least --target-recall); the goal is its q/s at at least its recall.
    peers: dict[str, Any] = {}
    targets = {b: args.target_recall for b in budgets}
    if not args.skip_autofaiss:
        for budget in budgets:
            peers[budget] = {
                "autofaiss": state.step(
                    f"autofaiss:{budget}",
                    lambda b=budget: run_autofaiss(
                        work, b, args.target_recall, args.autofaiss_python
                    ),
                )
            }
            targets[budget] = peer_target(args.target_recall, peers[budget]["autofaiss"])

    # builds: auto under each budget (the thing under test), then each kind; a kind whose
    # parameters equal an auto build's reuses that index (same factory, same training).
    builds: dict[str, Any] = {}
    for budget in budgets:
        builds[f"auto-{budget}"] = state.step(
            f"build:auto-{budget}",
            lambda b=budget: {
                **build(work, f"auto-{b}", "auto", b, targets[b]),
                "target_recall": targets[b],
            },
        )
    from bob_cache.retrieval.auto import resolve_kind

    index_of: dict[str, str] = {}
    for kind in KINDS:
        params = resolve_kind(kind, args.rows, args.dim, max_memory=None, params={}).params
        same = next(
            (
                n
                for n, b in builds.items()
                if b["record"]["kind"] == kind and b["record"]["params"] == params
            ),
            None,
        )
        if same:
            index_of[kind] = same
            continue
        builds[kind] = state.step(
            f"build:{kind}", lambda k=kind: build(work, k, k, None, args.target_recall)
        )
        index_of[kind] = kind

    bounds = state.step("bounds", lambda: measure_bounds(args.rows, args.dim))
    sweeps = {}
    for name in dict.fromkeys([*index_of.values(), *(f"auto-{b}" for b in budgets)]):
        sweeps[name] = state.step(f"sweep:{name}", lambda n=name: sweep_index(work, n, q, truth))
    bounds_after = state.step("bounds_after", lambda: measure_bounds(args.rows, args.dim))

    for budget in peers:
        peers[budget]["bob"] = state.step(
            f"bob:{budget}", lambda b=budget: measure_at_tuned(work, f"auto-{b}", q, truth)
        )
        peers[budget]["match"] = state.step(
            f"match:{budget}",
            lambda b=budget: match_peer(work, f"auto-{b}", peers[b]["autofaiss"], q, truth),
        )

    overheads = {}
    for kind in ("flat", "hnsw", "ivf"):
        name = index_of[kind]
        overheads[kind] = state.step(f"overhead:{kind}", lambda n=name: overhead(work, n, raw, q))

    report = {
        **state.data,
        "index_of_kind": index_of,
        "summary": summarize(
            state.data, index_of, budgets, builds, sweeps, bounds, bounds_after, peers, overheads
        ),
    }
    out.write_text(json.dumps(report, indent=1, default=str))
    print(report["summary"]["markdown"])
    print(f"\nfigures: {out}", file=sys.stderr)


# --- summary ---------------------------------------------------------------------------------
def summarize(
    data: dict,
    index_of: dict,
    budgets: list[str],
    builds: dict,
    sweeps: dict,
    bounds: dict,
    bounds_after: dict,
    peers: dict,
    overheads: dict,
) -> dict[str, Any]:
    m, a = data["machine"], data["args"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, {m['ram_gib']} GiB; faiss {m['faiss']} "
        f"({m['faiss_omp_threads']} OpenMP threads, distance_compute_blas_threshold "
        f"{m['distance_compute_blas_threshold']} = nq·d elements), numpy {m['numpy']}.",
        f"Data: {a['rows']:,} × {a['dim']} float16 in the store, {a['clusters']} clusters; "
        f"{a['queries']} fresh queries; truth shares the query's cluster for "
        f"{data['data']['truth_share_same_cluster']:.1%} of top-10 neighbours.",
        "",
        "| index | kind | params | bytes | build s | peak RSS GiB (growth) | bob-tuned value "
        "(recall on db rows) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, b in builds.items():
        r = b["record"]
        lines.append(
            f"| {name} | {r['kind']} | {_params(r['params'])} | {r['bytes'] / 2**30:.2f} GiB | "
            f"{r['build_seconds']:.0f} | {b['peak_rss_gib']:.2f} ({b['rss_growth_gib']:.2f}) | "
            f"{r['search_param'] or '-'}={r['search_value']} ({r['recall']:.3f}) |"
        )
    lines += [
        "",
        "| index | param | value | recall@10 | q/s batch 1 | q/s batch 1000 |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for name, s in sweeps.items():
        for pt in s["points"]:
            mark = " *" if pt["value"] == s["tuned"]["value"] else ""
            lines.append(
                f"| {name} | {s['search_param'] or '-'} | {pt['value']}{mark} | {pt['recall']:.4f} "
                f"| {pt['qps_batch1']:.1f} | {pt['qps_batch1000']:.1f} |"
            )
    flat = sweeps[index_of["flat"]]["points"][0]
    b1 = min(bounds["bound_batch1_qps"], bounds_after["bound_batch1_qps"])
    b1000 = min(bounds["bound_batch1000_qps"], bounds_after["bound_batch1000_qps"])
    lines += [
        "",
        "(* = the value bob's build tuned for the target recall)",
        "",
        "| exact (flat) | q/s | bound q/s | ratio | bound from |",
        "| --- | --- | --- | --- | --- |",
        f"| batch 1 | {flat['qps_batch1']:.2f} | {bounds['bound_batch1_qps']:.2f} / "
        f"{bounds_after['bound_batch1_qps']:.2f} | {flat['qps_batch1'] / b1:.2f} | "
        f"{a['rows'] * a['dim'] * 4 / 1e9:.2f} GB ÷ read bandwidth {bounds['read_GBps_1thread']}"
        f" (1 thr) / {bounds['read_GBps_2threads']} (2 thr) GB/s |",
        f"| batch 1000 | {flat['qps_batch1000']:.2f} | {bounds['bound_batch1000_qps']:.2f} / "
        f"{bounds_after['bound_batch1000_qps']:.2f} | {flat['qps_batch1000'] / b1000:.2f} | "
        f"2·N·D FLOPs/query ÷ sgemm {bounds['sgemm_GFLOPs']} / {bounds_after['sgemm_GFLOPs']} "
        "GFLOP/s |",
        "(bounds measured before / after the sweeps; ratio against the lower one)",
    ]
    goals: dict[str, Any] = {}
    if peers:
        lines += [
            "",
            "| budget | tool | index | search params | recall@10 | q/s batch 1 | "
            "q/s batch 1000 | build s | peak RSS GiB | index GiB |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for budget, pr in peers.items():
            bb, af = pr["bob"], pr["autofaiss"]
            build_ = builds[f"auto-{budget}"]
            rec = build_["record"]
            lines.append(
                f"| {budget} | bob auto (target {rec['target_recall']}) | {rec['kind']} "
                f"{_params(rec['params'])} | "
                f"{rec['search_param']}={rec['search_value']} | {bb['recall']:.4f} | "
                f"{bb['qps_batch1']:.1f} | {bb['qps_batch1000']:.1f} | "
                f"{rec['build_seconds']:.0f} | {build_['peak_rss_gib']:.2f} | "
                f"{rec['bytes'] / 2**30:.2f} |"
            )
            lines.append(
                f"| {budget} | autofaiss {af['version']} | {af['index_key']} | "
                f"{af['search_params']} | {af['recall_at_k']:.4f} | {af['qps_batch1']:.1f} | "
                f"{af['qps_batch1000']:.1f} | {af['build_seconds']:.0f} | {af['peak_rss_gib']:.2f}"
                f" | {af['index_bytes'] / 2**30:.2f} |"
            )
            # the same bob index at the cheapest sweep point reaching autofaiss's recall
            pts = sweeps[f"auto-{budget}"]["points"]
            match = next((p for p in pts if p["recall"] >= af["recall_at_k"]), None)
            match = match or pr.get("match", {}).get("at_peer_recall")
            for label, pt in (
                ("at autofaiss's recall", match),
                ("at autofaiss's search value", pr.get("match", {}).get("at_peer_value")),
            ):
                if pt:
                    lines.append(
                        f"| {budget} | bob auto index {label} | (same) | "
                        f"{rec['search_param']}={pt['value']} | {pt['recall']:.4f} | "
                        f"{pt['qps_batch1']:.1f} | {pt['qps_batch1000']:.1f} | | | |"
                    )
            goals[f"auto_vs_autofaiss_{budget}"] = {
                "met": bb["recall"] >= af["recall_at_k"] and bb["qps_batch1"] >= af["qps_batch1"],
                "recall_ratio": round(bb["recall"] / af["recall_at_k"], 4),
                "qps_batch1_ratio": round(bb["qps_batch1"] / af["qps_batch1"], 3),
                "qps_batch1000_ratio": round(bb["qps_batch1000"] / af["qps_batch1000"], 3),
                "index_at_peer_recall": match,
            }
    lines += [
        "",
        "| index (tuned) | direct q/s b1 | path | bob q/s b1 | overhead (mean) | overhead (p50) "
        "| extra µs p50 |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for kind, o in overheads.items():
        for path in ("search_vectors", "search"):
            if path not in o:
                continue
            v = o[path]
            lines.append(
                f"| {kind} ({o['kind']}, {o['search_value']}) | {o['direct_qps']:.1f} | {path} | "
                f"{v['qps']:.1f} | {v['overhead_mean']:+.1%} | {v['overhead_p50']:+.1%} | "
                f"{v['extra_us_p50']:.0f} |"
            )
            goals[f"overhead_{kind}_{path}_le_10pct"] = v["overhead_mean"] <= 0.10
        parts = ", ".join(f"{k} {v}" for k, v in o["breakdown_us"].items())
        lines.append(f"| {kind} | | breakdown (µs/call): {parts} | | | | |")
    goals["exact_batch1_vs_bound"] = round(flat["qps_batch1"] / b1, 3)
    goals["exact_batch1000_vs_bound"] = round(flat["qps_batch1000"] / b1000, 3)
    return {"markdown": "\n".join(lines), "goals": goals}


def _params(params: dict[str, Any]) -> str:
    return ",".join(f"{k}={v}" for k, v in params.items())


if __name__ == "__main__":
    main()
