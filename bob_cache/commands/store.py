"""The store family: ``ls``, ``info``, ``verify`` and ``export`` of a feature store."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from bob_cache.commands.common import (
    FEATURE_SET_COLUMNS,
    BackboneOpt,
    DatasetOpt,
    FeatureOpt,
    JsonOpt,
    QuietOpt,
    StoreArg,
    StoreOpt,
    err,
    handle_errors,
    out,
    print_json,
    print_table,
    require_existing_store,
)

HEAD_COLUMNS = (
    "group", "name", "method", "setting", "seed", "C", "top1", "train_rows", "created", "state",
)  # fmt: skip


@handle_errors
def list_sets(
    store: StoreArg,
    heads: Annotated[
        bool,
        typer.Option("--heads", help="List the stored probe heads instead (for `predict`)."),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """List the feature sets in a store (with their probe-head count), or its probe heads."""
    from bob_cache.stores import open_store
    from bob_cache.stores.head_store import count_heads, list_store_heads
    from bob_cache.stores.metadata_scan import damaged_metadata_error

    require_existing_store(store)
    opened = open_store(store)
    if heads:
        rows = list_store_heads(opened)
        columns, none = HEAD_COLUMNS, "no probe heads yet (`bob-cache probe` stores them)"
    else:
        sets, damaged = opened.scan()  # the rest is listed; a damaged metadata file named
        rows = [{**fs.info(), "heads": count_heads(fs)} for fs in sets]
        columns = (*FEATURE_SET_COLUMNS[:1], "dataset", *FEATURE_SET_COLUMNS[1:], "heads")
        none = "no feature sets yet"
    if as_json:
        print_json(rows)
    elif not rows:
        out.print(f"Store '{store}' holds {none}.")
    else:
        short = {"C": "{:.3g}", "top1": "{:.4f}"}  # raw values stay in --json
        shown = [
            {**r, **{k: f.format(r[k]) for k, f in short.items() if r.get(k) is not None}}
            for r in rows
        ]
        print_table(shown, columns)
    if not heads and damaged:
        err.print(
            damaged_metadata_error(store, damaged), highlight=False, markup=False, soft_wrap=True
        )
        raise typer.Exit(1)


@handle_errors
def info(
    store: StoreArg,
    group: Annotated[
        str, typer.Argument(help="Group path, or a unique prefix of the feature key.")
    ],
    split: Annotated[
        str | None,
        typer.Option(help="The split to show when the key is shared by several splits."),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Print a feature set's full provenance."""
    from bob_cache.stores import open_store

    require_existing_store(store)
    fs = open_store(store).get(group, split=split)
    data = {"group": fs.path, **fs.info(), "attributes": fs.attrs}
    if as_json:
        print_json(data)
        return
    for k, v in fs.info().items():
        out.print(f"[bold]{k}[/]: {v}", highlight=False)
    out.print_json(json.dumps(fs.attrs, default=str))


@handle_errors
def verify(
    store: StoreArg,
    group: Annotated[
        str | None, typer.Option(help="Only this feature set (group path or key prefix).")
    ] = None,
    split: Annotated[
        str | None, typer.Option(help="With --group: the split, when its key has several.")
    ] = None,
    repair: Annotated[
        bool,
        typer.Option("--repair", help="Un-commit damaged shards so `extract` recomputes them."),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Read every chunk of every feature set and report damage (exit 1 if any)."""
    from bob_cache.stores import open_store, verify_store
    from bob_cache.stores.metadata_scan import damaged_metadata_error

    require_existing_store(store)  # --repair opens for writing, which would create a store
    reports = verify_store(
        open_store(store, mode="a" if repair else "r"), group=group, split=split, repair=repair
    )
    damaged = [r for r in reports if not r.ok]
    if as_json:
        print_json([r.to_dict() for r in reports])
    else:
        for r in reports:
            state = "ok" if r.ok else "[bold red]DAMAGED[/]"
            done = "complete" if r.complete else f"incomplete ({r.committed}/{r.shards} shards)"
            out.print(f"{state}  {r.group}  {r.rows} rows, {done}; checksums: {r.checksums}")
            for problem in r.problems:
                out.print(f"    {problem}", highlight=False)
        shards = [r for r in damaged if r.checksums != "unknown"]  # metadata: not repairable
        if shards:
            fix = "`bob-cache verify --repair`, then the `extract` command `bob-cache info` shows"
            hint = (
                "repaired: rerun the same `bob-cache extract` command" if repair else f"run {fix}"
            )
            count = f"{len(shards)} of {len(reports)} feature set(s) damaged"
            err.print(f"{count}; {hint} to recompute them.", soft_wrap=True)
        if len(shards) < len(damaged):
            broken = [(r.group, r.problems[0].split(": ", 1)[1]) for r in damaged
                      if r.checksums == "unknown"]  # fmt: skip
            err.print(
                damaged_metadata_error(store, broken), markup=False, highlight=False, soft_wrap=True
            )
    if damaged:
        raise typer.Exit(1)


@handle_errors
def export(
    dataset: DatasetOpt,
    backbone: BackboneOpt,
    out_dir: Annotated[str, typer.Option("--out", help="Folder to write the files into.")],
    store: StoreOpt = "bob-store",
    feature: FeatureOpt = None,
    split: Annotated[str, typer.Option(help="Split to export.")] = "train",
    fmt: Annotated[
        str,
        typer.Option(
            "--format",
            help="npy: img_emb/img_emb_0000.npy + metadata/metadata_0000.parquet (embedding_reader"
            "'s numpy layout, clip-retrieval's output); parquet: emb/emb_0000.parquet with an "
            "embedding column.",
        ),
    ] = "npy",
    dtype: Annotated[
        str | None,
        typer.Option(help="float16 or float32 (default: float16 for npy, float32 for parquet)."),
    ] = None,
    rows_per_file: Annotated[int, typer.Option(help="Most rows in one file.")] = 1_000_000,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Write a feature set as the embedding files autofaiss and clip-retrieval read (valid rows
    in row order, with id, label and row beside them); rerunning finishes or skips it."""
    from bob_cache.pipelines import get_stage
    from bob_cache.pipelines.export import ExportConfig

    require_existing_store(store)
    config = ExportConfig(
        store=store, dataset=dataset, backbone=backbone, out=out_dir, feature=feature,
        split=split, format=fmt, dtype=dtype, rows_per_file=rows_per_file, quiet=quiet or as_json,
    )  # fmt: skip
    summary = get_stage("export")(config)
    if as_json:
        print_json(summary.to_dict())
        return
    what = "up to date" if summary.action == "up-to-date" else f"in {summary.seconds:.1f} s"
    out.print(
        f"{summary.group}: {summary.rows:,} rows × {summary.dim} ({summary.dtype}) in "
        f"{len(summary.files)} {summary.format} file(s) under {summary.out} ({what})."
    )


def register(app: typer.Typer) -> None:
    """Add the store family's commands to ``app``."""
    app.command(name="ls", epilog="Example: bob-cache ls ./bob-store --json")(list_sets)
    app.command(
        epilog="Example: bob-cache info ./bob-store digits/train/resnet18.tv_in1k/3f2a9c1b7d4e"
    )(info)
    app.command(epilog="Example: bob-cache verify ./bob-store --repair")(verify)
    app.command(
        epilog="Example: bob-cache export --store ./bob-store --dataset digits --backbone "
        "resnet18 --out ./digits-emb --format npy"
    )(export)
