"""What checksums cost: crc32c on every object plus a digest per shard, against the same
store written without them, in the same run.

Three measurements, each in interleaved rounds (with, without, with, without, ...) so load
from elsewhere falls on both alike; the figure is the ratio of medians:

1. store writes: ``ROWS × DIM`` float16 rows written shard by shard (``FeatureSet.write_rows``:
   cast, compress, crc32c, digests, commit records), the extraction's storage cost;
2. a full-store scan: every shard's features read back and decoded (what a probe or an
   index build reads), with the checksum verified on each chunk;
3. an extraction end to end: ``bob-cache extract`` of builtin:digits with a random-init
   resnet18 at 64 px on this CPU (the model dominates, as it does on any real run).

    python benchmarks/checksum_cost.py [--rows 200000] [--dim 768] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from bob_cache.stores import FeatureSetRequest, open_store
from bob_cache.stores import layout as layout_module

MODES = ("with", "without")


def request(rows: int, dim: int) -> FeatureSetRequest:
    return FeatureSetRequest(
        path="bench/train/model.tag/k0", key="k0",
        spec={"layer": "final", "pool": "head", "dtype": "float16"},
        provenance={"dataset": {"name": "bench", "class_names": []}, "split": "train",
                    "backbone": {"slug": "model.tag", "name": "model", "arch": "model"}},
        n_rows=rows, dim=dim, dtype="float16",
    )  # fmt: skip


def write_once(root: Path, x: np.ndarray, checksum: bool) -> float:
    shutil.rmtree(root, ignore_errors=True)
    layout = layout_module.resolve_layout(checksum=checksum)
    fs = open_store(root, mode="a").require(request(*x.shape), layout)
    labels = np.arange(len(x)) % 1000
    ids = [f"img/{i:07d}.jpg" for i in range(len(x))]
    started = time.perf_counter()
    fs.write_rows(x, labels=labels, ids=ids)
    return time.perf_counter() - started


def scan_once(root: Path) -> float:
    fs = open_store(root).get("bench/train/model.tag/k0")
    started = time.perf_counter()
    for shard in range(fs.n_shards):
        a, b = fs.layout.shard_bounds(shard, fs.n_rows)
        np.asarray(fs.features[a:b], dtype=np.float32).sum()
    return time.perf_counter() - started


def extract_once(root: Path, checksum: bool) -> float:
    from functools import partial

    import bob_cache.pipelines.extract_single as single
    from bob_cache.config import ExtractConfig
    from bob_cache.pipelines.extract import extract

    shutil.rmtree(root, ignore_errors=True)
    original = layout_module.resolve_layout
    single.resolve_layout = partial(original, checksum=checksum)
    try:
        config = ExtractConfig(data="builtin:digits", backbone="resnet18", random_init=True,
                               image_size=64, workers=0, store=str(root), quiet=True)  # fmt: skip
        started = time.perf_counter()
        extract(config)
        return time.perf_counter() - started
    finally:
        single.resolve_layout = original


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    x = np.random.default_rng(0).standard_normal((args.rows, args.dim)).astype(np.float32)
    kinds = ("write", "scan", "extract")
    out: dict[str, dict[str, list[float]]] = {
        m: {k: [] for k in kinds} for m in ("with", "without")
    }
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(args.rounds):
            for mode in ("with", "without"):
                root = Path(tmp) / mode
                out[mode]["write"].append(write_once(root, x, mode == "with"))
                out[mode]["scan"].append(scan_once(root))
                out[mode]["extract"].append(extract_once(Path(tmp) / f"x-{mode}", mode == "with"))
    medians = {m: {k: statistics.median(v) for k, v in d.items()} for m, d in out.items()}
    ratios = {k: medians["with"][k] / medians["without"][k] for k in kinds}
    print(json.dumps({"rows": args.rows, "dim": args.dim, "rounds": args.rounds,
                      "median_seconds": medians, "with_over_without": ratios,
                      "all_seconds": out}, indent=1))  # fmt: skip


if __name__ == "__main__":
    main()
