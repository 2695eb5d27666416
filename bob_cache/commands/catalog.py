"""The catalog family: ``backbones`` (the Battle-of-the-Backbones field and its weights) and
``datasets`` (every ``--data`` kind, the study's datasets as distributed, and a check of a local
copy against the official counts)."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape

from bob_cache.commands.common import (
    EXIT_USER_ERROR,
    JsonOpt,
    SplitFractionsOpt,
    err,
    handle_errors,
    out,
    print_json,
    print_table,
)


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


@handle_errors
def datasets(
    ctx: typer.Context,
    task: Annotated[
        str | None, typer.Option(help="Only datasets for this task (classification, ood, ...).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """List every kind of --data value with the layout it expects, and the study's datasets as
    they are distributed: the --data value, official images per split, where to get them."""
    if ctx.invoked_subcommand is not None:
        return
    from bob_cache.data.catalog import list_datasets, list_kinds

    kinds = [dict(vars(k)) for k in list_kinds()]
    sets = [d.to_dict() for d in list_datasets() if task is None or d.task == task.lower()]
    if as_json:
        print_json({"kinds": kinds, "datasets": sets})
        return
    kinds = [{k: escape(str(v)) for k, v in row.items()} for row in kinds]  # [/train|/val]
    print_table(kinds, ("kind", "syntax", "layout", "example"), title="--data kinds")
    for row in sets:
        counts = " / ".join(f"{k} {v:,}" for k, v in row["counts"].items()) or "not catalogued"
        spec = row["spec"].replace("ROOT", f"${row['env']}") if row["env"] else row["spec"]
        row.update(counts=counts, spec=escape(spec), source=escape(row["source"]))
    print_table(
        sets,
        ("name", "task", "spec", "counts", "classes", "source"),
        title="Datasets as distributed",
    )
    out.print("Check a local copy: bob-cache datasets check --data SPEC")


@handle_errors
def datasets_check(
    data: Annotated[str, typer.Option(help="The local copy, as a --data value.")],
    dataset: Annotated[
        str | None,
        typer.Option(help="Catalog name to compare with (default: the one the source reads)."),
    ] = None,
    split_fractions: SplitFractionsOpt = None,
    as_json: JsonOpt = False,
) -> None:
    """Read a local copy (listing only: no image is decoded) and compare its images per split,
    and its classes, with the official counts; exit 1 naming what differs."""
    from bob_cache.data import parse_source
    from bob_cache.data.catalog import check_counts, get_dataset
    from bob_cache.data.splits import parse_split_fractions
    from bob_cache.errors import DataSourceError

    source = parse_source(data, fractions=parse_split_fractions(split_fractions))
    name = dataset or source.catalog
    if name is None:
        raise DataSourceError(
            f"'{data}' is a {source.kind} source, which has no official counts. Pass "
            "--dataset NAME (see `bob-cache datasets`) to compare it with a catalogued dataset."
        )
    check = check_counts(source, get_dataset(name), spec=data)
    if as_json:
        print_json(check.to_dict())
    else:
        rows = [
            {
                "split": s.split,
                "official": s.official,
                "found": s.found,
                "ok": "yes" if s.ok else "NO",
            }
            for s in check.splits
        ]
        print_table(rows, ("split", "official", "found", "ok"), title=f"{name}: {data}")
    if not check.ok:
        for problem in check.problems():
            err.print(f"  {problem}")
        err.print(
            f"The copy at '{data}' differs from the official {name} "
            f"({check.dataset.source}). Complete it from there, or check the root folder."
        )
        raise typer.Exit(EXIT_USER_ERROR)
    if not as_json:
        out.print(f"{name}: every split has its official count.")


def register(app: typer.Typer) -> None:
    """Add the catalog family's commands to ``app``."""
    app.command(epilog="Example: bob-cache backbones --method DINO")(backbones)
    datasets_app = typer.Typer(invoke_without_command=True)
    datasets_app.callback(epilog="Example: bob-cache datasets --task ood")(datasets)
    datasets_app.command(
        "check",
        epilog="Example: bob-cache datasets check --data torchvision:Flowers102:/data/flowers",
    )(datasets_check)
    app.add_typer(datasets_app, name="datasets")
