"""Single-image query latency through the HTTP service (issue 4), at 10k and 1M stored rows.

A real feature set is extracted first (``bob-cache extract --backbone resnet18 --random-init``
over a few ``builtin:digits`` images) to get resnet18's exact provenance; larger synthetic
feature sets then copy its spec and provenance (so the service rebuilds the same resnet18 to
embed uploads) but hold 10k and 1M clustered 512-d rows. Each gets an index built with
``--kind auto``; the service (``create_app`` under uvicorn, in a thread of this process, on a
free loopback port) answers ``POST /query/image`` uploads of one JPEG (scikit-image's
``chelsea``, 451×300) from a bounded load test (httpx clients, concurrency 1 then 4).

Baselines measured in the same process: the bare timm resnet18 forward on one preprocessed
image (eval mode, ``torch.inference_mode``; before and after the load tests), and the index's
own search time for that image's embedding at each size.

    python benchmarks/serve_latency.py                 # 10k and 1M rows
    python benchmarks/serve_latency.py --sizes 10000   # quick check
"""

from __future__ import annotations

import argparse
import gc
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

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
    fs = fstore.require(
        request,
        layout,
        labels=labels % 10,
        ids=[f"img/{i:08d}.jpg" for i in range(rows)],
        overwrite=True,
    )
    for shard in range(layout.n_shards(rows)):
        a, b = layout.shard_bounds(shard, rows)
        x = model.sample(labels[a:b], np.random.default_rng([seed, 2, shard]))
        fs.write_shard(shard, np.maximum(x * 4, 0), [""] * (b - a))  # post-ReLU-like
    fs.finalize()
    return name


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


def chelsea_jpeg() -> bytes:
    from PIL import Image
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def bare_forward(jpeg: bytes, reps: int = 100) -> dict[str, float]:
    """Median of timm resnet18's forward on one preprocessed image (eval, inference_mode)."""
    import timm
    import torch
    from PIL import Image

    model = timm.create_model("resnet18", pretrained=False, num_classes=0).eval()
    cfg = timm.data.resolve_model_data_config(model)
    tf = timm.data.create_transform(**cfg, is_training=False)
    x = tf(Image.open(io.BytesIO(jpeg)).convert("RGB")).unsqueeze(0)
    with torch.inference_mode():
        for _ in range(10):
            model(x)
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            model(x)
            times.append(time.perf_counter() - t)
    t = np.asarray(times) * 1e3
    return {
        "p50_ms": round(float(np.median(t)), 3),
        "p99_ms": round(float(np.percentile(t, 99)), 3),
        "mean_ms": round(float(t.mean()), 3),
        "reps": reps,
    }


def median_ms(fn: Any, reps: int) -> float:
    for _ in range(min(10, reps)):
        fn()
    times = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(float(np.median(times)) * 1e3, 4)


def measure_size(store: Path, name: str, backbone: str, jpeg: bytes, args: Any) -> dict:
    from bob_cache.pipelines.query import QueryConfig, Searcher, decode_image
    from bob_cache.pipelines.serve import create_app
    from bob_cache.retrieval import faiss_ops
    from bob_cache.retrieval.loadtest import load_test

    searcher = Searcher.open(QueryConfig(str(store), name, backbone))
    app = create_app(searcher)
    image = decode_image(jpeg)
    # the lean paths the server calls (Hits), where this version has them
    by_vector = getattr(searcher, "search", searcher.search_vectors)
    by_image = getattr(searcher, "search_by_images", searcher.search_images)
    emb = searcher.embedder
    vec = faiss_ops.prepare(emb.embed([image]), searcher.record.metric)
    parts = {
        "decode_ms": median_ms(lambda: decode_image(jpeg), 100),
        "embed_ms (transform+forward)": median_ms(lambda: emb.embed([image]), 50),
        "index_search_ms": median_ms(lambda: searcher.index.search(vec, args.k), 200),
        "search_vectors_ms": median_ms(lambda: by_vector(vec, args.k), 200),
        "search_images_ms": median_ms(lambda: by_image([jpeg], args.k), 50),
    }
    took: list[float] = []

    def send(client: Any) -> Any:
        r = client.post(
            "/query/image",
            params={"k": args.k},
            files={"files": ("chelsea.jpg", jpeg, "image/jpeg")},
        )
        if r.is_success:
            took.append(r.json()["took_ms"])
        return r

    loads = {}
    with Server(app) as url:
        for c in args.concurrency:
            took.clear()
            report = load_test(url, send, requests=args.requests, concurrency=c, warmup=5)
            loads[c] = {**report.to_dict(), "server_took_ms_p50": round(float(np.median(took)), 3)}
            print(f"  {name} c={c}: {loads[c]}", file=sys.stderr, flush=True)
    out = {
        "rows": searcher.n_indexed,
        "index": {
            k: searcher.record.to_dict()[k]
            for k in (
                "kind",
                "params",
                "search_param",
                "search_value",
                "recall",
                "bytes",
                "build_seconds",
                "reason",
            )
        },
        "parts": parts,
        "load": loads,
    }
    return out


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--sizes", default="10000,1000000")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", default="1,4")
    p.add_argument("-k", type=int, default=10)
    p.add_argument("--out", type=Path, default=HERE / "out" / "serve-latency.json")
    args = p.parse_args()
    args.concurrency = [int(c) for c in args.concurrency.split(",")]
    sizes = [int(s) for s in args.sizes.split(",")]
    import torch

    from bob_cache.pipelines.index import IndexConfig, build_index

    work = HERE / "out" / "serve"
    store = work / "store"
    work.mkdir(parents=True, exist_ok=True)
    src = extract_source(store)
    backbone = src["backbone"]["slug"]
    jpeg = chelsea_jpeg()
    report: dict[str, Any] = {
        "machine": {
            **machine(),
            "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(),
        },
        "backbone": backbone,
        "dim": src["dim"],
        "jpeg_bytes": len(jpeg),
        "requests": args.requests,
        "k": args.k,
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
    report["bare_before"] = bare_forward(jpeg)
    report["sizes"] = {
        rows: measure_size(store, names[rows], backbone, jpeg, args) for rows in sizes
    }
    report["bare_after"] = bare_forward(jpeg)
    report["summary"] = summarize(report, sizes, args.concurrency)
    args.out.write_text(json.dumps(report, indent=1, default=str))
    print(report["summary"]["markdown"])
    print(f"\nfigures: {args.out}", file=sys.stderr)


def summarize(report: dict, sizes: list[int], conc: list[int]) -> dict[str, Any]:
    m = report["machine"]
    bare = (report["bare_before"]["p50_ms"] + report["bare_after"]["p50_ms"]) / 2
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores; torch {m['torch']} ({m['torch_threads']} "
        f"threads), faiss {m['faiss']}. Bare timm resnet18 forward (1 image, 224 px): p50 "
        f"{report['bare_before']['p50_ms']:.1f} ms before / {report['bare_after']['p50_ms']:.1f}"
        " ms after the load tests.",
        "",
        "| rows | index | index search ms | concurrency | p50 ms | p90 ms | p99 ms | req/s | "
        "p50 − bare ms | p99 / p50 |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    goals: dict[str, Any] = {}
    for rows in sizes:
        s = report["sizes"][rows]
        idx = s["index"]
        for c in conc:
            ld = s["load"][c]
            lines.append(
                f"| {rows:,} | {idx['kind']} {idx['search_param'] or ''}"
                f"{'=' + str(idx['search_value']) if idx['search_value'] else ''} | "
                f"{s['parts']['index_search_ms']:.3f} | {c} | {ld['p50_ms']:.1f} | "
                f"{ld['p90_ms']:.1f} | {ld['p99_ms']:.1f} | {ld['requests_per_second']:.1f} | "
                f"{ld['p50_ms'] - bare:+.1f} | {ld['p99_ms'] / ld['p50_ms']:.2f} |"
            )
        c1 = s["load"][conc[0]]
        goals[f"p50_within_10ms_of_bare_{rows}"] = c1["p50_ms"] - bare <= 10
        goals[f"p99_under_2x_p50_{rows}"] = {
            c: s["load"][c]["p99_ms"] < 2 * s["load"][c]["p50_ms"] for c in conc
        }
    lines += [
        "",
        "| rows | decode ms | embed ms (transform+forward) | search_vectors ms | "
        "search_images ms |",
        "| --- | --- | --- | --- | --- |",
    ]
    for rows in sizes:
        pt = report["sizes"][rows]["parts"]
        lines.append(
            f"| {rows:,} | {pt['decode_ms']:.2f} | {pt['embed_ms (transform+forward)']:.2f}"
            f" | {pt['search_vectors_ms']:.3f} | {pt['search_images_ms']:.2f} |"
        )
    if len(sizes) >= 2:
        lo, hi = report["sizes"][sizes[0]], report["sizes"][sizes[-1]]
        growth = hi["load"][conc[0]]["p50_ms"] - lo["load"][conc[0]]["p50_ms"]
        search = hi["parts"]["index_search_ms"] - lo["parts"]["index_search_ms"]
        goals["growth_p50_ms"] = round(growth, 3)
        goals["index_search_growth_ms"] = round(search, 3)
        goals["growth_within_index_cost"] = growth <= search
        lines.append(
            f"\np50 growth {sizes[0]:,} → {sizes[-1]:,} rows (concurrency "
            f"{conc[0]}): {growth:+.2f} ms; index search growth: {search:+.3f} ms."
        )
    return {"markdown": "\n".join(lines), "goals": goals, "bare_p50_ms": bare}


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
