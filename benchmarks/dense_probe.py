"""Dense linear probe: time and peak memory of ``bob-cache probe --method dense-linear`` on a CPU.

Data: N images of 14 × 14 × 768 float16 grids (ViT-B/16 at 224 px) in a Zarr feature store,
written through the store API one shard at a time, with 224 × 224 masks of ~20 classes on
disk in a segmentation folder (``train/ val/ test/`` each with ``masks/``, 80/10/10). Masks
are derived from the grid, so the task is learnable: each image has a few classes (background
always), each with a smooth score field on the 14 × 14 grid; the mask is the argmax of those
fields bilinearly upsampled to 224 × 224 (so pixels inside a patch can differ, as real
boundaries do), and the features are the fields mixed into 768 dimensions plus noise. A
perfect linear probe reaches mIoU 1 up to the noise.

The probe runs in a fresh process; its peak memory is that process's ``VmHWM`` (its own
high-water RSS, not inherited from this parent). The data is cached under ``--out``.

    python benchmarks/dense_probe.py --images 10000           # the measurement (3 GB of grids)
    python benchmarks/dense_probe.py --images 200 --epochs 2  # a quick check
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent
GRID, DIM, MASK = 14, 768, 224
SPLITS = (("train", 0.8), ("val", 0.1), ("test", 0.1))
KEY = "densebench01"


def class_fields(rng: np.random.Generator, n: int, classes: int) -> np.ndarray:
    """``(n, classes, GRID, GRID)`` score fields: background and 1-3 other classes per image
    get a smooth random field (4 × 4 noise upsampled), every other class a low constant."""
    import torch
    import torch.nn.functional as F

    coarse = torch.from_numpy(rng.normal(0, 1.5, size=(n, classes, 4, 4)).astype(np.float32))
    fields = F.interpolate(coarse, size=(GRID, GRID), mode="bicubic", align_corners=False)
    present = np.zeros((n, classes), bool)
    present[:, 0] = True
    for i in range(n):
        present[i, 1 + rng.choice(classes - 1, size=rng.integers(1, 4), replace=False)] = True
    fields[~torch.from_numpy(present)] = -6.0
    fields[:, 0] += 0.5  # background covers the most pixels, as in ADE20K or VOC
    return fields.numpy()


def masks_of(fields: np.ndarray) -> np.ndarray:
    """``(n, MASK, MASK)`` uint8: the argmax of the fields bilinearly upsampled to the mask."""
    import torch
    import torch.nn.functional as F

    up = F.interpolate(
        torch.from_numpy(fields), size=(MASK, MASK), mode="bilinear", align_corners=False
    )
    return up.argmax(1).to(torch.uint8).numpy()


def grids_of(fields: np.ndarray, mixing: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``(n, GRID, GRID, DIM)`` float32: the fields mixed into DIM dimensions, plus noise."""
    x = np.einsum("nchw,cd->nhwd", fields, mixing)
    return x + rng.normal(0, 1.0, size=x.shape).astype(np.float32)


def build(root: Path, *, images: int, classes: int, seed: int = 0) -> Path:
    """Write the store and the masks under ``root`` once (``done.json`` marks them complete)."""
    from PIL import Image

    from bob_cache.stores import open_store, resolve_layout
    from bob_cache.stores.feature_set import ShardRows

    if (root / "done.json").is_file():
        return root
    rng = np.random.default_rng(seed)
    mixing = rng.normal(0, 1 / np.sqrt(classes), size=(classes, DIM)).astype(np.float32)
    names = ["background", *(f"class{i:02d}" for i in range(1, classes))]
    data = root / "data"
    data.mkdir(parents=True, exist_ok=True)
    (data / "classes.json").write_text(json.dumps({"classes": names[1:], "ignore_index": 255}))
    store = open_store(root / "store", mode="a")
    layout = resolve_layout(chunk_rows=1, shard_rows=256)
    counts = _split_counts(images)
    for split, n in counts.items():
        (data / split / "masks").mkdir(parents=True, exist_ok=True)
        (data / split / "images").mkdir(exist_ok=True)
        fs = store.require(_request(split, n, data, names), layout)
        for shard in range(layout.n_shards(n)):
            a, b = layout.shard_bounds(shard, n)
            fields = class_fields(rng, b - a, classes)
            ids = [f"{split}-{i:06d}.png" for i in range(a, b)]
            for mask, name in zip(masks_of(fields), ids, strict=True):
                Image.fromarray(mask).save(data / split / "masks" / name)
            rows = ShardRows(np.full(b - a, -1), ids, [""] * (b - a), [""] * (b - a))
            fs.write_shard(shard, grids_of(fields, mixing, rng), rows)
        fs.finalize()
    (root / "done.json").write_text(json.dumps({"images": counts, "classes": classes}))
    return root


def _split_counts(images: int) -> dict[str, int]:
    val = test = max(1, round(images * SPLITS[1][1]))
    return {"train": images - val - test, "val": val, "test": test}


def _request(split: str, n: int, data: Path, names: list[str]) -> Any:
    from bob_cache.stores import FeatureSetRequest

    preprocessing = {
        "input_size": [3, MASK, MASK], "interpolation": "bicubic", "mean": [0.5] * 3,
        "std": [0.5] * 3, "crop_pct": 1.0, "crop_mode": "center", "decode": "pil",
    }  # fmt: skip
    segmentation = {"root": str(data), "splits": {s: s for s, _ in SPLITS}, "ignore_index": 255}
    return FeatureSetRequest(
        path=f"synth/{split}/synthetic.grid/{KEY}", key=KEY,
        spec={"layer": "synthetic", "pool": "grid", "dtype": "float16",
              "preprocessing": preprocessing},
        provenance={
            "dataset": {"name": "synth", "kind": "segfolder", "class_names": names,
                        "segmentation": segmentation},
            "split": split,
            "backbone": {"slug": "synthetic.grid", "name": "synthetic", "arch": "synthetic"},
        },
        n_rows=n, dim=DIM, dtype="float16", grid=(GRID, GRID),
    )  # fmt: skip


def child(root: Path, args: argparse.Namespace) -> None:
    """Run the dense probe once (this process's peak memory is the measurement)."""
    from bob_cache.pipelines.dense_probe import DenseProbeConfig, dense_probe

    config = DenseProbeConfig(
        store=str(root / "store"), dataset="synth", backbone="synthetic",
        results=str(root / f"results-{time.time_ns()}"), epochs=args.epochs,
        batch_size=args.batch_size, **({"lrs": args.lrs} if args.lrs else {}),
    )  # fmt: skip
    start = time.perf_counter()
    summary = dense_probe(config)
    seconds = time.perf_counter() - start
    print(json.dumps({
        "seconds": seconds, "peak_rss_GiB": _vm_hwm_gib(), "metrics": summary.metrics,
        "lr": summary.lr, "val_mIoU_by_lr": summary.val_miou, "train_rows": summary.train_rows,
        "val_rows": summary.val_rows, "scored_split": summary.scored_split,
        "protocol": summary.protocol,
    }))  # fmt: skip


def _vm_hwm_gib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--classes", type=int, default=20, help="classes including background")
    p.add_argument("--epochs", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--lrs", type=lambda t: tuple(float(v) for v in t.split(",")), default=None)
    p.add_argument("--out", type=Path, default=HERE / "out")
    p.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        child(args.child, args)
        return
    root = args.out / f"dense_probe-{args.images}x{GRID}x{GRID}x{DIM}-c{args.classes}"
    started = time.perf_counter()
    build(root, images=args.images, classes=args.classes)
    built = time.perf_counter() - started
    cmd = [sys.executable, __file__, "--child", str(root), "--epochs", str(args.epochs),
           "--batch-size", str(args.batch_size)]  # fmt: skip
    if args.lrs:
        cmd += ["--lrs", ",".join(map(str, args.lrs))]
    done = subprocess.run(cmd, stdout=subprocess.PIPE, text=True, check=True)
    gib = args.images * GRID * GRID * DIM * 2 / 2**30
    report = {
        "images": args.images, "grid": [GRID, GRID, DIM], "mask": [MASK, MASK],
        "classes": args.classes, "epochs": args.epochs, "batch_size": args.batch_size,
        "float16_grids_GiB": round(gib, 3), "cores": os.cpu_count(),
        "data_build_seconds": round(built, 1), **json.loads(done.stdout),
    }  # fmt: skip
    path = args.out / f"dense_probe-{args.images}-e{args.epochs}.json"
    path.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
