"""Single-image query latency through the HTTP service (issues 4 and 10), at 10k and 1M rows.

A real feature set is extracted first (``bob-cache extract --backbone resnet18 --random-init``
over a few ``builtin:digits`` images) to get resnet18's exact provenance; larger synthetic
feature sets then copy its spec and provenance (so the service rebuilds the same resnet18 to
embed uploads) but hold 10k and 1M clustered 512-d rows. Each gets an index built with
``--kind auto``. For each size, server processes (``--server``) run the service
(``create_app`` under uvicorn, in a thread, on a free loopback port), which answers
``POST /query/image`` uploads of one JPEG (scikit-image's ``chelsea``, 451×300) from a
bounded load test (httpx clients, concurrency 1 then 4).

Two clients, in alternating rounds against the same server: ``in-process`` (the load
client's threads live in the server's process and share its GIL) and ``separate process``
(a child Python process, ``--client``, runs the same load client and returns its
per-request timestamps as JSON). Two variants of the service, in alternating server
processes: ``request-thread`` (the model built, run and the index searched on whichever
thread took the request, as before issue 10) and ``compute-thread`` (all of that on the
process's one compute thread, ``query.on_compute_thread``).

Every request carries an ``x-bench-seq`` header; the server records timestamps of its phases
(request received, body read, multipart parsed, endpoint entered in the worker thread,
header check, decode, transform, forward, search, answer built, response sent) by wrapping
the functions the service calls, and the client records when it sent and when it had the
parsed answer. ``time.perf_counter`` is ``CLOCK_MONOTONIC`` on Linux, so the child's and the
server's timestamps share one clock.

Baselines measured in the same run, in this (orchestrating) process, which serves nothing:
the bare timm resnet18 forward on one preprocessed image (eval mode, ``torch.inference_mode``;
before and after the load tests; in the main thread, and in a second thread while the
first one's OpenMP team lives), and, in each server process before it serves, the query
path's pieces called directly.

    python benchmarks/serve_latency.py                 # 10k and 1M rows
    python benchmarks/serve_latency.py --sizes 10000   # quick check
"""

from __future__ import annotations

import argparse
import gc
import io
import itertools
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(1, str(HERE.parent))  # the repository root: tests.loadtest

from retrieval_index import ClusterModel, machine  # noqa: E402

SOURCE = "servesrc"
MANAGED = {
    "bob_cache",
    "key",
    "spec",
    "storage",
    "n_rows",
    "dim",
    "created",
    "rows_listed",
    "complete",
    "n_invalid",
    "completed",
}


def extract_source(store: Path) -> dict[str, Any]:
    """Attributes of a real resnet18 (random init) feature set, extracted if missing."""
    from bob_cache.stores import open_store

    def find() -> dict[str, Any] | None:
        if not store.exists():
            return None
        for fs in open_store(store).feature_sets():
            if fs.attrs["dataset"]["name"] == SOURCE and fs.complete:
                return dict(fs.attrs)
        return None

    if find() is None:
        cli = Path(sys.executable).parent / "bob-cache"
        cmd = [
            str(cli),
            "extract",
            "--data",
            "builtin:digits",
            "--name",
            SOURCE,
            "--backbone",
            "resnet18",
            "--random-init",
            "--store",
            str(store),
            "--split",
            "train",
            "--limit",
            "16",
            "--workers",
            "0",
            "--quiet",
        ]
        subprocess.run(cmd, check=True)
    attrs = find()
    assert attrs is not None
    return attrs


def synthetic_set(store: Path, src: dict[str, Any], rows: int, seed: int = 0) -> str:
    """A complete feature set of ``rows`` clustered vectors with ``src``'s spec/provenance."""
    from bob_cache.stores import FeatureSetRequest, open_store, resolve_layout
    from bob_cache.stores.feature_set import ShardRows

    name = f"serve{rows}"
    fstore = open_store(store, mode="a")
    for fs in fstore.feature_sets():
        if fs.attrs["dataset"]["name"] == name and fs.complete:
            return name
    dim = int(src["dim"])
    provenance = {k: v for k, v in src.items() if k not in MANAGED}
    provenance["dataset"] = {**src["dataset"], "name": name, "synthetic_rows": rows}
    model = ClusterModel(dim, int(np.clip(rows // 500, 20, 4000)), seed=seed, spread=1.25)
    labels = model.labels(rows, np.random.default_rng([seed, 1]))
    layout = resolve_layout(shard_rows=4096)
    request = FeatureSetRequest(
        path=f"{name}/train/{src['backbone']['slug']}/{src['key']}",
        key=src["key"],
        spec=src["spec"],
        provenance=provenance,
        n_rows=rows,
        dim=dim,
        dtype=src["spec"].get("dtype", "float16"),
    )
    fs = fstore.require(request, layout, overwrite=True)
    for shard in range(layout.n_shards(rows)):
        a, b = layout.shard_bounds(shard, rows)
        x = model.sample(labels[a:b], np.random.default_rng([seed, 2, shard]))
        blank = [""] * (b - a)
        ids = [f"img/{i:08d}.jpg" for i in range(a, b)]
        meta = ShardRows(labels[a:b] % 10, ids, blank, blank)
        fs.write_shard(shard, np.maximum(x * 4, 0), meta)  # post-ReLU-like
    fs.finalize()
    return name


SEQ = "x-bench-seq"
# A request's timestamps, in order: the client's (sent, recv) around the server's. Each phase
# is the time from the previous mark to its own, so the phases add up to the latency.
PHASES = [
    ("sent", "client: request sent"),
    ("asgi", "request to the app (TCP, uvicorn's HTTP parsing)"),
    ("body", "body received"),
    ("parsed", "multipart parsed"),
    ("dispatch", "validation, dependencies"),
    ("endpoint", "threadpool hop into the endpoint"),
    ("query", "upload read"),
    ("decode0", "header check, pixel budget"),
    ("decode1", "decode (PIL, RGB)"),
    ("transform1", "transform (resize, crop, to tensor)"),
    ("forward0", "stack, normalize"),
    ("forward1", "forward (resnet18)"),
    ("search1", "search (prepare + index)"),
    ("answer1", "answer built (records, dict)"),
    ("returned", "threadpool hop back"),
    ("response0", "response validation, serialization"),
    ("response1", "response sent"),
    ("recv", "answer received, JSON parsed (client)"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """uvicorn serving ``app`` in a daemon thread on a free loopback port."""

    def __init__(self, app: Any) -> None:
        import uvicorn

        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        deadline = time.time() + 60
        while not self.server.started:
            if time.time() > deadline or not self.thread.is_alive():
                raise RuntimeError("uvicorn did not start")
            time.sleep(0.05)
        return f"http://127.0.0.1:{self.port}"

    def __exit__(self, *exc: Any) -> None:
        self.server.should_exit = True
        self.thread.join(30)


class Probe:
    """Server-side timestamps of each request carrying an ``x-bench-seq`` header.

    :meth:`app` wraps the ASGI app (request received, body read, response sent);
    :meth:`patched` wraps the functions the service calls on the way (FastAPI's dispatch to
    the threadpool, the multipart parser, the endpoint's first call, decode, transform,
    forward, search, answer). A context variable names the request, so the marks land on it
    in the event loop and in the worker thread alike.
    """

    def __init__(self) -> None:
        self.current: ContextVar[dict[str, float] | None] = ContextVar("request", default=None)
        self.marks: dict[str, dict[str, float]] = {}
        self.torch_threads: dict[str, int] = {}

    def mark(self, name: str) -> None:
        rec = self.current.get()
        if rec is not None:
            rec[name] = time.perf_counter()

    def app(self, app: Any) -> Any:
        async def probed(scope: dict, receive: Callable, send: Callable) -> None:
            seq = dict(scope.get("headers", [])).get(SEQ.encode())
            if scope["type"] != "http" or seq is None:
                return await app(scope, receive, send)
            rec = self.marks[seq.decode()] = {"asgi": time.perf_counter()}
            token = self.current.set(rec)

            async def received() -> dict:
                message = await receive()
                if message["type"] == "http.request" and not message.get("more_body"):
                    rec.setdefault("body", time.perf_counter())
                return message

            async def sent(message: dict) -> None:
                if message["type"] == "http.response.start":
                    rec["response0"] = time.perf_counter()
                await send(message)
                if message["type"] == "http.response.body" and not message.get("more_body"):
                    rec["response1"] = time.perf_counter()

            try:
                await app(scope, received, sent)
            finally:
                self.current.reset(token)

        return probed

    def around(self, fn: Callable, before: str | None, after: str | None) -> Callable:
        def wrapped(*a: Any, **kw: Any) -> Any:
            if before:
                self.mark(before)
            out = fn(*a, **kw)
            if after:
                self.mark(after)
            return out

        return wrapped

    def around_async(self, fn: Callable, before: str | None, after: str | None) -> Callable:
        async def wrapped(*a: Any, **kw: Any) -> Any:
            if before:
                self.mark(before)
            out = await fn(*a, **kw)
            if after:
                self.mark(after)
            return out

        return wrapped

    @contextmanager
    def patched(self, searcher: Any) -> Iterator[None]:
        import fastapi.routing
        import starlette.formparsers
        import torch

        from bob_cache.pipelines import query, serve

        emb = searcher.embedder
        check_batch = serve._check_batch

        def entered(*a: Any) -> None:
            self.mark("endpoint")
            self.torch_threads.setdefault("endpoint thread", torch.get_num_threads())
            check_batch(*a)

        mp = starlette.formparsers.MultiPartParser
        patches = [
            (fastapi.routing, "run_endpoint_function",
             self.around_async(fastapi.routing.run_endpoint_function, "dispatch", "returned")),
            (mp, "parse", self.around_async(mp.parse, None, "parsed")),
            (serve, "_check_batch", entered),
            (serve, "_answer", self.around(serve._answer, None, "answer1")),
            (query, "decode_image", self.around(query.decode_image, "decode0", "decode1")),
            (searcher, "search_by_images", self.around(searcher.search_by_images, "query", None)),
            (searcher, "_search", self.around(searcher._search, None, "search1")),
            (emb, "_transform", self.around(emb._transform, None, "transform1")),
        ]  # fmt: skip
        saved = [(obj, name, obj.__dict__.get(name)) for obj, name, _ in patches]
        hooks = [
            emb.backbone.register_forward_pre_hook(lambda *_: self.mark("forward0")),
            emb.backbone.register_forward_hook(lambda *_: self.mark("forward1")),
        ]
        for obj, name, value in patches:
            setattr(obj, name, value)
        try:
            yield
        finally:
            for hook in hooks:
                hook.remove()
            for obj, name, value in saved:
                if value is None:
                    delattr(obj, name)
                else:
                    setattr(obj, name, value)


def phase_medians(marks: dict[str, dict[str, float]], requests: list[list]) -> dict[str, float]:
    """Median ms of each phase (and of the whole) over ``requests`` ``[seq, sent, recv, ...]``."""
    names = [m for m, _ in PHASES]
    rows = []
    for seq, sent, recv, *_ in requests:
        rec = {"sent": sent, **marks.get(seq, {}), "recv": recv}
        if all(m in rec for m in names):
            rows.append([rec[b] - rec[a] for a, b in itertools.pairwise(names)] + [recv - sent])
    if not rows:
        return {}
    med = np.median(np.asarray(rows) * 1e3, axis=0)
    out = {label: round(float(v), 3) for (_, label), v in zip(PHASES[1:], med[:-1], strict=True)}
    return {**out, "total (median of sums)": round(float(med[-1]), 3), "requests": len(rows)}


# --- the load client: in the server's process, or in a child process (``--client``) -------
def client_round(url: str, jpeg: bytes, *, k: int, requests: int, concurrency: int,
                 tag: str, warmup: int = 5) -> dict[str, Any]:  # fmt: skip
    """``requests`` uploads of ``jpeg`` from ``concurrency`` threads; per request
    ``[seq, sent, received, server took_ms]`` (perf_counter seconds)."""
    from tests.loadtest import load_test

    log: list[list] = []
    counter = itertools.count()

    def send(client: Any) -> Any:
        seq = f"{tag}-{next(counter)}"
        sent = time.perf_counter()
        r = client.post(
            "/query/image",
            params={"k": k},
            files={"files": ("chelsea.jpg", jpeg, "image/jpeg")},
            headers={SEQ: seq},
        )
        took = r.json()["took_ms"] if r.is_success else None
        log.append([seq, sent, time.perf_counter(), took])
        return r

    report = load_test(url, send, requests=requests, concurrency=concurrency, warmup=warmup)
    return {"report": report.to_dict(), "requests": log[warmup:]}


def child(mode: str, task: dict[str, Any]) -> dict[str, Any]:
    """``task`` run by a separate Python process (``--client`` or ``--server``)."""
    cmd = [sys.executable, str(Path(__file__).resolve()), f"--{mode}", json.dumps(task)]
    return json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout)


def chelsea_jpeg() -> bytes:
    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def bare_forward(jpeg: bytes, reps: int = 100, *, thread: bool = False) -> dict[str, float]:
    """Median of timm resnet18's forward on one preprocessed image (eval, inference_mode),
    in this thread or in a second one (while this thread's OpenMP team is alive)."""
    import timm
    import torch
    from PIL import Image

    model = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    cfg = timm.data.resolve_model_data_config(model)
    tf = timm.data.create_transform(**cfg, is_training=False)
    x = tf(Image.open(io.BytesIO(jpeg)).convert("RGB")).unsqueeze(0)
    times: list[float] = []

    def run() -> None:
        with torch.inference_mode():
            for _ in range(10):
                model(x)
            for _ in range(reps):
                t = time.perf_counter()
                model(x)
                times.append(time.perf_counter() - t)

    in_thread(run) if thread else run()
    t = np.asarray(times) * 1e3
    return {
        "p50_ms": round(float(np.median(t)), 3),
        "p99_ms": round(float(np.percentile(t, 99)), 3),
        "mean_ms": round(float(t.mean()), 3),
        "reps": reps,
    }


def in_thread(fn: Callable[[], Any]) -> Any:
    """``fn()`` in a short-lived thread (its OpenMP team ends with it)."""
    out: list[Any] = []
    worker = threading.Thread(target=lambda: out.append(fn()))
    worker.start()
    worker.join()
    return out[0] if out else None


def median_ms(fn: Any, reps: int) -> float:
    for _ in range(min(10, reps)):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(float(np.median(times)) * 1e3, 4)


def in_process_parts(searcher: Any, jpeg: bytes, k: int) -> dict[str, float]:
    """The query path's pieces called directly (no HTTP); torch and faiss work where the
    service's goes (the compute thread, or the calling thread in the ``request-thread``
    variant)."""
    import torch

    from bob_cache.pipelines import query

    run = query.on_compute_thread  # looked up now: the variant may have replaced it
    image = query.decode_image(jpeg)
    emb = searcher.embedder
    vec = query.faiss_ops.prepare(run(emb.embed, [image]), searcher.record.metric)
    batch = run(lambda: emb.backbone.normalize(emb._transform(image).unsqueeze(0)))

    def forward() -> None:
        with torch.inference_mode():
            emb.backbone(batch)

    return {
        "decode_ms": median_ms(lambda: query.decode_image(jpeg), 100),
        "transform_ms": median_ms(lambda: emb._transform(image), 100),
        "forward_ms (Backbone)": median_ms(lambda: run(forward), 50),
        "embed_ms (transform+forward)": median_ms(lambda: run(emb.embed, [image]), 50),
        "index_search_ms": median_ms(lambda: run(searcher.index.search, vec, k), 200),
        "search_vectors_ms": median_ms(lambda: searcher.search(vec, k), 200),
        "search_images_ms": median_ms(lambda: searcher.search_by_images([jpeg], k), 50),
    }


CLIENTS = ("in-process", "separate process")
# where the service builds and runs the model and searches the index: on whichever
# threadpool worker took the request (as before issue 10), or on the process's one compute
# thread (``query.on_compute_thread``)
VARIANTS = ("request-thread", "compute-thread")


def thread_cpu() -> dict[str, float]:
    """CPU seconds of each of this process's threads, by name (``native`` for threads Python
    did not start: OpenMP and BLAS pools) and native id."""
    names = {t.native_id: t.name for t in threading.enumerate()}
    tick = os.sysconf("SC_CLK_TCK")
    out = {}
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[f"{names.get(int(tid), 'native')} {tid}"] = (int(fields[11]) + int(fields[12])) / tick
    return out


def server_main(task: dict[str, Any]) -> dict[str, Any]:
    """One server process: the service under uvicorn in a thread, answering both clients in
    alternating rounds; per-request client timestamps and server marks."""
    from bob_cache.pipelines import query
    from bob_cache.pipelines.query import QueryConfig, Searcher
    from bob_cache.pipelines.serve import create_app

    if task["variant"] == "request-thread":
        query.on_compute_thread = lambda fn, *a: fn(*a)
    searcher = Searcher.open(QueryConfig(task["store"], task["name"], task["backbone"]))
    app = create_app(searcher)
    jpeg = Path(task["jpeg"]).read_bytes()
    parts = in_thread(lambda: in_process_parts(searcher, jpeg, task["k"]))
    probe = Probe()
    runs: dict[str, dict[int, list[dict]]] = {client: {} for client in CLIENTS}
    cpu: dict[int, dict[str, float]] = {}
    with Server(probe.app(app)) as url, probe.patched(searcher):
        for c in task["concurrency"]:
            cpu_before, wall = thread_cpu(), time.perf_counter()
            for r in range(task["rounds"]):
                kw = {"k": task["k"], "concurrency": c, "requests": task["requests"]}
                for client in CLIENTS if r % 2 == 0 else CLIENTS[::-1]:
                    kw["tag"] = f"{task['tag']}-{client[:3]}-c{c}-r{r}"
                    if client == CLIENTS[0]:
                        run = client_round(url, jpeg, **kw)
                    else:
                        run = child("client", {"url": url, "jpeg": task["jpeg"], **kw})
                    runs[client].setdefault(c, []).append(run)
            wall = time.perf_counter() - wall
            busy = {k: v - cpu_before.get(k, 0.0) for k, v in thread_cpu().items()}
            cpu[c] = {k: round(v / wall, 3) for k, v in busy.items() if v / wall >= 0.02}
    record = searcher.record.to_dict()
    keys = ("kind", "params", "search_param", "search_value", "recall", "bytes",
            "build_seconds", "reason")  # fmt: skip
    return {"rows": searcher.n_indexed, "index": {k: record[k] for k in keys}, "parts": parts,
            "torch_threads": probe.torch_threads, "runs": runs, "marks": probe.marks,
            "thread_cpu_share": cpu}  # fmt: skip


def combine(rounds: list[dict]) -> dict[str, Any]:
    """Latency percentiles and throughput over several rounds of one client and concurrency."""
    lat = np.asarray([(r[2] - r[1]) * 1e3 for rd in rounds for r in rd["requests"]])
    seconds = sum(rd["report"]["requests"] / rd["report"]["requests_per_second"] for rd in rounds)
    took = [r[3] for rd in rounds for r in rd["requests"] if r[3] is not None]
    return {
        "requests": int(lat.size),
        "errors": sum(rd["report"]["errors"] for rd in rounds),
        "p50_ms": round(float(np.percentile(lat, 50)), 3),
        "p90_ms": round(float(np.percentile(lat, 90)), 3),
        "p99_ms": round(float(np.percentile(lat, 99)), 3),
        "max_ms": round(float(lat.max()), 3),
        "requests_per_second": round(lat.size / seconds, 2),
        "server_took_ms_p50": round(float(np.median(took)), 3),
    }


def measure_size(store: Path, name: str, backbone: str, jpeg_path: Path, args: Any) -> dict:
    """Server processes of both variants, launched alternately ``args.launches`` times each."""
    per_launch = max(1, args.requests // (args.launches * args.rounds))
    launches: dict[str, list[dict]] = {v: [] for v in args.variants}
    for i in range(args.launches):
        for variant in args.variants if i % 2 == 0 else args.variants[::-1]:
            task = {"store": str(store), "name": name, "backbone": backbone, "k": args.k,
                    "variant": variant, "jpeg": str(jpeg_path), "tag": f"{variant}-{i}",
                    "rounds": args.rounds, "requests": per_launch,
                    "concurrency": args.concurrency}  # fmt: skip
            launches[variant].append(child("server", task))
    variants = {}
    for variant, runs in launches.items():
        marks = {seq: m for run in runs for seq, m in run["marks"].items()}
        loads: dict[str, dict] = {}
        for client in CLIENTS:
            for c in args.concurrency:
                rounds = [rd for run in runs for rd in run["runs"][client][str(c)]]
                entry = combine(rounds)
                entry["phases"] = phase_medians(marks, [r for rd in rounds for r in rd["requests"]])
                loads.setdefault(client, {})[c] = entry
                brief = {k: v for k, v in entry.items() if k != "phases"}
                print(f"  {name} {variant} {client} c={c}: {brief}", file=sys.stderr, flush=True)
        per_launch = []
        for run in runs:
            p50 = {}
            for client in CLIENTS:
                for c in args.concurrency:
                    rounds = run["runs"][client][str(c)]
                    ph = phase_medians(run["marks"], [r for rd in rounds for r in rd["requests"]])
                    p50[f"{client} c={c}"] = combine(rounds)["p50_ms"]
                    p50[f"{client} c={c} forward"] = ph.get("forward (resnet18)")
            per_launch.append({**p50, "thread_cpu_share": run["thread_cpu_share"]})
        variants[variant] = {"parts": [run["parts"] for run in runs],
                             "torch_threads": runs[0]["torch_threads"], "load": loads,
                             "per_launch_p50_ms": per_launch}  # fmt: skip
    first = launches[args.variants[0]][0]
    return {"rows": first["rows"], "index": first["index"], "variants": variants}


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", default="10000,1000000")
    p.add_argument("--requests", type=int, default=200, help="per variant, client, concurrency")
    p.add_argument("--launches", type=int, default=3, help="server processes per variant")
    p.add_argument("--rounds", type=int, default=2, help="alternating client rounds per launch")
    p.add_argument("--concurrency", default="1,4")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--out", type=Path, default=HERE / "out" / "serve-latency.json")
    p.add_argument("--client", help=argparse.SUPPRESS)  # child modes (a JSON task)
    p.add_argument("--server", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.client or args.server:
        task = json.loads(args.client or args.server)
        if args.client:
            task["jpeg"] = Path(task["jpeg"]).read_bytes()
            out = client_round(task.pop("url"), task.pop("jpeg"), **task)
        else:
            out = server_main(task)
        print(json.dumps(out))
        return
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    args.variants = args.variants.split(",")
    sizes = [int(s) for s in args.sizes.split(",")]
    import torch

    from bob_cache.pipelines.index import IndexConfig, build_index

    work = HERE / "out" / "serve"
    store = work / "store"
    work.mkdir(parents=True, exist_ok=True)
    src = extract_source(store)
    backbone = src["backbone"]["slug"]
    jpeg = chelsea_jpeg()
    jpeg_path = work / "chelsea.jpg"
    jpeg_path.write_bytes(jpeg)
    report: dict[str, Any] = {
        "machine": {
            **machine(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "command": " ".join(["python", *sys.argv]),
        "backbone": backbone,
        "dim": src["dim"],
        "jpeg_bytes": len(jpeg),
        "requests": args.requests,
        "k": args.k,
        "variants": args.variants,
    }
    names = {}
    for rows in sizes:
        t = time.perf_counter()
        names[rows] = synthetic_set(store, src, rows)
        build = build_index(
            IndexConfig(str(store), names[rows], backbone, kind="auto", name="auto", quiet=True)
        )
        print(
            f"  {names[rows]}: store+index {time.perf_counter() - t:.0f} s, {build.action}, "
            f"{build.record['kind']}",
            file=sys.stderr,
            flush=True,
        )
        gc.collect()
    os.sync()  # writeback of a freshly built store or index would compete with the baseline
    time.sleep(5)
    report["bare_before"] = bare_pair(jpeg)
    report["sizes"] = {
        rows: measure_size(store, names[rows], backbone, jpeg_path, args) for rows in sizes
    }
    report["bare_after"] = bare_pair(jpeg)
    report["summary"] = summarize(report, sizes, args)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    print(report["summary"]["markdown"])
    print(f"\nfigures: {args.out}", file=sys.stderr)


def bare_pair(jpeg: bytes) -> dict[str, Any]:
    """The bare forward in this (main) thread, then in a second thread while the main
    thread's OpenMP team is alive (two teams on the cores)."""
    return {"main": bare_forward(jpeg), "second_thread": bare_forward(jpeg, thread=True)}


def summarize(report: dict, sizes: list[int], args: Any) -> dict[str, Any]:
    m, conc = report["machine"], args.concurrency
    before, after = report["bare_before"], report["bare_after"]
    bare = (before["main"]["p50_ms"] + after["main"]["p50_ms"]) / 2
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']} ({m['torch_threads']} "
        f"threads), faiss {m['faiss']}. Bare timm resnet18 forward (1 image, 224 px) p50: "
        f"{before['main']['p50_ms']:.1f} ms before / {after['main']['p50_ms']:.1f} ms after "
        f"the load tests (in a second thread beside the first one's team: "
        f"{before['second_thread']['p50_ms']:.1f} / {after['second_thread']['p50_ms']:.1f} ms)."
        f" p50 − bare uses their mean, {bare:.1f} ms.",
        "",
        "| rows | index | model, search on | client | concurrency | p50 ms | p90 ms | p99 ms | "
        "req/s | server forward p50 ms | p50 − bare ms | p99 / p50 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    goals: dict[str, Any] = {}
    for rows in sizes:
        s = report["sizes"][rows]
        idx = s["index"]
        kind = (f"{idx['kind']} {idx['search_param'] or ''}"
                f"{'=' + str(idx['search_value']) if idx['search_value'] else ''}")  # fmt: skip
        for variant, v in s["variants"].items():
            for client in CLIENTS:
                for c in conc:
                    ld = v["load"][client][c]
                    fwd = ld["phases"].get("forward (resnet18)", float("nan"))
                    lines.append(
                        f"| {rows:,} | {kind} | {variant} | {client} | {c} | "
                        f"{ld['p50_ms']:.1f} | {ld['p90_ms']:.1f} | {ld['p99_ms']:.1f} | "
                        f"{ld['requests_per_second']:.1f} | {fwd:.1f} | "
                        f"{ld['p50_ms'] - bare:+.1f} | {ld['p99_ms'] / ld['p50_ms']:.2f} |"
                    )
                ld = v["load"][client]
                key = f"{rows}_{variant}_{client}"
                goals[f"p50_within_10ms_of_bare_{key}"] = ld[conc[0]]["p50_ms"] - bare <= 10
                goals[f"p99_under_2x_p50_{key}"] = {
                    c: ld[c]["p99_ms"] < 2 * ld[c]["p50_ms"] for c in conc
                }
    for rows in sizes:
        lines += phase_table(report["sizes"][rows], rows, conc[0])
    for rows in sizes:
        lines += parts_table(report["sizes"][rows], rows)
    if len(sizes) >= 2:
        lo, hi = report["sizes"][sizes[0]], report["sizes"][sizes[-1]]
        for variant in args.variants:
            search = (hi["variants"][variant]["parts"][0]["index_search_ms"]
                      - lo["variants"][variant]["parts"][0]["index_search_ms"])  # fmt: skip
            for client in CLIENTS:
                p50 = [x["variants"][variant]["load"][client][conc[0]]["p50_ms"] for x in (lo, hi)]
                growth = p50[1] - p50[0]
                goals[f"growth_within_index_cost_{variant}_{client}"] = growth <= search
                lines.append(
                    f"\np50 growth {sizes[0]:,} → {sizes[-1]:,} rows ({variant}, {client}, "
                    f"concurrency {conc[0]}): {growth:+.2f} ms; index search growth: "
                    f"{search:+.3f} ms."
                )
    return {"markdown": "\n".join(lines), "goals": goals, "bare_p50_ms": bare}


def phase_table(size: dict, rows: int, c: int) -> list[str]:
    """Per-phase medians (ms) at concurrency ``c`` for each variant and client."""
    cols = [(v, client) for v in size["variants"] for client in CLIENTS]
    phases = [size["variants"][v]["load"][client][c]["phases"] for v, client in cols]
    head = " | ".join(f"{v}, {client}" for v, client in cols)
    lines = ["", f"Per-phase medians at {rows:,} rows, ms (concurrency {c}):", "",
             f"| phase | {head} |", "| --- |" + " --- |" * len(cols)]  # fmt: skip
    for label in [label for _, label in PHASES[1:]] + ["total (median of sums)"]:
        vals = " | ".join(f"{ph.get(label, float('nan')):.2f}" for ph in phases)
        lines.append(f"| {label} | {vals} |")
    return lines


def parts_table(size: dict, rows: int) -> list[str]:
    """The query path's pieces called directly in each server process (first launch)."""
    names = list(next(iter(size["variants"].values()))["parts"][0])
    lines = ["", f"Direct calls at {rows:,} rows, median ms (no HTTP):", "",
             "| model, search on | " + " | ".join(names) + " |",
             "| --- |" + " --- |" * len(names)]  # fmt: skip
    for variant, v in size["variants"].items():
        pt = v["parts"][0]
        lines.append(f"| {variant} | " + " | ".join(f"{pt[n]:.3f}" for n in names) + " |")
    return lines


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
