"""Reading CIFAR-100 from its pickles (``torchvision:CIFAR100:ROOT``) against the bare forward.

No data may be downloaded, so the script writes a synthetic copy in CIFAR-100's exact on-disk
format (``cifar-100-python/{train,test,meta}``: pickled dicts of 3072-byte rows) and, since
its MD5 sums differ from the official files', patches torchvision's checksum test in this
process only. In one run, in interleaved rounds (bare, extract, bare, ...):

- bare: the bob-cache backbone's forward on the same images already decoded and preprocessed
  into tensors in memory (the limit);
- extract: ``bob-cache extract --data torchvision:CIFAR100:ROOT`` in-process: pixels come
  straight from the pickled arrays (no JPEG round trip), through preprocessing, the forward,
  and the store commits; its own images/s, decode to commit;
- loader: the extraction loader alone (array → PIL → preprocess → batch; no model).

The figure is the median over rounds of extract ÷ (mean of the bare runs around it).

    python benchmarks/bench_cifar_pickles.py [--images 10000] [--model resnet50] \
        [--device cpu|cuda] [--precision fp32|bf16] [--batch-size 128] [--workers 4]
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np


def write_cifar100(root: Path, *, train: int, test: int) -> Path:
    """A synthetic CIFAR-100 copy in the distributed pickle format (smooth random images)."""
    rng = np.random.default_rng(0)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", train), ("test", test)):
        coarse = rng.integers(0, 256, (n, 3, 4, 4)).astype(np.uint8)
        data = np.repeat(np.repeat(coarse, 8, axis=2), 8, axis=3)  # 32 x 32 planes
        data = (data + rng.integers(0, 16, data.shape, dtype=np.uint8)).reshape(n, 3072)
        entry = {"filenames": [f"{name}_{i}.png" for i in range(n)], "batch_label": name,
                 "fine_labels": (np.arange(n) % 100).tolist(), "coarse_labels": [0] * n,
                 "data": data}  # fmt: skip
        (folder / name).write_bytes(pickle.dumps(entry, protocol=4))
    meta = {"fine_label_names": [f"class{i:03d}" for i in range(100)],
            "coarse_label_names": [f"super{i:02d}" for i in range(20)]}  # fmt: skip
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=4))
    return root


def skip_md5() -> None:
    """Let torchvision accept the synthetic copy (file existence only), in this process."""
    import torchvision.datasets.cifar as cifar

    cifar.check_integrity = lambda path, md5=None: os.path.isfile(path)


def backbone(args: argparse.Namespace) -> Any:
    import torch

    from bob_cache.backbones import create_backbone

    return create_backbone(f"timm:{args.model}", random_init=True).to(torch.device(args.device))


def preprocessed(source: Any, bb: Any, n: int) -> Any:
    """The extracted images, decoded from the arrays and resized once: one uint8 tensor on
    the backbone's device."""
    import torch

    transform = bb.transform()
    rows = source.splits["train"][:n]
    return torch.stack([transform(source.open_image(s)) for s in rows]).to(bb.mean.device)


def bare(bb: Any, images: Any, args: argparse.Namespace) -> float:
    """Images/s of the forward alone on ``images`` (uint8, preprocessed, already on the
    device): per batch the scaling and normalization extraction does, then the model. On
    CUDA as extraction has it: channels_last, cuDNN autotuned, autocast at ``--precision``."""
    import torch

    from bob_cache.device import autocast

    dev = torch.device(args.device)
    cuda = dev.type == "cuda"
    if cuda:
        torch.backends.cudnn.benchmark = True
        bb = bb.to(memory_format=torch.channels_last)
    layout = torch.channels_last if cuda else torch.contiguous_format
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    batches = images.split(args.batch_size)
    with torch.inference_mode(), autocast(dev, args.precision):
        for batch in batches[:3] if cuda else batches[:1]:  # warm-up
            bb(bb.normalize(batch).contiguous(memory_format=layout))
        sync()
        start, n = time.perf_counter(), 0
        for batch in batches:
            bb(bb.normalize(batch).contiguous(memory_format=layout))
            n += len(batch)
        sync()
    return n / (time.perf_counter() - start)


def extract_rate(spec: str, store: Path, args: argparse.Namespace) -> float:
    from bob_cache.config import ExtractConfig
    from bob_cache.pipelines.extract import extract

    shutil.rmtree(store, ignore_errors=True)
    config = ExtractConfig(
        data=spec, backbone=f"timm:{args.model}", random_init=True, store=str(store),
        batch_size=args.batch_size, workers=args.workers, device=args.device,
        precision=args.precision, limit=args.images, split="train", quiet=True,
    )  # fmt: skip
    return float(extract(config).images_per_second)


def loader_rate(source: Any, bb: Any, args: argparse.Namespace) -> float:
    """Images/s of extraction's loader alone (array → PIL → preprocess → batch; no model)."""
    from torch.utils.data import DataLoader

    from bob_cache.data import ImageDataset, collate_rows

    rows = source.splits["train"][: args.images]
    dataset = ImageDataset(source, rows, bb.transform(), bb.data_config["input_size"])
    loader = DataLoader(dataset, batch_size=args.batch_size, num_workers=args.workers,
                        collate_fn=collate_rows)  # fmt: skip
    start, n = time.perf_counter(), 0
    for images, *_ in loader:
        n += len(images)
    return n / (time.perf_counter() - start)


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--images", type=int, default=10_000, help="train images extracted")
    p.add_argument("--model", default="resnet50")
    p.add_argument("--device", default="cpu")
    p.add_argument("--precision", default="fp32")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--root", type=Path, default=None, help="where the synthetic copy is written")
    args = p.parse_args()
    skip_md5()
    from bob_cache.data import parse_source

    with tempfile.TemporaryDirectory() as tmp:
        root = write_cifar100(args.root or Path(tmp) / "cifar", train=args.images, test=100)
        spec = f"torchvision:CIFAR100:{root}"
        source = parse_source(spec)
        bb = backbone(args)
        images = preprocessed(source, bb, args.images)
        runs: dict[str, list[float]] = {"bare": [], "extract": [], "loader": []}
        ratios = []
        for _ in range(args.rounds):
            before = bare(bb, images, args)
            runs["extract"].append(extract_rate(spec, Path(tmp) / "store", args))
            runs["loader"].append(loader_rate(source, bb, args))
            after = bare(bb, images, args)
            runs["bare"] += [before, after]
            ratios.append(runs["extract"][-1] / ((before + after) / 2))
    row = {
        "benchmark": "cifar_pickles", "dataset": "synthetic CIFAR-100 (pickle format)",
        "images": args.images, "model": args.model, "device": args.device,
        "precision": args.precision, "batch_size": args.batch_size, "workers": args.workers,
        **{f"{k}_img_s": statistics.median(v) for k, v in runs.items()},
        "extract_over_bare": statistics.median(ratios), "runs": runs,
        "command": shlex.join([sys.executable, *sys.argv]),
    }  # fmt: skip
    print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
