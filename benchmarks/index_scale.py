"""Search past one machine's memory (issue 25): a sharded IVF-PQ build from the store on a Dask
LocalCluster, served from disk with exact re-ranking, against autofaiss building from the same
vectors exported by `bob-cache export`, with the same memory budget, in the same run.

Data: ``--rows`` × ``--dim`` clustered vectors (``retrieval_index.ClusterModel``), L2-normalized
(as CLIP embeddings are, so inner product = cosine for both tools) and written once through the
store API as float16. Queries: 1,000 fresh draws from the same clusters (held out: never
stored). Truth: exact top-10 by a streamed scan of the store, one shard at a time.

Steps (each kept in ``<work>/steps.json`` and skipped when rerun; ``--fresh`` starts over):

1. ``data``: the store; 2. ``truth``; 3. ``bob-build``: ``bob-cache index build --kind ivfpq
   --shards N --local-cluster W --max-memory B`` in a child, wall time and peak RSS of the
   whole process tree (the workers included) polled with psutil; 4. ``bob-search``: the first
   ``query`` open (merge to disk) and a second (open only), recall@10 and q/s at batch 1 and
   256 without and with ``--rerank``, after the mapped files are paged in as ``serve`` does
   (``Searcher.warmer``); 5. ``export``: ``bob-cache export`` (npy, float16);
   6. ``autofaiss``: ``benchmarks/peers/autofaiss_run.py --embeddings <export>/img_emb`` in its
   venv (``benchmarks/peers/setup_autofaiss.sh``) with ``--max-memory B``, wall and peak RSS
   polled the same way, recall@10 and q/s at its own search parameters; 7. ``serve``:
   ``bob-cache serve`` over the sharded index with ``--rerank``, once ``/health`` says its
   mapped files are paged in, p50/p99 of single-vector queries from one client.

``--only STEP ...`` reruns those steps (their earlier figures replaced) and skips the rest.

    python benchmarks/index_scale.py --rows 1000000                 # ~30 min on 2 cores
    python benchmarks/index_scale.py --rows 10000000 --nlist 4096   # the issue's size
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from retrieval_index import ClusterModel  # noqa: E402

DATASET, BACKBONE, KEY = "scale", "synthetic.clusters", "scaleclusters01"
K, SHARD_ROWS, BATCH = 10, 16384, 256
CLI = [sys.executable, "-m", "bob_cache.cli"]


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--clusters", type=int, default=2000)
    p.add_argument("--queries", type=int, default=1000)
    p.add_argument("--nlist", type=int, default=1024)
    p.add_argument("--pq-bytes", type=int, default=64)
    p.add_argument("--shards", type=int, default=8)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--max-memory", default="4GB")
    p.add_argument("--rerank", type=int, default=100)
    p.add_argument("--target-recall", type=float, default=0.95)
    p.add_argument("--autofaiss-python", default=str(HERE.parent / ".venv-autofaiss/bin/python"))
    p.add_argument("--serve-queries", type=int, default=500)
    p.add_argument("--work", type=Path, default=None)
    p.add_argument("--fresh", action="store_true")
    p.add_argument("--only", nargs="+", choices=list(STEPS), default=None,
                   help="rerun these steps (figures replaced), skip the rest")  # fmt: skip
    return p.parse_args()


# --- helpers ---------------------------------------------------------------------------------
def tree_peak(cmd: list[str], *, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd``; its wall time, stdout, and the peak RSS of its whole process tree."""
    import psutil

    started = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peak, done = [0], threading.Event()

    def poll() -> None:
        root = psutil.Process(proc.pid)
        while not done.wait(0.2):
            try:
                procs = [root, *root.children(recursive=True)]
                peak[0] = max(peak[0], sum(_rss(p) for p in procs))
            except psutil.NoSuchProcess:
                return

    watcher = threading.Thread(target=poll, daemon=True)
    watcher.start()
    out, err = proc.communicate()
    done.set()
    watcher.join()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:6])} ... failed ({proc.returncode}):\n{err[-3000:]}")
    return {"seconds": round(time.perf_counter() - started, 1),
            "peak_rss_gib": round(peak[0] / 2**30, 3), "stdout": out}  # fmt: skip


def _rss(p: Any) -> int:
    try:
        return int(p.memory_info().rss)
    except Exception:  # a process that just ended
        return 0


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(
        np.mean([len(set(f[:K]) & set(t[:K])) / K for f, t in zip(found, truth, strict=True)])
    )


def qps(search: Any, queries: np.ndarray, batch: int, seconds: float = 5.0) -> float:
    """Queries per second of ``search(q, K)`` over ``batch``-sized slices, for ``seconds``."""
    search(queries[:batch], K)  # warm-up
    n, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        for i in range(0, len(queries), batch):
            search(queries[i : i + batch], K)
            n += len(queries[i : i + batch])
            if time.perf_counter() - started >= seconds:
                break
    return round(n / (time.perf_counter() - started), 1)


def qps_median(search: Any, queries: np.ndarray, batch: int, windows: int = 3) -> float:
    """The median of ``windows`` 3-second :func:`qps` windows (this VM's speed drifts)."""
    return float(np.median([qps(search, queries, batch, 3.0) for _ in range(windows)]))


def coarse_ab(
    s: Any, config: Any, q: np.ndarray, truth: np.ndarray, rounds: int = 3
) -> dict[str, Any]:
    """Batch-1 q/s through the coarse graph against the flat quantizer, windows interleaved."""
    from bob_cache.pipelines.query import Searcher
    from bob_cache.retrieval import coarse

    saved, coarse.MIN_LISTS = coarse.MIN_LISTS, 1 << 62
    try:
        flat = Searcher.open(config)
    finally:
        coarse.MIN_LISTS = saved
    flat.warmer().start().wait()
    graph_qps, flat_qps = [], []
    for _ in range(rounds):
        graph_qps.append(qps(lambda x, k: s.search(x, k), q, 1, 3.0))
        flat_qps.append(qps(lambda x, k: flat.search(x, k), q, 1, 3.0))
    g, f = float(np.median(graph_qps)), float(np.median(flat_qps))
    return {"graph_qps_batch1": g, "flat_qps_batch1": f, "ratio": round(g / f, 3),
            "graph_recall": round(recall(s.search(q, K).rows, truth), 4),
            "flat_recall": round(recall(flat.search(q, K).rows, truth), 4),
            "windows": {"graph": graph_qps, "flat": flat_qps}}  # fmt: skip


# --- steps -----------------------------------------------------------------------------------
def step_data(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from bob_cache.stores import FeatureSetRequest, open_store, resolve_layout
    from bob_cache.stores.feature_set import ShardRows

    model = ClusterModel(args.dim, args.clusters, seed=0, spread=0.6)
    started = time.perf_counter()
    labels = model.labels(args.rows, np.random.default_rng([0, 1]))
    layout = resolve_layout(shard_rows=SHARD_ROWS)
    request = FeatureSetRequest(
        path=f"{DATASET}/train/{BACKBONE}/{KEY}", key=KEY,
        spec={"layer": "final", "pool": "head", "dtype": "float16", "synthetic": model.params},
        provenance={"dataset": {"name": DATASET, "class_names": []}, "split": "train",
                    "backbone": {"slug": BACKBONE, "name": BACKBONE, "arch": "synthetic"}},
        n_rows=args.rows, dim=args.dim, dtype="float16",
    )  # fmt: skip
    fs = open_store(work / "store", mode="a").require(request, layout, overwrite=True)
    for shard in range(layout.n_shards(args.rows)):
        a, b = layout.shard_bounds(shard, args.rows)
        x = model.sample(labels[a:b], np.random.default_rng([0, 2, shard]))
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        ids = [f"v{i:09d}" for i in range(a, b)]
        fs.write_shard(shard, x, ShardRows(labels[a:b], ids, [""] * (b - a), [""] * (b - a)))
    fs.finalize()
    rng = np.random.default_rng([0, 3])
    q = model.sample(model.labels(args.queries, rng), rng)
    q = (q / np.linalg.norm(q, axis=1, keepdims=True)).astype(np.float32)
    np.save(work / "queries.npy", q)
    return {"seconds": round(time.perf_counter() - started, 1), "model": model.params}


def step_truth(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Exact top-K of every query by a streamed scan of the store (one shard in memory)."""
    import faiss

    from bob_cache.stores import open_store

    fs = open_store(work / "store").get(f"{DATASET}/train/{BACKBONE}/{KEY}")
    q = np.load(work / "queries.npy")
    heap = faiss.ResultHeap(len(q), K, keep_max=True)
    started = time.perf_counter()
    for shard in range(fs.n_shards):
        a, b = fs.layout.shard_bounds(shard, fs.n_rows)
        x = np.asarray(fs.features[a:b], dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)  # what the index holds (cosine)
        d, i = faiss.knn(q, x, K, metric=faiss.METRIC_INNER_PRODUCT)
        heap.add_result(d, np.where(i >= 0, i + a, -1))
    heap.finalize()
    np.save(work / "truth.npy", heap.I)
    return {"seconds": round(time.perf_counter() - started, 1)}


def step_bob_build(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    cmd = [*CLI, "index", "build", "--store", str(work / "store"), "--dataset", DATASET,
           "--backbone", BACKBONE, "--kind", "ivfpq", "--nlist", str(args.nlist),
           "--pq-bytes", str(args.pq_bytes), "--shards", str(args.shards),
           "--local-cluster", str(args.workers), "--max-memory", args.max_memory,
           "--target-recall", str(args.target_recall), "--force", "--json", "-q"]  # fmt: skip
    run = tree_peak(cmd)
    summary = json.loads(run.pop("stdout"))
    record = summary["record"]
    return {**run, "command": " ".join(cmd[2:]), "nprobe": record["search_value"],
            "tuned_recall": record["recall"], "index_bytes": record["bytes"],
            "parts": len(record.get("parts") or []), "notes": summary.get("notes"),
            "rerank_tuning": record.get("rerank")}  # fmt: skip


def step_bob_search(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    from bob_cache.pipelines.query import QueryConfig, Searcher

    shutil.rmtree(work / "cache", ignore_errors=True)
    q, truth = np.load(work / "queries.npy"), np.load(work / "truth.npy")
    base = {"index_cache": str(work / "cache")}
    out: dict[str, Any] = {}
    for name, extra in (("plain", {}), ("rerank", {"rerank": args.rerank})):
        started = time.perf_counter()
        s = Searcher.open(QueryConfig(str(work / "store"), DATASET, BACKBONE, **base, **extra))
        first = time.perf_counter() - started
        started = time.perf_counter()
        config = QueryConfig(str(work / "store"), DATASET, BACKBONE, **base, **extra)
        s = Searcher.open(config)
        again = time.perf_counter() - started
        warmer = s.warmer().start()  # as `serve` does: the mapped files paged in, if they fit
        warmer.wait()

        def search(x: np.ndarray, k: int, s: Any = s) -> Any:
            return s.search(x, k)

        out[name] = {
            "first_open_seconds": round(first, 2), "open_seconds": round(again, 3),
            "search_value": s.search_value, "tuned_recall": round(s.expected_recall, 4),
            "warm": warmer.status(),
            "coarse_graph": s.coarse_graph,
            "recall_at_10": round(recall(s.search(q, K).rows, truth), 4),
            "qps_batch1": qps_median(search, q, 1),
            f"qps_batch{BATCH}": qps_median(search, q, BATCH),
        }  # fmt: skip
        if s.coarse_graph and name == "rerank":
            out[name]["coarse_ab"] = coarse_ab(s, config, q, truth)
    out["rerank_k"] = args.rerank
    return out


def step_export(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    shutil.rmtree(work / "export", ignore_errors=True)
    cmd = [*CLI, "export", "--store", str(work / "store"), "--dataset", DATASET, "--backbone",
           BACKBONE, "--out", str(work / "export"), "--format", "npy", "--json", "-q"]  # fmt: skip
    run = tree_peak(cmd)
    summary = json.loads(run.pop("stdout"))
    return {**run, "files": len(summary["files"]), "rows": summary["rows"]}


def step_autofaiss(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    if not Path(args.autofaiss_python).exists():
        return {"skipped": f"no {args.autofaiss_python}: run benchmarks/peers/setup_autofaiss.sh"}
    wd = work / "autofaiss"
    shutil.rmtree(wd, ignore_errors=True)
    cmd = [args.autofaiss_python, str(HERE / "peers" / "autofaiss_run.py"), "--embeddings",
           str(work / "export" / "img_emb"), "--queries", str(work / "queries.npy"), "--truth",
           str(work / "truth.npy"), "--max-memory", args.max_memory, "--metric", "ip", "--k",
           str(K), "--workdir", str(wd), "--batch", str(BATCH)]  # fmt: skip
    run = tree_peak(cmd, env={**os.environ, "OMP_WAIT_POLICY": "PASSIVE"})
    result = json.loads(run.pop("stdout").strip().splitlines()[-1])
    keep = ("index_key", "search_params", "build_seconds", "index_bytes", "recall_at_k",
            "qps_batch1", "qps_batch1000", "version", "faiss_version")  # fmt: skip
    return {**run, **{k: result.get(k) for k in keep}}


def step_serve(args: argparse.Namespace, work: Path) -> dict[str, Any]:
    import httpx

    port = 8731
    cmd = [*CLI, "serve", "--store", str(work / "store"), "--dataset", DATASET, "--backbone",
           BACKBONE, "--port", str(port), "--index-cache", str(work / "cache"), "--rerank",
           str(args.rerank)]  # fmt: skip
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    try:
        health: dict[str, Any] = {}
        for _ in range(1200):  # up, and its mapped files paged in (GET /health: warm)
            try:
                health = httpx.get(f"{url}/health", timeout=1).json()
                if health["warm"]["state"] != "warming":
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        else:
            raise RuntimeError(f"serve did not finish warming in 10 minutes: {health}")
        q = np.load(work / "queries.npy")
        times = []
        with httpx.Client() as client:
            for i in range(args.serve_queries):
                body = {"vectors": [q[i % len(q)].tolist()], "k": K}
                started = time.perf_counter()
                assert client.post(f"{url}/query/vector", json=body).status_code == 200
                times.append(time.perf_counter() - started)
    finally:
        server.terminate()
        server.wait()
    ms = np.asarray(times[10:]) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2), "queries": len(ms),
            "rerank": args.rerank, "search_value": health.get("search_value"),
            "warm": health.get("warm")}  # fmt: skip


STEPS = {"data": step_data, "truth": step_truth, "bob-build": step_bob_build,
         "bob-search": step_bob_search, "export": step_export, "autofaiss": step_autofaiss,
         "serve": step_serve}  # fmt: skip


def main() -> None:
    args = parse_args()
    work = args.work or HERE / "out" / f"index-scale-{args.rows}x{args.dim}"
    if args.fresh:
        shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True, exist_ok=True)
    done_file = work / "steps.json"
    done = json.loads(done_file.read_text()) if done_file.exists() else {}
    for name, step in STEPS.items():
        if (name in done and not args.only) or (args.only and name not in args.only):
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", file=sys.stderr, flush=True)
        done[name] = step(args, work)
        done_file.write_text(json.dumps(done, indent=2))
        print(f"  {json.dumps(done[name])[:400]}", file=sys.stderr, flush=True)
    report = {"benchmark": "index-scale", "rows": args.rows, "dim": args.dim,
              "machine": {"cpu": platform.processor() or platform.machine(),
                          "cores": os.cpu_count()},
              "command": "python benchmarks/index_scale.py " + " ".join(sys.argv[1:]),
              "steps": done}  # fmt: skip
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
