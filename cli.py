"""The ``bob-cache`` command line: parse options, build a config, call a stage, print.

Every command has ``--help`` with an example and ``--json`` where it prints results. Exit
codes: 0 success, 1 user error (one-paragraph message, no traceback), 2 usage error,
130 interrupted.
"""

from __future__ import annotations

import json
import shlex
import sys
from typing import Annotated

import typer

from bob_cache.cli_common import (
    DeviceOpt,
    JsonOpt,
    StoreArg,
    StoreOpt,
    err,
    out,
    print_json,
    print_table,
    user_errors,
)
from bob_cache.cli_retrieval import register_retrieval_commands

app = typer.Typer(
    name="bob-cache",
    help="Battle of the Backbones as a tool: extract backbone features once into a Zarr "
    "store, then evaluate them anywhere.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)
LISTING = ("group", "split", "backbone", "layer", "pool", "rows", "dim", "invalid", "complete")


@app.command(epilog="Example: bob-cache extract --data builtin:digits --backbone resnet18")
@user_errors
def extract(
    data: Annotated[
        str, typer.Option(help="Image folder, .csv/.jsonl manifest, or builtin:digits.")
    ],
    backbone: Annotated[
        str,
        typer.Option(
            help="Registry name (see `bob-cache backbones`), timm name, or tv:<torchvision model>."
        ),
    ],
    store: StoreOpt = "bob-store",
    name: Annotated[
        str | None, typer.Option(help="Dataset name (default: folder or manifest stem).")
    ] = None,
    split: Annotated[str, typer.Option(help="Split to extract, or 'all'.")] = "all",
    weights: Annotated[
        str | None,
        typer.Option(help="Local .safetensors/.pth checkpoint (loaded with weights_only)."),
    ] = None,
    random_init: Annotated[
        bool,
        typer.Option("--random-init", help="Random weights drawn with --seed (a BoB baseline)."),
    ] = False,
    seed: Annotated[int, typer.Option(help="Seed of --random-init.")] = 0,
    layers: Annotated[
        str,
        typer.Option(
            help="'final' and/or layer names or indices, comma-separated (e.g. final,-2)."
        ),
    ] = "final",
    pool: Annotated[
        str, typer.Option(help="default (the model's own head), avg or token.")
    ] = "default",
    image_size: Annotated[
        int | None, typer.Option(help="Square input size (default: the model's pretrained config).")
    ] = None,
    dtype: Annotated[str, typer.Option(help="Storage dtype: float16 or float32.")] = "float16",
    precision: Annotated[
        str, typer.Option(help="auto (bf16 autocast on CUDA, fp32 on CPU), fp32, bf16 or fp16.")
    ] = "auto",
    device: DeviceOpt = "auto",
    batch_size: Annotated[int, typer.Option(help="Images per forward pass.")] = 64,
    workers: Annotated[
        int | None,
        typer.Option(
            help="Image-decoding processes (default: spare cores, at most 8 on CPU; 0 in-process)."
        ),
    ] = None,
    decode: Annotated[
        str,
        typer.Option(
            help="pil: workers decode and resize (the reference). torch: workers read files, "
            "the device decodes JPEGs (nvJPEG on a GPU) and resizes in batches; its own "
            "feature key."
        ),
    ] = "pil",
    limit: Annotated[
        int | None, typer.Option(help="Only the first N images of each split.")
    ] = None,
    strict: Annotated[
        bool,
        typer.Option(
            "--strict", help="Stop at the first unreadable image instead of recording it."
        ),
    ] = False,
    chunk_rows: Annotated[
        int | None, typer.Option(help="Rows per inner chunk (default: shard rows / 8).")
    ] = None,
    shard_rows: Annotated[
        int | None,
        typer.Option(help="Rows per shard, the unit of commit and resume (default 4096)."),
    ] = None,
    compression: Annotated[
        str, typer.Option(help="zstd[:level], blosc, lz4, gzip or none.")
    ] = "zstd:3",
    part: Annotated[
        str | None,
        typer.Option(
            help="K/N: compute every N-th shard from K (N processes share one feature set)."
        ),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help="Delete and recompute existing feature sets with this key."
        ),
    ] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")] = False,
    as_json: JsonOpt = False,
) -> None:
    """Run a backbone over a dataset once and store its features (resumable)."""
    from bob_cache.config import ExtractConfig, parse_layers, parse_part
    from bob_cache.pipelines import get_stage

    config = ExtractConfig(
        data=data, backbone=backbone, store=store, name=name, split=split, weights=weights,
        random_init=random_init, seed=seed, layers=parse_layers(layers), pool=pool,
        image_size=image_size, dtype=dtype, precision=precision, device=device,
        batch_size=batch_size, workers=workers, decode=decode, limit=limit, strict=strict,
        chunk_rows=chunk_rows, shard_rows=shard_rows, compression=compression,
        part=parse_part(part), overwrite=overwrite, quiet=quiet or as_json,
        command=shlex.join(["bob-cache", *sys.argv[1:]]),
    )  # fmt: skip
    summary = get_stage("extract")(config)
    if as_json:
        print_json(summary.to_dict())
        return
    s = summary
    out.print(
        f"Extracted [bold]{s.dataset}[/] with [bold]{s.backbone}[/] on {s.device} ({s.precision}): "
        f"{s.rows} rows, {s.rows_computed} computed ({s.images_per_second:.1f} img/s, "
        f"{s.seconds:.1f} s), {s.shards_skipped} shard(s) already done, {s.invalid_rows} invalid.",
        highlight=False,
    )
    for example in s.invalid_examples:
        err.print(
            f"  invalid: {example['split']}/{example['id']}: {example['reason']}", highlight=False
        )
    print_table(s.feature_sets, LISTING, title=f"store: {s.store}")


PROBE_COLUMNS = (
    "method", "setting", "top1", "top5", "balanced_accuracy", "macro_f1", "roc_auc", "train_rows",
    "val_rows",
)  # fmt: skip


@app.command(
    epilog="Example: bob-cache probe --dataset digits --backbone resnet18 --method all --shots 1,5"
)
@user_errors
def probe(
    dataset: Annotated[str, typer.Option(help="Dataset name as extracted (see `bob-cache ls`).")],
    backbone: Annotated[str, typer.Option(help="Backbone as extracted: its name, label or arch.")],
    store: StoreOpt = "bob-store",
    feature: Annotated[
        str | None, typer.Option(help="Feature key (prefix) when several match.")
    ] = None,
    method: Annotated[str, typer.Option(help="linear, knn, or all (comma-separated).")] = "all",
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
    epochs: Annotated[int, typer.Option(help="Epochs of --recipe bob.")] = 90,
    device: DeviceOpt = "auto",
    results: Annotated[
        str | None,
        typer.Option(envvar="BOB_CACHE_RESULTS", help="Results directory (default bob-results)."),
    ] = None,
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

    methods = METHODS if method == "all" else tuple(m.strip() for m in method.split(","))
    config = ProbeConfig(
        store=store, dataset=dataset, backbone=backbone, feature=feature, methods=methods,
        train_split=train_split, val_split=val_split, test_split=test_split,
        val_fraction=val_fraction, seeds=parse_numbers(seeds, int, "--seeds"),
        shots=parse_numbers(shots, int, "--shots"),
        fractions=parse_numbers(fraction, float, "--fraction"),
        ks=parse_numbers(k, int, "--k"), temperature=temperature, recipe=recipe, epochs=epochs,
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
    columns = [c for c in PROBE_COLUMNS if any(c in row for row in s.table)]
    print_table(s.table, columns)


@app.command(epilog="Example: bob-cache results ./bob-results --dataset digits --metric top1")
@user_errors
def results(
    directory: Annotated[
        str | None, typer.Argument(envvar="BOB_CACHE_RESULTS", help="Results directory.")
    ] = None,
    dataset: Annotated[str | None, typer.Option(help="Only this dataset.")] = None,
    backbone: Annotated[str | None, typer.Option(help="Only this backbone label.")] = None,
    method: Annotated[
        str | None, typer.Option(help="Only this method (linear, knn@20, ...).")
    ] = None,
    metric: Annotated[str | None, typer.Option(help="Only these metrics, comma-separated.")] = None,
    long: Annotated[
        bool, typer.Option("--long", help="Print raw long-format rows instead of the pivot.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Show the results table, filtered, as mean ± std over seeds."""
    from bob_cache.stores.results import ResultsTable, summarize

    table = ResultsTable.open(directory)
    frame = table.read(dataset=dataset, backbone=backbone, method=method)
    metrics = [m.strip() for m in metric.split(",")] if metric else None
    if metrics and not long:
        frame = frame[frame["metric"].isin(metrics)]
    shown = frame if long else summarize(frame, metrics=metrics)
    records = shown.to_dict(orient="records")
    if as_json:
        print_json(records)
    elif not records:
        out.print(f"No results in '{table.directory}' match. Run `bob-cache probe` first.")
    else:
        print_table(records, list(shown.columns))


@app.command(epilog="Example: bob-cache backbones --method DINO")
@user_errors
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


@app.command(name="ls", epilog="Example: bob-cache ls ./bob-store --json")
@user_errors
def list_sets(store: StoreArg, as_json: JsonOpt = False) -> None:
    """List the feature sets in a store."""
    from bob_cache.stores import open_store

    rows = open_store(store).list()
    if as_json:
        print_json(rows)
    elif not rows:
        out.print(f"Store '{store}' holds no feature sets yet.")
    else:
        print_table(rows, (*LISTING[:1], "dataset", *LISTING[1:]))


@app.command(
    epilog="Example: bob-cache info ./bob-store digits/train/resnet18.tv_in1k/3f2a9c1b7d4e"
)
@user_errors
def info(
    store: StoreArg,
    group: Annotated[
        str, typer.Argument(help="Group path, or a unique prefix of the feature key.")
    ],
    as_json: JsonOpt = False,
) -> None:
    """Print a feature set's full provenance."""
    from bob_cache.stores import open_store

    fs = open_store(store).get(group)
    data = {"group": fs.path, **fs.info(), "attributes": fs.attrs}
    if as_json:
        print_json(data)
        return
    for k, v in fs.info().items():
        out.print(f"[bold]{k}[/]: {v}", highlight=False)
    out.print_json(json.dumps(fs.attrs, default=str))


@app.command(epilog="Example: bob-cache verify ./bob-store --repair")
@user_errors
def verify(
    store: StoreArg,
    group: Annotated[
        str | None, typer.Option(help="Only this feature set (group path or key prefix).")
    ] = None,
    repair: Annotated[
        bool,
        typer.Option("--repair", help="Un-commit damaged shards so `extract` recomputes them."),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Read every chunk of every feature set and report damage (exit 1 if any)."""
    from bob_cache.stores import open_store, verify_store

    reports = verify_store(
        open_store(store, mode="a" if repair else "r"), group=group, repair=repair
    )
    damaged = [r for r in reports if not r.ok]
    if as_json:
        print_json([r.to_dict() for r in reports])
    else:
        for r in reports:
            state = "ok" if r.ok else "[bold red]DAMAGED[/]"
            done = "complete" if r.complete else f"incomplete ({r.committed}/{r.shards} shards)"
            out.print(f"{state}  {r.group}  {r.rows} rows, {done}")
            for problem in r.problems:
                out.print(f"    {problem}", highlight=False)
        if damaged:
            fix = "`bob-cache verify --repair`, then the `extract` command `bob-cache info` shows"
            hint = (
                "repaired: rerun the same `bob-cache extract` command" if repair else f"run {fix}"
            )
            count = f"{len(damaged)} of {len(reports)} feature set(s) damaged"
            err.print(f"{count}; {hint} to recompute them.")
    if damaged:
        raise typer.Exit(1)


register_retrieval_commands(app)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
