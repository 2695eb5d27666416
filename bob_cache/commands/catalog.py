"""The catalog family: ``backbones`` (the Battle-of-the-Backbones field and its weights)."""

from __future__ import annotations

from typing import Annotated

import typer

from bob_cache.commands.common import JsonOpt, handle_errors, print_json, print_table


@handle_errors
def backbones(
    family: Annotated[str | None, typer.Option(help="Only this family (ResNet, ViT, ...).")] = None,
    method: Annotated[
        str | None, typer.Option(help="Only this pretraining method (supervised, DINO, CLIP, ...).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """List the Battle-of-the-Backbones field and its timm weights (any timm name works too)."""
    from bob_cache.backbones import list_backbones

    rows = [
        e.to_dict()
        for e in list_backbones()
        if (family is None or e.family.lower() == family.lower())
        and (method is None or e.method.lower() == method.lower())
    ]
    if as_json:
        print_json(rows)
        return
    for row in rows:
        row["params"] = f"{row['params'] / 1e6:.1f}M" if row["params"] else None
        row["model"] = row["model"] or f"[dim]{row['note']}[/]"
    print_table(rows, ("name", "family", "method", "data", "params", "feature_dim", "model"))


def register(app: typer.Typer) -> None:
    """Add the catalog family's commands to ``app``."""
    app.command(epilog="Example: bob-cache backbones --method DINO")(backbones)
