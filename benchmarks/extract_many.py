"""Decode once, extract many (issue 14) against separate runs, on this machine's CPU.

Three small random-init timm backbones with different preprocessing (``test_resnet``:
bilinear, mean 0.5; ``test_efficientnet``: bicubic, ImageNet mean; ``test_vit``: bicubic,
a transformer) over a folder of 500×375 JPEGs made by ``extract_cluster.py``'s generator,
each command in a fresh child process into an empty store:

- ``separate``: three ``bob-cache extract`` commands, one per backbone (their walls summed,
  and the slowest one alone);
- ``once``: one ``bob-cache extract --backbone test_resnet,test_efficientnet,test_vit``.

Goal: ``once`` ≤ the slowest separate run + 15%. The features of ``once`` must equal the
separate runs' (checked here, array by array).

    python benchmarks/extract_many.py                   # ~5 min on 2 cores
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
sys.path.insert(0, str(HERE))
from extract_cluster import make_images  # noqa: E402

BACKBONES = ("test_resnet", "test_efficientnet", "test_vit")


def run(backbone: str, data: Path, store: Path) -> float:
    cmd = [
        sys.executable, "-m", "bob_cache.cli", "extract", "--data", str(data), "--backbone",
        backbone, "--random-init", "--workers", "2", "--batch-size", "64", "--store", str(store),
        "-q",
    ]  # fmt: skip
    started = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if done.returncode:
        raise SystemExit(f"{backbone} failed:\n{done.stderr[-3000:]}")
    return time.perf_counter() - started


def arrays(store: Path) -> dict[str, np.ndarray]:
    from bob_cache.stores import open_store

    return {fs.path: fs.features[:] for fs in open_store(store).feature_sets()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    args = parser.parse_args()
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    data = make_images(out, args.images)
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        separate = {b: run(b, data, Path(tmp) / "separate") for b in BACKBONES}
        once = run(",".join(BACKBONES), data, Path(tmp) / "once")
        a, b = arrays(Path(tmp) / "separate"), arrays(Path(tmp) / "once")
        equal = sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)
    slowest = max(separate.values())
    result = {
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")},
        "images": args.images, "separate_s": {k: round(v, 2) for k, v in separate.items()},
        "separate_sum_s": round(sum(separate.values()), 2), "once_s": round(once, 2),
        "once_vs_slowest": round(once / slowest, 3),
        "once_vs_sum": round(once / sum(separate.values()), 3), "features_equal": equal,
    }  # fmt: skip
    (out / "extract-many.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
