"""Fine-tuning throughput (issue 13): ``bob-cache finetune`` against a bare training loop over
the same torchvision model, measured in one run on this machine.

Per task (``instance``: Mask R-CNN with an FPN over ResNet-50; ``semantic``: the FPN semantic
head over ResNet-50), both sides train the same network (random init, every weight trained,
fp32 on the CPU, AdamW) on the same synth-shapes images at the same batch size:

- ``bare``: a minimal hand loop (forward, summed loss, backward, step) over the images and
  targets held in memory as tensors, in a child process;
- ``bob``: ``bob-cache finetune --mode random-init`` reading the PNGs and COCO json from disk
  with its data loader (its default on a CPU: decoding in the training process; ``--workers N``
  to try loader processes), epoch 2's images/s (the train loop from its first batch; the
  validation pass and the loader's start are timed apart), in a child process.

Goal: bob ÷ bare ≥ 0.95. Peak RSS of each child is reported too.

    python benchmarks/finetune_throughput.py                   # ~10 min on 2 cores
    python benchmarks/finetune_throughput.py --tasks instance --steps 4 --image-size 128
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

BACKBONE = "resnet50"


def bare(task: str, data: Path, *, steps: int, batch: int, size: int, warmup: int) -> dict:
    """The hand loop: runs in this (child) process; returns images/s over ``steps`` steps."""
    import torch

    from bob_cache.backbones import create_backbone
    from bob_cache.finetune.tasks import TaskInputs, get_task

    torch.manual_seed(0)
    kind = get_task(task)
    backbone = create_backbone(BACKBONE, random_init=True, image_size=size)
    mean, std = backbone.data_config["mean"], backbone.data_config["std"]
    train = str(data / ("train.json" if task != "semantic" else "train"))
    val = train.replace("train", "val")
    inputs = TaskInputs(train=train, val=val, image_size=size)
    dataset = kind.load(inputs, mean=mean, std=std)
    net = backbone.model.requires_grad_(True).train()
    model = kind.build(net, dataset, name=BACKBONE, frozen=False, inputs=inputs, mean=mean, std=std)
    batches = [kind.collate([dataset.train[(i * batch + j) % len(dataset.train)]
                             for j in range(batch)]) for i in range(steps + warmup)]  # fmt: skip
    if task == "semantic":  # what the stage's loss does, done once up front here
        batches = [(images.float(), torch.stack(masks)) for images, masks in batches]
    else:
        batches = [([im.float().div(255) for im in images], targets) for images, targets in batches]
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
    model.train()
    started = 0.0
    for i, (images, targets) in enumerate(batches):
        if i == warmup:
            started = time.perf_counter()
        if task == "semantic":
            logits = model(images)
            loss = torch.nn.functional.cross_entropy(logits, targets, ignore_index=-100)
        else:
            loss = sum(model(images, targets).values())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - started
    return {"images_per_second": steps * batch / seconds, "seconds": seconds}


def run_child(args: list[str]) -> tuple[dict, float]:
    """Run a child process under GNU time; its JSON output and its peak RSS in GiB (the
    largest of the child and the loader processes it waited for)."""
    done = subprocess.run(["/usr/bin/time", "-f", "MAXRSS_KB=%M", *args], capture_output=True,
                          text=True, check=False)  # fmt: skip
    if done.returncode:
        raise SystemExit(f"{args[:4]} failed:\n{done.stderr[-3000:]}")
    peak_kb = int(done.stderr.rsplit("MAXRSS_KB=", 1)[1].split()[0])
    out = done.stdout
    return json.loads(out[out.index("{") :]), peak_kb / 2**20


def bob(
    task: str, data: Path, out: Path, *, steps: int, batch: int, size: int, workers: int | None
) -> list[str]:
    train = data / ("train.json" if task != "semantic" else "train")
    val = data / ("val.json" if task != "semantic" else "val")
    return [
        sys.executable, "-m", "bob_cache.cli", "finetune", "--task", task, "--backbone",
        BACKBONE, "--mode", "random-init", "--train", str(train), "--val", str(val),
        "--image-size", str(size), "--epochs", "2", "--steps-per-epoch", str(steps),
        "--batch-size", str(batch), "--lr", "1e-4", "--device", "cpu",
        "--precision", "fp32", "--out", str(out), "--results", str(out / "results"), "--json",
        *(["--workers", str(workers)] if workers is not None else []),
    ]  # fmt: skip


def measure(task: str, root: Path, args: argparse.Namespace) -> dict:
    from bob_cache.data.synth_shapes import write_synth_shapes

    data = root / "shapes"
    n = args.steps * args.batch_size + 8
    write_synth_shapes(data, n=n, image_size=args.image_size, val_fraction=8 / n)
    common = dict(steps=args.steps, batch=args.batch_size, size=args.image_size)
    me = [sys.executable, __file__, "--child", task, "--data", str(data),
          "--steps", str(args.steps), "--batch-size", str(args.batch_size),
          "--image-size", str(args.image_size)]  # fmt: skip
    hand, hand_rss = run_child(me)
    out = root / f"run-{task}"
    summary, bob_rss = run_child(bob(task, data, out, workers=args.workers, **common))
    warm = summary["runs"][0]["history"][1]
    ratio = warm["images_per_second"] / hand["images_per_second"]
    return {
        "task": task, "bare_images_per_second": round(hand["images_per_second"], 3),
        "bob_images_per_second": round(warm["images_per_second"], 3), "ratio": round(ratio, 3),
        "bare_peak_rss_gib": round(hand_rss, 2), "bob_peak_rss_gib": round(bob_rss, 2),
    }  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", default="instance,semantic")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=256)
    parser.add_argument(
        "--workers", type=int, default=None, help="bob's loader processes (default: its own)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        import torch

        torch.set_num_threads(os.cpu_count() or 1)
        result = bare(args.child, Path(args.data), steps=args.steps, batch=args.batch_size,
                      size=args.image_size, warmup=2)  # fmt: skip
        print(json.dumps(result))
        return
    import torch

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for task in args.tasks.split(","):
            rows.append(measure(task, Path(tmp) / task, args))
            print(json.dumps(rows[-1]), flush=True)
    print(json.dumps({
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__, "backbone": BACKBONE, "image_size": args.image_size,
        "batch_size": args.batch_size, "steps": args.steps, "results": rows,
    }, indent=2))  # fmt: skip


if __name__ == "__main__":
    main()
