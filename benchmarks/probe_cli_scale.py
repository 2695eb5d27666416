"""The linear probe end to end at ImageNet-1k size: ``bob-cache probe`` on a Zarr store.

``probe_sweep.py`` times the library's sweep on arrays already in memory; this one times what a
user runs: the command, in a fresh process, reading float16 feature sets (train, val, test)
from a feature store on disk, checking them, choosing C, fitting, scoring, writing the head
and the results rows. The features are ``probe_sweep.make_data``'s (the same draw as there),
written once through the store API with the default layout (zstd:3, 4,096-row shards).

Measured: wall time and peak RSS of the command (``/usr/bin/time -v``), the test top-1 and
the chosen C from its ``--json`` summary, and the steps from its progress log. Run it alone.

    python benchmarks/probe_cli_scale.py --rows 1381167 --val-test 50000,50000 --classes 1000
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from probe_sweep import data_parser, data_path  # noqa: E402

DATASET, BACKBONE, KEY = "synthetic", "synthetic-relu.v0", "feat00000768"


def build_store(args: argparse.Namespace) -> Path:
    """The npz's splits as complete float16 feature sets (written once, then reused)."""
    from bob_cache.stores import FeatureSetRequest, open_store, resolve_layout

    npz = data_path(args)
    store = args.out / f"{npz.stem}-store"
    built = store.with_name(store.name + ".built")
    if built.exists():
        return store
    shutil.rmtree(store, ignore_errors=True)
    data = np.load(npz)
    started = time.perf_counter()
    fstore = open_store(store, mode="a")
    for split in ("train", "val", "test"):
        x, y = data[f"x_{split}"], data[f"y_{split}"]
        request = FeatureSetRequest(
            path=f"{DATASET}/{split}/{BACKBONE}/{KEY}", key=KEY,
            spec={"layer": "final", "pool": "head", "dtype": "float16"},
            provenance={
                "dataset": {"name": DATASET, "class_names": []}, "split": split,
                "backbone": {"slug": BACKBONE, "name": "synthetic", "arch": "synthetic"},
            },
            n_rows=len(x), dim=x.shape[1], dtype="float16",
        )  # fmt: skip
        fs = fstore.require(request, resolve_layout(), label_shape=())
        fs.write_rows(x, labels=y, ids=[f"{split}/{i:07d}" for i in range(len(x))])
        fs.finalize()
    built.write_text(f"{time.perf_counter() - started:.1f} s\n")
    return store


def run_cli(store: Path, results: Path) -> dict[str, Any]:
    shutil.rmtree(results, ignore_errors=True)
    bob_cache = Path(sys.executable).with_name("bob-cache")
    cmd = ["/usr/bin/time", "-v", str(bob_cache), "--log-level", "info"]
    cmd += ["probe", "--store", str(store)]
    cmd += ["--dataset", DATASET, "--backbone", BACKBONE, "--method", "linear"]
    cmd += ["--results", str(results), "--json"]
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - started
    log = results.with_suffix(".log")
    log.write_text(done.stderr)
    if done.returncode != 0:
        raise SystemExit(f"bob-cache probe failed ({done.returncode}); see {log}")
    rss_kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr).group(1))
    summary = json.loads(done.stdout)
    row = next(r for r in summary["table"] if r["method"] == "linear")
    return {
        "seconds": seconds,
        "peak_rss_GiB": rss_kb / 2**20,
        "test_top1": float(row["top1"]),
        "C": float(row["C"]),
        "log": log.name,
    }


def main() -> None:
    args = data_parser(__doc__).parse_args()
    store = build_store(args)
    report = {"rows": args.rows, "dim": args.dim, "classes": args.classes}
    report["cores"] = os.cpu_count()
    report["store_GB"] = sum(f.stat().st_size for f in store.rglob("*") if f.is_file()) / 1e9
    report["cli"] = run_cli(store, store.with_name(store.name + "-results"))
    out = args.out / f"probe_cli-{store.name.removeprefix('probe-')}.json"
    out.write_text(json.dumps(report, indent=1))
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
