"""Extraction on Dask against one process (issue 14): the cluster's overhead and scaling.

The same ``bob-cache extract`` (a random-init ResNet-18 at 160 px over a folder of JPEGs made
here, two loader processes) runs in a fresh child process per mode, into an empty store:

- ``single``: the plain command, one process (the baseline);
- ``cluster-1`` and ``cluster-2``: ``--local-cluster 1`` and ``--local-cluster 2`` (a
  ``LocalCluster`` started by the command, one part per worker; the caller only finalizes).

Wall time is the whole command, cluster start and stop included. Overhead = cluster-1 ÷
single − 1 (goal ≤ 5%); the feature arrays of every mode must equal the single run's.

    python benchmarks/extract_cluster.py                   # ~10 min on 2 cores
    python benchmarks/extract_cluster.py --images 400      # a quick look
    python benchmarks/extract_cluster.py --modes single,cluster-1 --repeats 3   # medians
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
MODES = {"single": [], "cluster-1": ["--local-cluster", "1"], "cluster-2": ["--local-cluster", "2"]}


def make_images(root: Path, n: int) -> Path:
    """``n`` 500×375 JPEGs in 10 class folders (deterministic), made once."""
    from PIL import Image

    folder = root / f"jpegs-{n}"
    if (folder / ".done").exists():
        return folder
    rng = np.random.default_rng(0)
    for i in range(n):
        cls = folder / f"c{i % 10}"
        cls.mkdir(parents=True, exist_ok=True)
        base = rng.integers(0, 255, size=(47, 63, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize((500, 375), Image.BILINEAR)
        image.save(cls / f"{i:05d}.jpg", quality=90)
    (folder / ".done").write_text("ok")
    return folder


def run(mode: str, data: Path, store: Path) -> dict:
    cmd = [
        sys.executable, "-m", "bob_cache.cli", "extract", "--data", str(data), "--backbone",
        "resnet18", "--random-init", "--image-size", "160", "--workers", "2", "--batch-size",
        "32", "--shard-rows", "256", "--store", str(store), "--json", *MODES[mode],
    ]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"{mode} failed:\n{done.stderr[-3000:]}")
    summary = json.loads(done.stdout)
    return {"mode": mode, "wall_s": round(wall, 2), "rows": summary["rows_computed"]}


def features(store: Path) -> np.ndarray:
    from bob_cache.stores import open_store

    (fs,) = open_store(store).feature_sets()
    return fs.features[:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--modes", default=",".join(MODES))
    parser.add_argument(
        "--repeats", type=int, default=1, help="rounds of all modes, interleaved; medians shown"
    )
    args = parser.parse_args()
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    data = make_images(out, args.images)
    runs, reference = [], None
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        for repeat in range(args.repeats):
            for mode in args.modes.split(","):
                store = Path(tmp) / f"{mode}-{repeat}"
                row = run(mode, data, store)
                x = features(store)
                reference = x if reference is None else reference
                row["equal_to_first"] = bool(np.array_equal(x, reference))
                row["repeat"] = repeat
                runs.append(row)
                print(json.dumps(row), file=sys.stderr, flush=True)
    rows = []
    for mode in args.modes.split(","):
        mine = [r for r in runs if r["mode"] == mode]
        walls = sorted(r["wall_s"] for r in mine)
        rows.append({"mode": mode, "wall_s": float(np.median(walls)), "all_wall_s": walls,
                     "equal_to_first": all(r["equal_to_first"] for r in mine)})  # fmt: skip
    base = next((r["wall_s"] for r in rows if r["mode"] == "single"), None)
    for r in rows:
        r["vs_single"] = round(r["wall_s"] / base, 3) if base else None
    machine = {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
               "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}  # fmt: skip
    path = out / "extract-cluster.json"
    path.write_text(json.dumps({"machine": machine, "images": args.images, "rows": rows}, indent=1))
    print("| mode | wall s (median) | all runs | ÷ single | features equal |")
    print("| --- | --- | --- | --- | --- |")
    for r in rows:
        walls = ", ".join(f"{w:.1f}" for w in r["all_wall_s"])
        print(f"| {r['mode']} | {r['wall_s']:.1f} | {walls} | {r['vs_single']} "
              f"| {r['equal_to_first']} |")  # fmt: skip


if __name__ == "__main__":
    main()
