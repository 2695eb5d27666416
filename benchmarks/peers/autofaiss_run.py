"""Peer benchmark: autofaiss builds and tunes a FAISS index under a memory budget; measure it.

Run with the autofaiss venv's python (see setup_autofaiss.sh), e.g.::

    .venv-autofaiss/bin/python benchmarks/peers/autofaiss_run.py --vectors V.npy --queries Q.npy \
        --truth T.npy --max-memory 4GB --metric ip --k 10 --workdir DIR

Inputs: V.npy float32 (N, D) database vectors (opened with mmap_mode='r'; L2-normalized when
--metric ip), Q.npy float32 (nq, D) queries, T.npy int64 (nq, >=k) exact top-k row ids per query.

What autofaiss decides by itself (nothing here is hand-tuned):

* the index key, from N, D and ``max_index_memory_usage`` alone
  (``autofaiss.external.optimize.get_optimal_index_keys_v2``): ``HNSW{M}`` with
  M = min(32, (budget / (4 N) - D) / 2) when M >= 8 (full float vectors plus the graph fit);
  otherwise ``IVF{c},Flat`` when N < 1M and the flat vectors fit; otherwise
  ``OPQ{m}_{d},IVF{c}[_HNSW32],PQ{m}x8`` with the largest PQ code that fits. The budget bounds
  the estimated size of the *index* only, not the memory used while building it
  (``current_memory_available`` is a separate, looser check).
* the search parameters (``get_optimal_hyperparameters``): first the smallest nprobe / efSearch at
  which searches for ``min_nearest_neighbors_to_retrieve`` neighbours return >= 99% non-empty
  slots (result *coverage*, not recall), then the *largest* value whose single-query latency
  (k=40, database vectors as queries, measured on this machine while building) stays under
  ``max_index_query_time_ms`` (default 10 ms). So autofaiss targets a query-time budget, not a
  recall: it spends the whole latency budget, and the outcome depends on machine speed and load.

``--target-recall``: autofaiss 2.18 has no recall target (no parameter of ``build_index`` or
``tune_index`` takes one, and ``score_index`` only reports recall after the fact). The value is
accepted, recorded, and compared with the measured recall (``target_recall_met``); it does not
influence the build. ``--max-query-time-ms`` is autofaiss's own knob and defaults to its default.

build_seconds covers all of ``build_index``: writing the array to a temporary .npy (with --feed
array, autofaiss's own path for an ndarray), training, adding, parameter tuning, autofaiss's
~10 s speed/"fast metrics" pass, and writing the index. Temporary files go under --workdir.

Surprises worth knowing: on small data the latency budget buys near-exhaustive search (20k x 64:
HNSW32 with efSearch ~4700, or IVF512,Flat with nprobe=512 = all lists). On the OPQ/PQ path, OPQ
training is slow (OPQ48_96 on 20k x 64 took ~13 min on 2 busy cores); faiss's OpenMP spin-waiting
makes that ~2x worse when the cores are shared, so OMP_WAIT_POLICY=PASSIVE helps on a busy machine
(set it alike for every peer).

``--val-queries``/``--val-truth``: a second query set on which the recall of autofaiss's own
pick is reported too (``val_recall_at_k``), so that a comparison can set another tool's target
from it without looking at the reported queries.

``--curve 16,32,64``: no build; load ``knn.index`` and ``index_infos.json`` from --workdir and
measure recall@k and queries/s at each value of autofaiss's own search parameter (the one its
``index_param`` string leads with: efSearch for HNSW, nprobe for IVF; for IVF-HNSW the quantizer's
efSearch follows autofaiss's rule, 2 × nprobe), stopping after the first value whose recall
reaches --stop-recall. Only --queries, --truth, --k, --workdir and the timing options apply.

stdout gets exactly one JSON line; autofaiss's logging, tqdm and faiss prints go to stderr.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--vectors", help="float32 (N, D) .npy database vectors (build only)")
    p.add_argument(
        "--embeddings",
        help="a folder of .npy files (float16 or float32; e.g. `bob-cache export`'s img_emb/), "
        "read by embedding_reader, instead of --vectors (build only)",
    )
    p.add_argument("--queries", required=True, help="float32 (nq, D) .npy queries")
    p.add_argument("--truth", required=True, help="int64 (nq, >=k) .npy exact neighbour ids")
    p.add_argument("--max-memory", help="autofaiss max_index_memory_usage, e.g. 4GB (build only)")
    p.add_argument("--metric", choices=("ip", "l2"), help="build only")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--workdir", required=True, help="index, infos and temporary files go here")
    p.add_argument(
        "--target-recall",
        type=float,
        default=None,
        help="recorded only: autofaiss has no recall target (see module docstring)",
    )
    p.add_argument(
        "--max-query-time-ms",
        type=float,
        default=10.0,
        help="autofaiss max_index_query_time_ms (its default: 10)",
    )
    p.add_argument(
        "--current-memory",
        default="16G",
        help="autofaiss current_memory_available (RAM it may use while building)",
    )
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="faiss OMP threads")
    p.add_argument(
        "--feed",
        choices=("array", "folder"),
        default="array",
        help="array: pass the (memory-mapped) ndarray, which autofaiss copies to a temporary .npy; "
        "folder: pass a folder holding only a symlink to --vectors (no copy)",
    )
    p.add_argument(
        "--min-seconds", type=float, default=2.0, help="minimum timed span per QPS figure"
    )
    p.add_argument("--batch", type=int, default=1000, help="batch size of the batched QPS figure")
    p.add_argument("--val-queries", help="float32 (nv, D) .npy second query set (recall only)")
    p.add_argument("--val-truth", help="int64 (nv, >=k) .npy exact neighbour ids of --val-queries")
    p.add_argument("--curve", help="comma-separated search-parameter values: measure, no build")
    p.add_argument("--stop-recall", type=float, default=0.999, help="--curve stops after this")
    args = p.parse_args(argv)
    if not args.curve and not (
        (args.vectors or args.embeddings) and args.max_memory and args.metric
    ):
        p.error("a build needs --vectors (or --embeddings), --max-memory and --metric")
    return args


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: KiB


def search_params(index: Any) -> dict[str, Any]:
    """The search-time parameters actually set on the index (HNSW, IVF, IVF-HNSW, IVFPQ)."""
    import faiss

    out: dict[str, Any] = {}
    idx = faiss.downcast_index(index)
    if isinstance(idx, faiss.IndexPreTransform):
        idx = faiss.downcast_index(idx.index)
    if isinstance(idx, faiss.IndexHNSW):
        out["efSearch"] = int(idx.hnsw.efSearch)
        out["efConstruction"] = int(idx.hnsw.efConstruction)
        out["M"] = int(idx.hnsw.nb_neighbors(1))
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError:
        ivf = None
    if ivf is not None:
        out["nlist"] = int(ivf.nlist)
        out["nprobe"] = int(ivf.nprobe)
        quantizer = faiss.downcast_index(ivf.quantizer)
        if isinstance(quantizer, faiss.IndexHNSW):
            out["quantizer_efSearch"] = int(quantizer.hnsw.efSearch)
        ivf = faiss.downcast_index(ivf)
        if isinstance(ivf, faiss.IndexIVFPQ):
            # autofaiss sets "ht=2048"; faiss maps ht >= 8 * code_size to 0 = polysemous off.
            out["polysemous_ht"] = int(ivf.polysemous_ht)
    return out


def recall_at_k(ids: np.ndarray, truth: np.ndarray, k: int) -> float:
    pairs = zip(ids, truth, strict=True)
    hits = [len(set(row[:k].tolist()) & set(t[:k].tolist())) for row, t in pairs]
    return float(np.mean(hits)) / k


def qps_batch1(index: Any, queries: np.ndarray, k: int, min_seconds: float) -> tuple[float, int]:
    """One query per search call, cycling through the queries until min_seconds have passed."""
    for i in range(min(10, len(queries))):  # warm-up
        index.search(queries[i : i + 1], k)
    n = 0
    t0 = time.perf_counter()
    while True:
        for i in range(len(queries)):
            index.search(queries[i : i + 1], k)
            n += 1
            if time.perf_counter() - t0 >= min_seconds:
                return n / (time.perf_counter() - t0), n


def qps_batched(
    index: Any, queries: np.ndarray, k: int, batch: int, min_seconds: float
) -> tuple[float, int]:
    """Search the first `batch` queries in one call, repeated until min_seconds have passed."""
    q = np.ascontiguousarray(queries[:batch])
    index.search(q[: min(10, len(q))], k)  # warm-up
    n = 0
    t0 = time.perf_counter()
    while True:
        index.search(q, k)
        n += len(q)
        if time.perf_counter() - t0 >= min_seconds:
            return n / (time.perf_counter() - t0), n


def run(args: argparse.Namespace) -> dict[str, Any]:
    import autofaiss
    import faiss
    from autofaiss import build_index

    workdir = os.path.abspath(args.workdir)
    os.makedirs(workdir, exist_ok=True)
    # build_index saves an ndarray to a TemporaryDirectory (and faiss temp files); keep them here.
    tmp = os.path.join(workdir, "tmp")
    os.makedirs(tmp, exist_ok=True)
    tempfile.tempdir = tmp

    queries = np.ascontiguousarray(np.load(args.queries), dtype=np.float32)
    truth = np.load(args.truth)
    if args.embeddings:  # a folder of .npy files, as autofaiss reads them
        files = sorted(Path(args.embeddings).glob("*.npy"))
        shapes = [np.load(f, mmap_mode="r").shape for f in files]
        n, d = sum(s[0] for s in shapes), shapes[0][1]
        vectors = None
    else:
        vectors = np.load(args.vectors, mmap_mode="r")
        if vectors.dtype != np.float32 or vectors.ndim != 2:
            raise SystemExit(
                f"--vectors must be float32 (N, D), got {vectors.dtype} {vectors.shape}"
            )
        n, d = vectors.shape
    if queries.shape[1] != d:
        raise SystemExit(f"queries dim {queries.shape[1]} != vectors dim {d}")
    if truth.shape[0] != queries.shape[0] or truth.shape[1] < args.k:
        raise SystemExit(f"truth shape {truth.shape} does not match {queries.shape[0]} queries x k")
    print(f"vectors {n} x {d}, queries {len(queries)}, k {args.k}", file=sys.stderr)

    faiss.omp_set_num_threads(args.threads)
    if args.embeddings:
        embeddings: Any = str(Path(args.embeddings).resolve())
    elif args.feed == "folder":
        feed_dir = os.path.join(workdir, "embeddings")
        os.makedirs(feed_dir, exist_ok=True)
        link = os.path.join(feed_dir, "vectors.npy")
        if os.path.lexists(link):
            os.remove(link)
        os.symlink(os.path.abspath(args.vectors), link)
        embeddings: Any = feed_dir
    else:
        embeddings = vectors

    index_path = os.path.join(workdir, "knn.index")
    infos_path = os.path.join(workdir, "index_infos.json")
    t0 = time.perf_counter()
    index, infos = build_index(
        embeddings=embeddings,
        index_path=index_path,
        index_infos_path=infos_path,
        save_on_disk=True,
        file_format="npy",
        max_index_memory_usage=args.max_memory,
        current_memory_available=args.current_memory,
        max_index_query_time_ms=args.max_query_time_ms,
        min_nearest_neighbors_to_retrieve=args.k,
        metric_type=args.metric,
        nb_cores=args.threads,
        use_gpu=False,
        make_direct_map=False,  # only for reconstruct() on IVF; adds 8 B/vector
        should_be_memory_mappable=False,  # default; True would rule out HNSW
        verbose=logging.INFO,
    )
    build_seconds = time.perf_counter() - t0
    if index is None or infos is None:
        raise SystemExit("autofaiss build_index returned no index (see its log above)")
    del embeddings
    rss_after_build = peak_rss_gib()

    # build_index set omp threads to nb_cores; set again in case anything changed it.
    faiss.omp_set_num_threads(args.threads)
    _, ids = index.search(queries, args.k)
    recall = recall_at_k(ids, truth, args.k)
    val_recall = None
    if args.val_queries:
        vq = np.ascontiguousarray(np.load(args.val_queries), dtype=np.float32)
        val_recall = round(
            recall_at_k(index.search(vq, args.k)[1], np.load(args.val_truth), args.k), 5
        )
    qps1, n1 = qps_batch1(index, queries, args.k, args.min_seconds)
    qpsb, nb = qps_batched(index, queries, args.k, args.batch, args.min_seconds)

    result: dict[str, Any] = {
        "peer": "autofaiss",
        "version": autofaiss.__version__,
        "faiss_version": faiss.__version__,
        "numpy_version": np.__version__,
        "index_key": infos.get("index_key"),
        "search_params": infos.get("index_param"),
        "search_params_set": search_params(index),
        "n": int(n),
        "dim": int(d),
        "metric": args.metric,
        "k": args.k,
        "max_memory": args.max_memory,
        "current_memory": args.current_memory,
        "max_query_time_ms": args.max_query_time_ms,
        "feed": args.feed,
        "build_seconds": round(build_seconds, 3),
        "peak_rss_gib": round(peak_rss_gib(), 4),
        "peak_rss_gib_after_build": round(rss_after_build, 4),
        "index_bytes": os.path.getsize(index_path),
        "recall_at_k": round(recall, 5),
        "val_recall_at_k": val_recall,
        "qps_batch1": round(qps1, 1),
        "qps_batch1_queries": n1,
        "qps_batch1000": round(qpsb, 1),
        "qps_batch1000_batch": min(args.batch, len(queries)),
        "qps_batch1000_queries": nb,
        "threads": args.threads,
        "target_recall": args.target_recall,
        "target_recall_supported": False,
        "target_recall_met": None if args.target_recall is None else recall >= args.target_recall,
        "autofaiss_infos": {
            key: (round(v, 4) if isinstance(v, float) else v)
            for key, v in infos.items()
            if key not in ("index_path",)
        },
    }
    return result


def param_string(index_param: str, value: int) -> str:
    """autofaiss's search-parameter string with its leading parameter set to ``value``."""
    pairs = dict(p.split("=", 1) for p in index_param.split(",") if p)
    primary = "nprobe" if "nprobe" in pairs else "efSearch"
    if primary == "nprobe" and "efSearch" in pairs:  # IVF-HNSW: autofaiss uses 2 x nprobe
        pairs["efSearch"] = str(2 * value)
    pairs[primary] = str(value)
    return ",".join(f"{k}={v}" for k, v in pairs.items())


def run_curve(args: argparse.Namespace) -> dict[str, Any]:
    """Recall and queries/s of the built index along its own search parameter."""
    import faiss

    workdir = os.path.abspath(args.workdir)
    index = faiss.read_index(os.path.join(workdir, "knn.index"))
    with open(os.path.join(workdir, "index_infos.json")) as f:
        infos = json.load(f)
    own = infos.get("index_param") or ""
    queries = np.ascontiguousarray(np.load(args.queries), dtype=np.float32)
    truth = np.load(args.truth)
    faiss.omp_set_num_threads(args.threads)
    values = [int(v) for v in args.curve.split(",") if v.strip()] if own else [0]
    points = []
    for value in values:
        params = param_string(own, value) if own else ""
        if params:
            faiss.ParameterSpace().set_index_parameters(index, params)
        qpsb, _ = qps_batched(index, queries, args.k, args.batch, args.min_seconds)
        recall = recall_at_k(index.search(queries, args.k)[1], truth, args.k)
        qps1, n1 = qps_batch1(index, queries, args.k, args.min_seconds)
        points.append(
            {
                "value": value or None,
                "params": params,
                "recall": round(recall, 5),
                "qps_batch1": round(qps1, 2),
                "batch1_queries": n1,
                "qps_batch1000": round(qpsb, 2),
            }
        )
        print(f"  autofaiss {params or 'exact'}: {points[-1]}", file=sys.stderr, flush=True)
        if recall >= args.stop_recall:
            break
    return {
        "peer": "autofaiss",
        "faiss_version": faiss.__version__,
        "index_key": infos.get("index_key"),
        "own_params": own,
        "param": (own.split(",")[0].split("=")[0] or None) if own else None,
        "points": points,
    }


def _positional_opq() -> None:
    """autofaiss 2.18.0 calls ``faiss.OPQMatrix(d, M=..., d2=...)``, which the SWIG bindings
    of faiss ≥ 1.8 refuse (no keyword arguments); it picks OPQ for sets above a few million
    rows. Pass the same arguments positionally (the constructor is ``OPQMatrix(d, M, d2)``)."""
    import faiss

    opq = faiss.OPQMatrix
    if getattr(opq, "positional_shim", False):
        return

    def positional(d: int = 0, M: int = 1, d2: int = -1) -> Any:
        return opq(d, M, d2)

    positional.positional_shim = True  # type: ignore[attr-defined]
    faiss.OPQMatrix = positional


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    _positional_opq()
    # Everything but the final JSON goes to stderr, including C-level prints from faiss:
    # point fd 1 at stderr while running, restore it for the result.
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        result = run_curve(args) if args.curve else run(args)
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
