"""The query service under heavy but legal requests (issue 23 item 5), before and after.

One run measures two trees of the code: ``after`` (this checkout) and ``before`` (a git
worktree of ``--before``, the commit before the change, imported by putting the worktree
first on ``PYTHONPATH``; each server prints the file its ``serve`` module came from). For
each tree a server process (``create_app`` under uvicorn, backbone not
loaded) serves a synthetic 10,000-row, 512-d resnet18 feature set (exact search), and
16 client threads send 2,000 requests per scenario, in 8 interleaved rounds (every tree's
server runs at once; a round goes to each tree × scenario in turn, so load from outside,
on a shared machine, falls on all of them alike):

- ``clean``: only good requests: ``/query/vector``, one vector, k=10 (one of eight, in
  turn; the cheapest query, so any stall a heavy request causes shows in their latency);
- ``mixed 19 MB``: the same, with 1% (20) of them a 19 MB JSON body of full-precision
  vectors, under the default 20 MB upload limit (the issue's load);
- ``mixed max-batch``: 1% of them a legal ``--max-batch`` (256) vectors of 512 values,
  written in full precision (~3.3 MB), which both trees must answer.

Reported: good requests' p50/p99, all requests' throughput, the heavy requests' statuses and
latency, and the server's peak RSS (sampled every 10 ms from this process). Then
thumbnails: six concurrent ``GET /thumb`` of one 8000 × 8000 one-colour RGB PNG (~200 KB
on disk) in a small folder set, with each tree's defaults, and ``after`` with
``--max-image-mp 70`` (which admits it).

    python benchmarks/serve_mixed_load.py --before <commit>
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))

WORK = HERE / "out" / "serve-mixed"
ROWS, REQUESTS, CONCURRENCY, HEAVY_EVERY = 10_000, 2000, 16, 100


# --- the server (a child process) ---------------------------------------------------------
def server_main(task: dict[str, Any]) -> None:
    import uvicorn

    import bob_cache.pipelines.serve as serve
    from bob_cache.pipelines.query import QueryConfig, Searcher

    searcher = Searcher.open(QueryConfig(task["store"], task["dataset"], task["backbone"]))
    app = serve.create_app(searcher, load_model=False, images_root=task.get("images_root"),
                           **task.get("options", {}))  # fmt: skip
    print(json.dumps({"serve_module": serve.__file__}), flush=True)
    uvicorn.run(app, host="127.0.0.1", port=task["port"], log_level="warning")


class ServerProcess:
    """A server child on a free port; its peak RSS sampled while :meth:`sampling` runs."""

    def __init__(self, tree: Path, task: dict[str, Any]) -> None:
        from serve_latency import free_port

        self.port = free_port()
        env = {**os.environ, "PYTHONPATH": str(tree)}
        cmd = [sys.executable, __file__, "--server", json.dumps({**task, "port": self.port})]
        self.proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True)
        self.module = json.loads(self.proc.stdout.readline())["serve_module"]
        assert self.module.startswith(str(tree)), (self.module, tree)
        self.url = f"http://127.0.0.1:{self.port}"
        self._wait_ready()
        import psutil

        self.ps = psutil.Process(self.proc.pid)
        self.peak = self.base = self.ps.memory_info().rss

    def _wait_ready(self) -> None:
        import httpx

        for _ in range(600):
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code in (200, 503):
                    return
            except httpx.HTTPError:
                time.sleep(0.1)
        raise RuntimeError("server did not start")

    def sample(self, stop: threading.Event) -> None:
        while not stop.wait(0.01):
            self.peak = max(self.peak, self.ps.memory_info().rss)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)


# --- the load ----------------------------------------------------------------------------
class Cell:
    """One tree × scenario: its good requests' latencies, heavy answers and wall time."""

    def __init__(self) -> None:
        self.good_ms: list[float] = []
        self.heavy: list[tuple[str, float]] = []
        self.errors: list[str] = []
        self.seconds = 0.0
        self.sent = 0
        self.rss_peak = 0

    def summary(self) -> dict[str, Any]:
        lat = np.asarray(self.good_ms)
        statuses: dict[str, int] = {}
        for status, _ in self.heavy:
            statuses[status] = statuses.get(status, 0) + 1
        return {
            "good": len(lat), "good_errors": len(self.errors), "first_errors": self.errors[:3],
            "p50_ms": float(np.percentile(lat, 50)), "p99_ms": float(np.percentile(lat, 99)),
            "max_ms": float(lat.max()), "requests_per_second": self.sent / self.seconds,
            "seconds": self.seconds, "heavy": len(self.heavy), "heavy_statuses": statuses,
            "heavy_median_ms": float(np.median([ms for _, ms in self.heavy]))
            if self.heavy else None,
            "rss_peak_mb": self.rss_peak / 2**20,
        }  # fmt: skip


def load_round(url: str, good: list[Any], heavy: bytes | None, cell: Cell, n: int) -> None:
    """``n`` more requests of ``cell`` from CONCURRENCY threads; request number i (counted
    over all of the cell's rounds) is ``heavy`` when i % HEAVY_EVERY == HEAVY_EVERY // 2."""
    import httpx

    first = cell.sent
    turn, lock = itertools.count(first), threading.Lock()

    def worker() -> None:
        with httpx.Client(base_url=url, timeout=120) as client:
            while True:
                with lock:
                    i = next(turn)
                if i >= first + n:
                    return
                started = time.perf_counter()
                if heavy is not None and i % HEAVY_EVERY == HEAVY_EVERY // 2:
                    try:
                        status = str(client.post(
                            "/query/vector", content=heavy,
                            headers={"content-type": "application/json"},
                        ).status_code)  # fmt: skip
                    except httpx.HTTPError as exc:
                        status = type(exc).__name__
                    cell.heavy.append((status, (time.perf_counter() - started) * 1000))
                    continue
                path, body = good[i % len(good)]
                answer = client.post(path, json=body)
                cell.good_ms.append((time.perf_counter() - started) * 1000)
                if answer.status_code != 200:
                    cell.errors.append(f"{answer.status_code} {answer.text[:100]}")

    started = time.perf_counter()
    with ThreadPoolExecutor(CONCURRENCY) as pool:
        for f in [pool.submit(worker) for _ in range(CONCURRENCY)]:
            f.result()
    cell.seconds += time.perf_counter() - started
    cell.sent += n


def full_precision(n: int, dim: int, seed: int) -> bytes:
    """A JSON body of ``n`` vectors of ``dim`` values, each written with 17 digits."""
    x = np.random.default_rng(seed).standard_normal((n, dim))
    return json.dumps({"vectors": x.tolist(), "k": 10}).encode()


def nineteen_mb(dim: int) -> bytes:
    rows = int(19 * 2**20 / (dim * 20.6))  # ~20.6 bytes a value as JSON text
    body = full_precision(rows, dim, 1)
    while len(body) > 19.5 * 2**20:
        rows = int(rows * 0.97)
        body = full_precision(rows, dim, 1)
    return body


def interleaved(trees: dict[str, Path], task: dict, good: list, heavy: dict, rounds: int
                ) -> dict[str, Any]:  # fmt: skip
    """Every tree's server up at once; rounds of REQUESTS / rounds requests go to each
    (tree, scenario) cell in turn, so load from outside falls on all cells alike. A cell's
    peak RSS is its server's highest sample while that cell's rounds ran."""
    servers = {label: ServerProcess(tree, task) for label, tree in trees.items()}
    cells = {(t, sc): Cell() for sc in heavy for t in trees}
    try:
        for r in range(rounds):
            n = REQUESTS // rounds + (r < REQUESTS % rounds)
            for (label, scenario), cell in cells.items():
                server, stop = servers[label], threading.Event()
                server.peak = server.ps.memory_info().rss
                sampler = threading.Thread(target=server.sample, args=(stop,), daemon=True)
                sampler.start()
                load_round(server.url, good, heavy[scenario], cell, n)
                stop.set()
                sampler.join()
                cell.rss_peak = max(cell.rss_peak, server.peak)
            print(f"  round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    finally:
        for server in servers.values():
            server.close()
    return {f"{label} / {scenario}": cell.summary() for (label, scenario), cell in cells.items()}


def thumbnails(tree: Path, task: dict, options: dict) -> dict[str, Any]:
    import httpx

    server = ServerProcess(tree, {**task, "options": options})
    stop = threading.Event()
    sampler = threading.Thread(target=server.sample, args=(stop,), daemon=True)
    sampler.start()
    started = time.perf_counter()
    try:
        with ThreadPoolExecutor(6) as pool:
            url = f"{server.url}/thumb/big/big.png"
            answers = list(pool.map(lambda _: httpx.get(url, timeout=300), range(6)))
    finally:
        seconds = time.perf_counter() - started
        stop.set()
        sampler.join()
        server.close()
    return {"statuses": [a.status_code for a in answers], "seconds": seconds,
            "detail": answers[0].json().get("detail") if answers[0].status_code != 200 else None,
            "rss_start_mb": server.base / 2**20, "rss_peak_mb": server.peak / 2**20}  # fmt: skip


# --- setup ---------------------------------------------------------------------------------
def before_tree(commit: str) -> Path:
    """A worktree of ``commit`` importable as ``bob_cache`` (its package-dir mapping as
    symlinks: bob_cache/pipelines and bob_cache/stores)."""
    tree = Path("/tmp/serve-before")
    if not tree.exists():
        subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(tree), commit],
                       check=True)  # fmt: skip
    else:
        subprocess.run(["git", "-C", str(tree), "checkout", "-q", "--detach", commit], check=True)
    for name in ("pipelines", "stores"):
        link = tree / "bob_cache" / name
        if not link.exists():
            link.symlink_to(f"../{name}")
    return tree


def folder_set(store: Path) -> tuple[str, Path]:
    """A small image folder with one 8000 × 8000 one-colour RGB PNG, extracted (test_resnet)."""
    from PIL import Image

    from bob_cache.stores import open_store

    root = WORK / "thumbs"
    images = root / "images"
    if not (images / "big" / "big.png").exists():
        (images / "big").mkdir(parents=True, exist_ok=True)
        (images / "small").mkdir(parents=True, exist_ok=True)
        for i in range(4):
            Image.new("RGB", (64, 64), (i * 60, 80, 120)).save(images / "small" / f"s{i}.png")
        Image.new("RGB", (8000, 8000), (200, 120, 40)).save(images / "big" / "big.png")
    if not any(fs.attrs["dataset"]["name"] == "thumbs" for fs in open_store(store).feature_sets()):
        cli = Path(sys.executable).parent / "bob-cache"
        subprocess.run([str(cli), "extract", "--data", str(images), "--name", "thumbs",
                        "--store", str(store), "--backbone", "test_resnet", "--random-init",
                        "--image-size", "32", "--workers", "0", "--split-fractions", "1,0,0",
                        "-q"], check=True)  # fmt: skip
    return "thumbs", images


def main() -> None:
    global REQUESTS
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--before", help="the commit before the change (default: none measured)")
    p.add_argument("--out", type=Path, default=WORK / "serve-mixed-load.json")
    p.add_argument("--requests", type=int, default=2000, help="per tree and scenario")
    p.add_argument("--rounds", type=int, default=8, help="interleaved rounds per cell")
    p.add_argument("--server", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.server:
        server_main(json.loads(args.server))
        return
    REQUESTS = args.requests
    from retrieval_index import machine
    from serve_latency import extract_source, synthetic_set

    store = WORK / "store"
    WORK.mkdir(parents=True, exist_ok=True)
    src = extract_source(store)
    backbone, dim = src["backbone"]["slug"], int(src["dim"])
    name = synthetic_set(store, src, ROWS)
    thumbs_name, images = folder_set(store)
    trees = {"after": REPO, **({"before": before_tree(args.before)} if args.before else {})}
    task = {"store": str(store), "dataset": name, "backbone": backbone}
    rng = np.random.default_rng(0)
    good = [("/query/vector", {"vectors": [rng.standard_normal(dim).tolist()], "k": 10})
            for _ in range(8)]  # fmt: skip
    heavy = {"clean": None, "mixed 19 MB": nineteen_mb(dim),
             "mixed max-batch": full_precision(256, dim, 2)}  # fmt: skip
    report: dict[str, Any] = {
        "machine": machine(), "command": " ".join(["python", *sys.argv]),
        "load_before": os.getloadavg(), "rows": ROWS, "dim": dim, "requests": REQUESTS,
        "concurrency": CONCURRENCY, "heavy_share": 1 / HEAVY_EVERY,
        "heavy_bytes": {k: len(v) for k, v in heavy.items() if v},
        "trees": {k: str(v) for k, v in trees.items()}, "load": {}, "thumbnails": {},
    }  # fmt: skip
    report["load"] = interleaved(trees, task, good, heavy, args.rounds)
    for key, out in report["load"].items():
        print(f"{key:26} good p50/p99 {out['p50_ms']:7.1f}/{out['p99_ms']:7.1f} ms, "
              f"{out['requests_per_second']:6.1f} req/s, heavy {out['heavy_statuses']} (median "
              f"{out['heavy_median_ms'] or 0:.0f} ms), peak RSS {out['rss_peak_mb']:.0f} MB",
              file=sys.stderr, flush=True)  # fmt: skip
    thumb_task = {"store": str(store), "dataset": thumbs_name, "backbone": "test_resnet",
                  "images_root": str(images)}  # fmt: skip
    cases = [(label, {}) for label in trees] + [("after", {"max_image_mp": 70})]
    for label, options in cases:
        key = f"{label}{' --max-image-mp 70' if options else ''}"
        out = thumbnails(trees[label], thumb_task, options)
        report["thumbnails"][key] = out
        print(f"thumbs {key:24} {out['statuses']} in {out['seconds']:.1f} s, RSS "
              f"{out['rss_start_mb']:.0f} -> peak {out['rss_peak_mb']:.0f} MB",
              file=sys.stderr, flush=True)  # fmt: skip
    report["load_after"] = os.getloadavg()
    args.out.write_text(json.dumps(report, indent=1, default=str))
    print(f"figures: {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
