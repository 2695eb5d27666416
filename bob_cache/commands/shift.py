"""The shift family: ``shift`` (a corrupted copy of a dataset, ImageNet-C style) and
``corruptions`` (the corruptions it knows)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from bob_cache.commands.common import (
    JsonOpt,
    QuietOpt,
    SplitFractionsOpt,
    err,
    handle_errors,
    out,
    print_json,
)

SHIFT_EXAMPLE = (
    "Example: bob-cache shift --data builtin:digits --out shifted --corruption "
    "gaussian_noise,motion_blur --severity 1,5 --seed 0, then bob-cache extract --data "
    "shifted/digits-motion_blur-5 --backbone resnet18"
)


@handle_errors
def shift(
    data: Annotated[
        str, typer.Option(help="Image folder, .csv/.jsonl manifest, or builtin:digits.")
    ],
    out_dir: Annotated[
        str,
        typer.Option(
            "--out", help="Folder for the copies: one <dataset>-<corruption>-<severity>/ each."
        ),
    ],
    corruption: Annotated[
        str,
        typer.Option(
            help="Names, comma-separated (see `bob-cache corruptions`), a family (noise, blur, "
            "weather, digital, extra), 'common' (ImageNet-C's, less frost) or 'all'."
        ),
    ],
    severity: Annotated[str, typer.Option(help="1 (mild) to 5 (strong): 3, 1,5, 1-5 or all.")],
    seed: Annotated[
        int, typer.Option(help="Seeds every random draw (with the corruption, severity, id).")
    ] = 0,
    split: Annotated[str, typer.Option(help="Split to copy, or 'all'.")] = "all",
    split_fractions: SplitFractionsOpt = None,
    name: Annotated[
        str | None, typer.Option(help="Dataset name (default: folder or manifest stem).")
    ] = None,
    limit: Annotated[
        int | None, typer.Option(min=1, help="Only the first N images of each split.")
    ] = None,
    workers: Annotated[
        int, typer.Option(min=0, help="Processes corrupting images (0: in this process).")
    ] = 0,
    overwrite: Annotated[
        bool,
        typer.Option("--overwrite", help="Replace copies written with other settings."),
    ] = False,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Write a corrupted copy of a dataset in the same layout, per corruption and severity.

    ImageNet-C's corruptions (Hendrycks & Dietterich 2019) with the reference parameters,
    deterministic under --seed. Folders keep their split and class folders and file names,
    manifests get a new manifest with the same ids, labels and splits, builtin:digits
    becomes split/class folders. Rerunning skips finished copies and completes partial ones.
    """
    from bob_cache.data.corruptions import parse_corruptions, parse_severities
    from bob_cache.pipelines import get_stage
    from bob_cache.pipelines.shift import ShiftConfig

    config = ShiftConfig(
        data=data,
        out=out_dir,
        corruptions=parse_corruptions(corruption),
        severities=parse_severities(severity),
        seed=seed,
        split=split,
        split_fractions=split_fractions,
        name=name,
        limit=limit,
        workers=workers,
        overwrite=overwrite,
        quiet=quiet or as_json,
    )
    summary = get_stage("shift")(config)
    if as_json:
        print_json(summary.to_dict())
        return
    done = sum(o["status"] == "done" for o in summary.outputs)
    out.print(
        f"Shifted [bold]{escape(summary.dataset)}[/]: {len(summary.outputs)} output(s), {done} "
        f"already done, {summary.images_written} images written ({summary.seconds:.1f} s).",
        highlight=False,
    )
    for o in summary.outputs:
        out.print(f"  {o['status']:8s} --data {o['data']}", markup=False, highlight=False)
        for bad in o["unreadable"][:3]:  # an id is a path or a manifest id, maybe absolute
            err.print(
                f"    unreadable ({bad['split']}): {bad['id']}: {bad['reason']}", markup=False
            )
        if len(o["unreadable"]) > 3:
            err.print(f"    ... {len(o['unreadable'])} unreadable image(s) skipped in all")


@handle_errors
def corruptions(
    family: Annotated[
        str | None, typer.Option(help="Only this family (noise, blur, weather, digital, extra).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """List the corruptions `bob-cache shift` applies, with their families."""
    from bob_cache.commands.common import print_table
    from bob_cache.data.corruptions import get_corruption, list_corruptions

    rows = [get_corruption(n).to_dict() for n in list_corruptions(family)]
    if as_json:
        print_json(rows)
        return
    print_table(rows, ("name", "family", "random", "min_side"))


def register(app: typer.Typer) -> None:
    """Add the shift family's commands to ``app``."""
    app.command(epilog=SHIFT_EXAMPLE)(shift)
    app.command(epilog="Example: bob-cache corruptions --family blur")(corruptions)
