"""The synth family: ``synth-shapes`` (a synthetic detection and segmentation dataset)."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.markup import escape

from bob_cache.commands.common import JsonOpt, QuietOpt, handle_errors, out, print_json

SYNTH_EXAMPLE = (
    "Example: bob-cache synth-shapes --out shapes-a --n 200 --seed 0 --style a, and "
    "bob-cache synth-shapes --out shapes-b --n 200 --seed 0 --style b for a shifted target"
)


@handle_errors
def synth_shapes(
    out_dir: Annotated[
        str, typer.Option("--out", help="Folder for the dataset (new, empty, or the same run's).")
    ],
    n: Annotated[int, typer.Option("--n", help="Images in all (train + val), at least 2.")],
    seed: Annotated[int, typer.Option(help="Seeds every layout and every pixel.")] = 0,
    style: Annotated[
        str,
        typer.Option(
            help="a: light noise/stripe backgrounds, saturated colours; b: the cross-domain "
            "target (checkerboards/gradients, darker, pastel), same layouts."
        ),
    ] = "a",
    image_size: Annotated[int, typer.Option(help="Side of the square images, 32 to 2048.")] = 128,
    val_fraction: Annotated[
        float, typer.Option(help="Share of the images in val (the last ones), in (0, 1).")
    ] = 0.25,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Write a synthetic detection and segmentation dataset: shapes on textured backgrounds.

    Circles, squares and triangles (1 to 4 per image) as RGB images, semantic masks
    (255 marks a 1-px ignore band on outlines) and COCO instances files (train.json,
    val.json), plus classes.json, written last. Deterministic: image i is the same for any
    --n, and --style b repaints style a's layouts. Rerunning with the same options skips a
    complete folder and completes a partial one.
    """
    from bob_cache.data.synth_shapes import write_synth_shapes

    summary = write_synth_shapes(
        out_dir,
        n=n,
        seed=seed,
        style=style,
        image_size=image_size,
        val_fraction=val_fraction,
        quiet=quiet or as_json,
    )
    if as_json:
        print_json(summary)
        return
    out.print(describe(summary), highlight=False)


def describe(summary: dict[str, Any]) -> str:
    """One line (Rich markup) for a ``write_synth_shapes`` summary."""
    train, val = summary["splits"]["train"], summary["splits"]["val"]
    verb = "Already complete" if summary["status"] == "skipped" else "Wrote"
    return (
        f"{verb}: synth-shapes style {escape(summary['style'])}, seed {summary['seed']}, "
        f"{summary['image_size']} px in [bold]{escape(summary['out'])}[/]: train "
        f"{train['images']} images / {train['instances']} instances, val {val['images']} / "
        f"{val['instances']} (train.json, val.json, classes.json)."
    )


def register(app: typer.Typer) -> None:
    """Add the synth family's commands to ``app``."""
    app.command("synth-shapes", epilog=SYNTH_EXAMPLE)(synth_shapes)
