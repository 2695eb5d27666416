"""The ood family: ``ood`` (generalization under shift and OOD detection from cached features)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from bob_cache.commands.common import (
    BackboneOpt,
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

SHIFT_COLUMNS = ("set", "classes_shared", "rows", "top1", "id_top1_shared", "drop")
DETECT_COLUMNS = ("detector", "set", "auroc", "aupr_in", "aupr_out", "fpr95", "state")


def _names(text: str | None) -> tuple[str, ...]:
    return tuple(n.strip() for n in (text or "").split(",") if n.strip())


@handle_errors
def ood(
    backbone: BackboneOpt,
    dataset: Annotated[str, typer.Option("--id", help="The ID dataset (its head and splits).")],
    store: StoreOpt = "bob-store",
    shift: Annotated[
        str | None, typer.Option(help="Shifted datasets to evaluate the ID head on (a,b,...).")
    ] = None,
    detect: Annotated[
        str | None, typer.Option(help="Datasets to detect as OOD against ID test (a,b,...).")
    ] = None,
    detector: Annotated[
        str, typer.Option(help="Detectors (comma-separated) or all. `--detector list` names them.")
    ] = "all",
    feature: FeatureOpt = None,
    head: Annotated[
        str | None, typer.Option(help="Stored probe head (default: newest full linear head).")
    ] = None,
    class_map: Annotated[
        Path | None,
        typer.Option(
            help="Shift class → ID class: JSON object or two-column CSV (default: "
            "match class names)."
        ),
    ] = None,
    knn_k: Annotated[
        int | None,
        typer.Option(
            help="k of the kNN detector (default 50, or every ID train row when there are "
            "fewer; each row's protocol states the k used)."
        ),
    ] = None,
    train_split: Annotated[str, typer.Option(help="ID split the detectors fit on.")] = "train",
    val_split: Annotated[str, typer.Option(help="ID split a new head's C is chosen on.")] = "val",
    test_split: Annotated[str, typer.Option(help="ID split scored against shifts.")] = "test",
    max_memory: Annotated[
        str | None,
        typer.Option(help="Memory budget, e.g. 4GB: features stream from the store beyond it."),
    ] = None,
    refit: Annotated[
        bool, typer.Option("--refit", help="Refit detectors even when stored state is current.")
    ] = False,
    force: Annotated[
        bool, typer.Option("--force", help="Append rows already in the results table again.")
    ] = False,
    device: DeviceOpt = "auto",
    results: ResultsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Generalization under shift and OOD detection, from cached features on a CPU."""
    from bob_cache.pipelines import get_stage
    from bob_cache.pipelines.ood import DETECTORS, OODConfig
    from bob_cache.retrieval.auto import parse_memory

    if detector == "list":
        out.print(", ".join(DETECTORS))
        return
    require_existing_store(store)
    budget = parse_memory(max_memory)
    config = OODConfig(
        store=store, backbone=backbone, dataset=dataset, shifts=_names(shift),
        detect=_names(detect),
        detectors=DETECTORS if detector == "all" else _names(detector), feature=feature,
        head=head, class_map=str(class_map) if class_map else None, knn_k=knn_k,
        train_split=train_split, val_split=val_split, test_split=test_split,
        max_memory_gb=budget / 2**30 if budget else None, results=results, refit=refit,
        force=force, device=device,
    )  # fmt: skip
    report = get_stage("ood")(config)
    if as_json:
        print_json(report.to_dict())
        return
    out.print(
        f"OOD of [bold]{report.dataset}[/] × [bold]{report.backbone}[/] (feature "
        f"{report.feature_key}, head {report.head}; {report.seconds:.1f} s, "
        f"{report.rows_written} new row(s) in {report.results})",
        highlight=False,
    )
    if report.generalization:
        out.print(f"Generalization (ID test top-1 {report.id_top1:.4f}):", highlight=False)
        print_table([_fmt(g) for g in report.generalization], SHIFT_COLUMNS)
        m = report.mean
        out.print(f"Mean over shifts: top-1 {m['top1']:.4f}, drop {m['drop']:.4f}",
                  highlight=False)  # fmt: skip
        left = sum(g["rows_left_out"] for g in report.generalization)
        if left:
            err.print(f"  note: {left} shift row(s) of classes the ID set lacks were left out")
    if report.detection:
        out.print("Detection (ID test vs each set; higher score = in-distribution):")
        print_table([_fmt(d) for d in report.detection], DETECT_COLUMNS)


def _fmt(row: dict[str, Any]) -> dict[str, Any]:
    return {k: f"{v:.4f}" if isinstance(v, float) else v for k, v in row.items()}


def register(app: typer.Typer) -> None:
    """Add the ood family's commands to ``app``."""
    app.command(
        epilog="Example: bob-cache ood --store bob-store --backbone resnet18 --id digits "
        "--shift digits-noise --detect digits-noise --max-memory 4GB"
    )(ood)
