"""Extraction from WebDataset shards against extraction from the same JPEGs as a folder.

``N`` 500×375 JPEGs in 10 class folders (``extract_cluster.py``'s generator), and the same
bytes packed into uncompressed tar shards (``KEY.jpg`` + ``KEY.cls``, ``--per-shard`` samples
each). Both are extracted by ``bob-cache extract`` in fresh child processes into fresh stores,
alternating folder / shards for ``--repeats`` rounds, with ``--split-fractions 1,0,0`` so both
put every image in one split. Reported: images/s of each (the stage's own rate, decode to
commit, and the wall-clock rate including listing and start-up), medians over rounds, and
the ratio shards ÷ folder.

Goal: ratio ≥ 0.95 on this CPU (reading a member by offset from an open tar costs no more than
opening a file).

    python benchmarks/bench_webdataset.py                        # ~10 min on 2 cores
    python benchmarks/bench_webdataset.py --images 40 --repeats 1 --backbone test_resnet  # smoke
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from extract_cluster import make_images  # noqa: E402


def make_shards(folder: Path, root: Path, per_shard: int) -> str:
    """The folder's JPEGs, in its listing order, as ``KEY.jpg``/``KEY.cls`` tar shards (made
    once); returns the ``--data`` pattern."""
    files = sorted(folder.glob("*/*.jpg"))
    classes = sorted({f.parent.name for f in files})
    n_shards = -(-len(files) // per_shard)
    out = root / f"shards-{len(files)}-{per_shard}"
    pattern = f"{out}/{{{0:05d}..{n_shards - 1:05d}}}.tar"
    if (out / ".done").exists():
        return pattern
    out.mkdir(parents=True, exist_ok=True)
    for s in range(n_shards):
        with tarfile.open(out / f"{s:05d}.tar", "w") as tar:
            for i, path in enumerate(files[s * per_shard : (s + 1) * per_shard]):
                key = f"{s:05d}{i:05d}"
                label = str(classes.index(path.parent.name)).encode()
                for ext, data in (("jpg", path.read_bytes()), ("cls", label)):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
    (out / ".done").write_text("ok")
    return pattern


def command(data: str, store: Path, args: argparse.Namespace) -> list[str]:
    return [
        sys.executable, "-m", "bob_cache.cli", "extract", "--data", data, "--backbone",
        args.backbone, "--random-init", "--image-size", str(args.image_size), "--workers",
        str(args.workers), "--batch-size", str(args.batch_size), "--split-fractions", "1,0,0",
        "--device", "cpu", "--store", str(store), "--json", "-q",
    ]  # fmt: skip


def run(data: str, store: Path, args: argparse.Namespace) -> dict[str, float]:
    started = time.perf_counter()
    done = subprocess.run(command(data, store, args), capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    if done.returncode:
        raise SystemExit(f"extract --data {data} failed:\n{done.stderr[-3000:]}")
    summary = json.loads(done.stdout)
    rows = summary["rows_computed"]
    return {"images_per_s": summary["images_per_second"], "wall_images_per_s": rows / wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--per-shard", type=int, default=500)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--backbone", default="resnet18")
    parser.add_argument("--image-size", type=int, default=160)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    out = HERE / "out"
    out.mkdir(exist_ok=True)
    folder = make_images(out, args.images)
    shards = make_shards(folder, out, args.per_shard)
    runs: dict[str, list[dict[str, float]]] = {"folder": [], "shards": []}
    with tempfile.TemporaryDirectory(dir=out) as tmp:
        for r in range(args.repeats):
            for name, data in (("folder", str(folder)), ("shards", shards)):
                runs[name].append(run(data, Path(tmp) / f"{name}-{r}", args))

    def median(name: str, key: str) -> float:
        return round(statistics.median(x[key] for x in runs[name]), 2)

    result = {
        "benchmark": "webdataset-vs-folder",
        "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                    "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")},
        "images": args.images, "per_shard": args.per_shard, "repeats": args.repeats,
        "folder_images_per_s": median("folder", "images_per_s"),
        "shards_images_per_s": median("shards", "images_per_s"),
        "ratio": round(median("shards", "images_per_s") / median("folder", "images_per_s"), 3),
        "folder_wall_images_per_s": median("folder", "wall_images_per_s"),
        "shards_wall_images_per_s": median("shards", "wall_images_per_s"),
        "wall_ratio": round(median("shards", "wall_images_per_s")
                            / median("folder", "wall_images_per_s"), 3),
        "runs": runs,
        "command": " ".join(["python", "benchmarks/bench_webdataset.py", *sys.argv[1:]]),
        "extract": " ".join(command(shards, Path("STORE"), args)[1:]),
    }  # fmt: skip
    (out / "bench-webdataset.json").write_text(json.dumps(result, indent=1))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
