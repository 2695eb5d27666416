"""The fine-tuning family: ``finetune`` (classification, detection, instance and semantic
segmentation over any backbone, with a learning-rate sweep)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from bob_cache.commands.common import (
    DeviceOpt,
    JsonOpt,
    QuietOpt,
    ResultsOpt,
    SplitFractionsOpt,
    handle_errors,
    out,
    print_json,
    print_table,
)

FINETUNE_EXAMPLE = (
    "Example: bob-cache synth-shapes --out shapes --n 200, then bob-cache finetune --task "
    "detection --backbone resnet50 --train shapes/train.json --val shapes/val.json --mode "
    "frozen --lr 1e-4,3e-4 --epochs 12 --image-size 256 --out runs/det"
)


@handle_errors
def finetune(
    task: Annotated[str, typer.Option(help="classification, detection, instance or semantic.")],
    backbone: Annotated[str, typer.Option(help="Registry, timm or tv: backbone name.")],
    train: Annotated[
        str,
        typer.Option(
            help="Training data: an image source (classification: folder, manifest or "
            "builtin:digits), a COCO json (detection, instance) or a folder with images/ and "
            "masks/ (semantic)."
        ),
    ],
    val: Annotated[str, typer.Option(help="Validation data, same kind: picks lr and epoch.")],
    test: Annotated[
        str | None,
        typer.Option(help="Test data, scored once; another dataset for cross-domain drop."),
    ] = None,
    split_fractions: SplitFractionsOpt = None,
    mode: Annotated[
        str,
        typer.Option(
            help="finetune (all weights), frozen (backbone fixed, heads trained) or "
            "random-init (all weights, from scratch)."
        ),
    ] = "finetune",
    lr: Annotated[
        str, typer.Option(help="Learning rate(s), comma-separated: one run each, best on val.")
    ] = "1e-4",
    epochs: Annotated[int, typer.Option(help="Epochs per learning rate.")] = 10,
    batch_size: Annotated[int, typer.Option(help="Images per step (per GPU under torchrun).")] = 16,
    accum_steps: Annotated[
        int, typer.Option(help="Steps whose gradients add up before each update.")
    ] = 1,
    image_size: Annotated[
        int | None, typer.Option(help="Square input size (default: the backbone's).")
    ] = None,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 0.05,
    layer_decay: Annotated[
        float | None,
        typer.Option(help="Layer-wise lr decay (default 0.75 for transformers, off for CNNs)."),
    ] = None,
    warmup_epochs: Annotated[float, typer.Option(help="Linear warm-up, in epochs.")] = 1.0,
    steps_per_epoch: Annotated[
        int | None, typer.Option(help="Cap on steps per epoch (quick runs).")
    ] = None,
    images: Annotated[
        str | None, typer.Option(help="COCO: image folder (default: the json's folder).")
    ] = None,
    classes: Annotated[
        str | None,
        typer.Option(help="Semantic: class names without background, when no classes.json."),
    ] = None,
    ignore_index: Annotated[int, typer.Option(help="Semantic: mask value to ignore.")] = 255,
    weights: Annotated[
        str | None, typer.Option(help="Local checkpoint instead of the pretrained weights.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seeds data order, augmentation and init.")] = 0,
    precision: Annotated[
        str, typer.Option(help="auto (bf16 on GPUs), fp32, bf16 or fp16 (CUDA).")
    ] = "auto",
    device: DeviceOpt = "auto",
    workers: Annotated[
        int | None,
        typer.Option(help="Data-loading processes (default: none on a CPU, up to 8 on a GPU)."),
    ] = None,
    out_dir: Annotated[
        str, typer.Option("--out", help="Run folder: configs, logs, checkpoints, predictions.")
    ] = "bob-finetune",
    results: ResultsOpt = None,
    name: Annotated[str | None, typer.Option(help="Dataset name in the results table.")] = None,
    resume: Annotated[
        bool, typer.Option("--resume", help="Continue the run in --out from its checkpoint.")
    ] = False,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Fine-tune a backbone for classification, detection, instance or semantic segmentation.

    Each --lr value trains on --train and keeps its best epoch on --val; the best run is
    scored on --val and --test (COCO AP with pycocotools, mIoU, top-1) and its rows go to the
    results table (stage finetune). Detection and instance runs write their COCO predictions
    (predictions_*.json) beside the checkpoint. Several GPUs: torchrun --nproc_per_node N -m
    bob_cache.cli finetune ...
    """
    from bob_cache.data.splits import parse_split_fractions
    from bob_cache.finetune.tasks import parse_lrs
    from bob_cache.pipelines import get_stage
    from bob_cache.pipelines.finetune import FinetuneConfig
    from bob_cache.stores.results import DEFAULT_RESULTS

    fractions = parse_split_fractions(split_fractions)
    config = FinetuneConfig(
        task=task, backbone=backbone, train=train, val=val, test=test, images=images,
        classes=tuple(c.strip() for c in classes.split(",") if c.strip()) if classes else None,
        ignore_index=ignore_index, split_fractions=fractions and fractions.as_tuple(), mode=mode,
        lrs=parse_lrs(lr), epochs=epochs,
        batch_size=batch_size, accum_steps=accum_steps, image_size=image_size,
        weight_decay=weight_decay, layer_decay=layer_decay, warmup_epochs=warmup_epochs,
        steps_per_epoch=steps_per_epoch, weights=weights, seed=seed, precision=precision,
        device=device, workers=workers, out=out_dir, results=results or DEFAULT_RESULTS,
        name=name, resume=resume, quiet=quiet or as_json,
    )  # fmt: skip
    summary = get_stage("finetune")(config)
    if summary is None:  # a torchrun rank other than 0: rank 0 reports
        return
    if as_json:
        print_json(summary.to_dict())
        return
    _print_summary(summary)


def _print_summary(summary: object) -> None:
    s = summary.__dict__
    out.print(
        f"Fine-tuned [bold]{escape(s['backbone'])}[/] ({s['mode']}) for {s['task']} on "
        f"{escape(s['dataset'])}: best lr {s['best_lr']:g} (epoch {s['best_epoch'] + 1}), "
        f"{s['seconds']:.1f} s. Run folder: {escape(s['out'])}",
        highlight=False,
    )
    keys = [k for k in s["val"] if not k.startswith("iou_") and "_AR" not in k]
    rows = [{"split": "val", **_cells(s["val"], keys)}]
    if s["test"] is not None:
        rows.append({"split": "test", **_cells(s["test"], keys)})
        rows.append({"split": "drop", **_cells(s["drop"], keys)})
    print_table(rows, ("split", *keys))
    for run in s["runs"]:
        score = run["val"][s["primary"]]
        out.print(f"  lr {run['lr']:g}: val {s['primary']} {score:.4f}", highlight=False)
    seen = s["runs"][0].get("train_images_per_epoch") if s["runs"] else None
    total = s["info"].get("train_images", s["info"].get("train_rows"))
    if seen is not None and total is not None and seen < total:
        out.print(
            f"  each epoch trained on {seen} of the {total} training images (full batches; "
            "a new draw each epoch)",
            highlight=False,
        )
    dropped = {k: v for k, v in s["info"].items() if k.endswith("_dropped")}
    for key, counts in dropped.items():
        out.print(f"  {key.replace('_', ' ')} annotations: {counts}", highlight=False)


def _cells(metrics: dict[str, float], keys: list[str]) -> dict[str, str]:
    """Four decimals; "–" where pycocotools reports -1 (no ground truth in that size range)."""
    return {k: "–" if metrics.get(k, -1.0) == -1.0 else f"{metrics[k]:.4f}" for k in keys}


def register(app: typer.Typer) -> None:
    """Add the fine-tuning family's commands to ``app``."""
    app.command(epilog=FINETUNE_EXAMPLE)(finetune)
