"""The probe family: ``probe`` (classify from cached features; ``--method dense-linear``
segments from dense grids) and ``predict`` (classify stored rows or new images with a probe
head it stored)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from bob_cache.commands.common import (
    BackboneOpt,
    DatasetOpt,
    DeviceOpt,
    FeatureOpt,
    JsonOpt,
    ResultsOpt,
    StoreOpt,
    err,
    handle_errors,
    out,
    print_json,
    print_table,
    require_existing_store,
)

PROBE_COLUMNS = (
    "method", "setting", "top1", "top5", "balanced_accuracy", "macro_f1", "roc_auc", "train_rows",
    "val_rows",
)  # fmt: skip


@handle_errors
def probe(
    dataset: DatasetOpt,
    backbone: BackboneOpt,
    store: StoreOpt = "bob-store",
    feature: FeatureOpt = None,
    method: Annotated[
        str,
        typer.Option(
            help="linear, knn, or all (comma-separated); dense-linear: semantic segmentation "
            "from an `extract --dense` set (run on its own); transferability estimates "
            "logme, hscore, leep, nce, knn-loo (comma-separated, run on their own)."
        ),
    ] = "all",
    train_split: Annotated[str, typer.Option(help="Training split.")] = "train",
    val_split: Annotated[
        str, typer.Option(help="Validation split (held out from train if absent).")
    ] = "val",
    test_split: Annotated[str, typer.Option(help="Test split.")] = "test",
    val_fraction: Annotated[
        float, typer.Option(help="Share of train held out when there is no val split.")
    ] = 0.1,
    seeds: Annotated[
        str, typer.Option(help="Seeds for few-shot subsets and the BoB recipe.")
    ] = "0",
    shots: Annotated[
        str | None, typer.Option(help="Few-shot: images per class, e.g. 1,5,10.")
    ] = None,
    fraction: Annotated[
        str | None, typer.Option(help="Few-shot: share of train, e.g. 0.01,0.1.")
    ] = None,
    k: Annotated[
        str, typer.Option(help="kNN neighbour counts (one search for all).")
    ] = "10,20,100,200",
    temperature: Annotated[float, typer.Option(help="kNN vote temperature.")] = 0.07,
    recipe: Annotated[
        str,
        typer.Option(help="Linear probe: sweep (C chosen, then a converged fit) or bob (BoB's)."),
    ] = "sweep",
    epochs: Annotated[
        int | None,
        typer.Option(help="Epochs of --recipe bob (default 90) or of dense-linear (default 10)."),
    ] = None,
    lrs: Annotated[
        str | None,
        typer.Option(
            help="dense-linear: learning rates tried, chosen on val (default 1e-4,1e-3,1e-2)."
        ),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="dense-linear: images per step (default 16).")
    ] = None,
    masks: Annotated[
        str | None,
        typer.Option(
            help="dense-linear: the segmentation folder's location now, when it moved since "
            "extraction (same layout)."
        ),
    ] = None,
    loo_k: Annotated[int, typer.Option(help="knn-loo: neighbours that vote (leave-one-out).")] = 5,
    loo_rows: Annotated[
        int,
        typer.Option(help="knn-loo: rows scored (a sample drawn by id hash above this)."),
    ] = 10_000,
    weights: Annotated[
        str | None,
        typer.Option(
            help="leep/nce: the backbone's checkpoint, when the file it was extracted with "
            "moved (its classifier gives the source-task distribution)."
        ),
    ] = None,
    device: DeviceOpt = "auto",
    results: ResultsOpt = None,
    force: Annotated[
        bool, typer.Option("--force", help="Recompute units already in the results table.")
    ] = False,
    stream: Annotated[
        bool | None,
        typer.Option(
            "--stream/--in-memory",
            help="Stream features shard by shard (default: only when they exceed --max-memory).",
        ),
    ] = None,
    max_memory: Annotated[
        float | None,
        typer.Option(help="GiB of features to hold in memory (default: a quarter of RAM)."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Classify from cached features: linear probe, kNN and few-shot, on CPU or GPU."""
    from bob_cache.config import parse_numbers
    from bob_cache.pipelines import get_stage
    from bob_cache.pipelines.probe import METHODS, ProbeConfig
    from bob_cache.pipelines.transferability import METHODS as TRANSFER_METHODS

    require_existing_store(store)
    methods = METHODS if method == "all" else tuple(m.strip() for m in method.split(","))
    _check_methods(methods, (*METHODS, DENSE, *TRANSFER_METHODS))
    if DENSE in methods:
        dense = _dense_config(
            methods, seeds=seeds, lrs=lrs, epochs=epochs, batch_size=batch_size, store=store,
            dataset=dataset, backbone=backbone, feature=feature, train_split=train_split,
            val_split=val_split, test_split=test_split, val_fraction=val_fraction, masks=masks,
            results=results, force=force,
        )  # fmt: skip
        return _dense(dense, as_json=as_json)
    if set(methods) & set(TRANSFER_METHODS):
        transfer = _transfer_config(
            methods, store=store, dataset=dataset, backbone=backbone, feature=feature,
            train_split=train_split, knn_k=loo_k, knn_max_rows=loo_rows, weights=weights,
            results=results, force=force, stream=stream, max_memory_gb=max_memory,
        )  # fmt: skip
        return _transfer(transfer, as_json=as_json)
    config = ProbeConfig(
        store=store, dataset=dataset, backbone=backbone, feature=feature, methods=methods,
        train_split=train_split, val_split=val_split, test_split=test_split,
        val_fraction=val_fraction, seeds=parse_numbers(seeds, int, "--seeds"),
        shots=parse_numbers(shots, int, "--shots"),
        fractions=parse_numbers(fraction, float, "--fraction"),
        ks=parse_numbers(k, int, "--k"), temperature=temperature, recipe=recipe,
        epochs=90 if epochs is None else epochs,
        device=device, results=results, force=force, stream=stream, max_memory_gb=max_memory,
    )  # fmt: skip
    summary = get_stage("probe")(config)
    if as_json:
        print_json(summary.to_dict())
        return
    s = summary
    out.print(
        f"Probed [bold]{s.dataset}[/] × [bold]{s.backbone}[/] (feature {s.feature_key}): "
        f"{s.units_run} unit(s) run, {s.units_skipped} already in {s.results} "
        f"({s.seconds:.1f} s).",
        highlight=False,
    )
    if s.unlabeled_rows_dropped:
        err.print(f"  note: {s.unlabeled_rows_dropped} unlabeled row(s) (label -1) were left out")
    if s.unseen_test_classes:
        err.print(f"  note: test classes absent from train (always wrong): {s.unseen_test_classes}")
    if s.heads:
        err.print(f"  stored {len(s.heads)} probe head(s) for `bob-cache predict`", highlight=False)
    if s.heads_note:
        err.print(f"  note: {s.heads_note}", highlight=False)
    for skip in s.skipped:
        err.print(f"  skipped kNN: {skip['reason']}", highlight=False)
    columns = [c for c in PROBE_COLUMNS if any(c in row for row in s.table)]
    print_table(s.table, columns)


DENSE = "dense-linear"
DENSE_COLUMNS = ("method", "setting", "mIoU", "pixel_accuracy", "mean_accuracy", "lr",
                 "train_rows", "val_rows")  # fmt: skip


def _dense_config(
    methods: tuple[str, ...],
    *,
    seeds: str,
    lrs: str | None,
    epochs: int | None,
    batch_size: int | None,
    **options: Any,
) -> Any:
    """The dense probe's config: it runs alone (another feature set), with one seed."""
    from bob_cache.config import parse_numbers
    from bob_cache.errors import SpecError
    from bob_cache.pipelines.dense_probe import DenseProbeConfig

    chosen = {"lrs": parse_numbers(lrs, float, "--lrs") or None, "epochs": epochs,
              "batch_size": batch_size}  # fmt: skip
    options.update({k: v for k, v in chosen.items() if v is not None})
    seed_list = parse_numbers(seeds, int, "--seeds")
    if len(methods) > 1:
        raise SpecError(
            f"--method {DENSE} reads dense grids, which linear and knn cannot: run it on its "
            f"own (--method {DENSE}), and the others in a separate call."
        )
    if len(seed_list) > 1:
        raise SpecError(
            f"--method {DENSE} trains one unit per call; got seeds {list(seed_list)}. Run it once "
            "per seed (--seeds 0, then --seeds 1, ...)."
        )
    return DenseProbeConfig(seed=seed_list[0] if seed_list else 0, **options)


def _dense(config: Any, *, as_json: bool) -> None:
    from bob_cache.pipelines import get_stage

    s = get_stage("dense-probe")(config)
    if as_json:
        print_json(s.to_dict())
        return
    out.print(
        f"Dense probe of [bold]{s.dataset}[/] × [bold]{s.backbone}[/] (feature {s.feature_key}): "
        f"{s.units_run} unit(s) run, {s.units_skipped} already in {s.results} "
        f"({s.seconds:.1f} s).",
        highlight=False,
    )
    if s.units_run:
        err.print(f"  protocol: {s.protocol}", highlight=False)
        ious = ", ".join(f"{name} {v:.3f}" for name, v in s.per_class_iou.items())
        out.print(f"  per-class IoU on '{s.scored_split}': {ious}", highlight=False)
    print_table(s.table, [c for c in DENSE_COLUMNS if any(c in row for row in s.table)])


TRANSFER_COLUMNS = ("method", "metric", "estimate", "train_rows", "details")


def _check_methods(methods: tuple[str, ...], known: tuple[str, ...]) -> None:
    from bob_cache.errors import SpecError, did_you_mean

    for name in methods:
        if name not in known:
            raise SpecError(
                f"Unknown --method '{name}'.{did_you_mean(name, known)} Known: "
                f"{', '.join(known)}, or all (linear and knn)."
            )


def _transfer_config(methods: tuple[str, ...], **options: Any) -> Any:
    """The transferability stage's config: its methods run alone (no probe is fitted)."""
    from bob_cache.errors import SpecError
    from bob_cache.pipelines.transferability import METHODS as TRANSFER_METHODS
    from bob_cache.pipelines.transferability import TransferConfig

    others = [m for m in methods if m not in TRANSFER_METHODS]
    if others:
        raise SpecError(
            f"Transferability estimates ({', '.join(TRANSFER_METHODS)}) fit nothing and run "
            f"on their own; got them with {others}. Run --method "
            f"{','.join(m for m in methods if m in TRANSFER_METHODS)} and --method "
            f"{','.join(others)} as two calls."
        )
    return TransferConfig(methods=methods, **options)


def _transfer(config: Any, *, as_json: bool) -> None:
    from bob_cache.pipelines import get_stage

    s = get_stage("transferability")(config)
    if as_json:
        print_json(s.to_dict())
        return
    out.print(
        f"Transferability of [bold]{s.dataset}[/] ({s.split}) × [bold]{s.backbone}[/] "
        f"(feature {s.feature_key}): {s.units_run} estimate(s) computed, {s.units_skipped} "
        f"already in {s.results} ({s.seconds:.1f} s). Higher = better; compare backbones on "
        "one dataset only.",
        highlight=False,
    )
    if s.unlabeled_rows_dropped:
        err.print(f"  note: {s.unlabeled_rows_dropped} unlabeled row(s) (label -1) were left out")
    if s.source:
        err.print(f"  leep/nce source model: {s.source}", highlight=False)
    table = [{**r, "estimate": f"{r['estimate']:.6g}"} for r in s.table]
    print_table(table, [c for c in TRANSFER_COLUMNS if any(r.get(c) for r in table)])


PREDICT_COLUMNS = ("query", "class", "predicted_class", "probability", "top")


@handle_errors
def predict(
    dataset: DatasetOpt,
    backbone: BackboneOpt,
    store: StoreOpt = "bob-store",
    feature: FeatureOpt = None,
    head: Annotated[
        str | None,
        typer.Option(
            help="Stored head (name or prefix; default: the newest full-setting linear head). "
            "`bob-cache ls STORE --heads` lists them."
        ),
    ] = None,
    split: Annotated[
        str | None, typer.Option(help="Classify this split's stored rows (e.g. test).")
    ] = None,
    image: Annotated[
        list[Path] | None, typer.Option(help="Image file to classify (repeatable).")
    ] = None,
    k: Annotated[int, typer.Option("-k", help="Classes shown per prediction.")] = 3,
    weights: Annotated[
        str | None, typer.Option(help="Checkpoint, when the recorded weights file moved.")
    ] = None,
    device: DeviceOpt = "cpu",
    as_json: JsonOpt = False,
) -> None:
    """Classify stored rows (--split) or new images (--image) with a stored probe head."""
    from bob_cache.pipelines import get_stage
    from bob_cache.pipelines.predict import PredictConfig

    require_existing_store(store)
    config = PredictConfig(
        store=store, dataset=dataset, backbone=backbone, feature=feature, head=head, split=split,
        images=[str(p) for p in image or ()], k=k, weights=weights, device=device,
    )  # fmt: skip
    result = get_stage("predict")(config)
    if as_json:
        print_json(result.to_dict())
        return
    h = result.head
    top1 = h.metrics.get("top1")
    out.print(
        f"Head [bold]{h.name}[/] ({h.method}, {h.setting}, seed {h.seed}"
        f"{f', C={h.C:.3g}' if h.C is not None else ''}"
        f"{f', test top1 {top1:.4f}' if top1 is not None else ''}) on {result.feature_set}:",
        highlight=False,
    )
    print_table([_row(r) for r in result.records()], PREDICT_COLUMNS)
    if result.accuracy is not None:
        n = int((result.labels >= 0).sum())
        out.print(f"Accuracy on {n} labeled row(s): {result.accuracy:.4f}", highlight=False)


def _row(record: dict[str, Any]) -> dict[str, Any]:
    top = ", ".join(f"{t['class']} {t['probability']:.3f}" for t in record["top"])
    return {**record, "probability": f"{record['probability']:.3f}", "top": top}


def register(app: typer.Typer) -> None:
    """Add the probe family's commands to ``app``."""
    app.command(
        epilog="Example: bob-cache probe --dataset digits --backbone resnet18 --method all "
        "--shots 1,5\n\nDense: bob-cache probe --dataset shapes --backbone test_vit "
        "--method dense-linear\n\nTransferability: bob-cache probe --dataset digits --backbone "
        "resnet18 --method logme,hscore,knn-loo"
    )(probe)
    app.command(
        epilog="Example: bob-cache predict --store ./bob-store --dataset digits --backbone "
        "resnet18 --image seven.png --json"
    )(predict)
