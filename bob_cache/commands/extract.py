"""The extract family: ``extract`` (run a backbone over a dataset once, store its features)."""

from __future__ import annotations

import shlex
import sys
from typing import Annotated, Any

import typer

from bob_cache.commands.common import (
    FEATURE_SET_COLUMNS,
    INTERRUPTED_RESUMABLE,
    DeviceOpt,
    JsonOpt,
    QuietOpt,
    SplitFractionsOpt,
    StoreOpt,
    err,
    handle_errors,
    out,
    print_json,
    print_table,
)


@handle_errors(interrupted=INTERRUPTED_RESUMABLE)
def extract(
    data: Annotated[
        str,
        typer.Option(
            help="Image folder, segmentation folder (images/ + masks/, optionally under "
            "train/ val/ test/), .csv/.jsonl manifest, or builtin:digits."
        ),
    ],
    backbone: Annotated[
        str,
        typer.Option(
            help="Registry name (see `bob-cache backbones`), timm name, or tv:<torchvision model>; "
            "A,B,C extracts several from one decode of each image."
        ),
    ],
    store: StoreOpt = "bob-store",
    name: Annotated[
        str | None, typer.Option(help="Dataset name (default: folder or manifest stem).")
    ] = None,
    split: Annotated[str, typer.Option(help="Split to extract, or 'all'.")] = "all",
    split_fractions: SplitFractionsOpt = None,
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
        str, typer.Option(help="default (the model's own head), avg, token, or grid (--dense).")
    ] = "default",
    dense: Annotated[
        bool,
        typer.Option(
            "--dense",
            help="Store an H×W×D grid per image (ViT patch tokens, CNN feature map) instead of "
            "a pooled vector: a feature set of its own, for `probe --method dense-linear`.",
        ),
    ] = False,
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
    scheduler: Annotated[
        str | None,
        typer.Option(
            help="tcp://HOST:PORT of a running Dask cluster: its workers share the "
            "shards (they must reach the store)."
        ),
    ] = None,
    local_cluster: Annotated[
        int | None,
        typer.Option(help="Start a Dask LocalCluster of N processes that share the shards."),
    ] = None,
    parts: Annotated[
        int | None,
        typer.Option(help="Parts the shards are split into on a cluster (default 1 per worker)."),
    ] = None,
    overwrite: Annotated[
        bool,
        typer.Option(
            "--overwrite", help="Delete and recompute existing feature sets with this key."
        ),
    ] = False,
    allow_mixed: Annotated[
        bool,
        typer.Option(
            "--allow-mixed",
            help="Resume a set whose committed shards came from other torch/timm versions or "
            "another device type (each shard records its own; `bob-cache info` lists them).",
        ),
    ] = False,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Run a backbone over a dataset once and store its features (resumable)."""
    from bob_cache.config import ExtractConfig, parse_layers, parse_part
    from bob_cache.pipelines import get_stage

    pool = _dense_pool(pool) if dense else pool
    config = ExtractConfig(
        data=data, backbone=backbone, store=store, name=name, split=split,
        split_fractions=split_fractions, weights=weights,
        random_init=random_init, seed=seed, layers=parse_layers(layers), pool=pool,
        image_size=image_size, dtype=dtype, precision=precision, device=device,
        batch_size=batch_size, workers=workers, decode=decode, limit=limit, strict=strict,
        chunk_rows=chunk_rows, shard_rows=shard_rows, compression=compression,
        part=parse_part(part), scheduler=scheduler, local_cluster=local_cluster, parts=parts,
        overwrite=overwrite, allow_mixed=allow_mixed,
        quiet=quiet or as_json,
        command=shlex.join(["bob-cache", *sys.argv[1:]]),
    )  # fmt: skip
    result = get_stage("extract")(config)
    summaries = result if isinstance(result, list) else [result]
    if as_json:  # one backbone: its summary; several (decode once): one summary each
        print_json(summaries[0].to_dict() if len(summaries) == 1 else
                   [s.to_dict() for s in summaries])  # fmt: skip
        return
    for s in summaries:
        _print_summary(s)


def _dense_pool(pool: str) -> str:
    """``--dense`` is ``--pool grid``; any other pooling contradicts it."""
    from bob_cache.config import GRID
    from bob_cache.errors import SpecError

    if pool not in ("default", GRID):
        raise SpecError(
            f"--dense keeps every position (pooling '{GRID}'), so it cannot be combined with "
            f"--pool {pool}. Drop --pool, or drop --dense for pooled vectors."
        )
    return GRID


def _print_summary(s: Any) -> None:
    out.print(
        f"Extracted [bold]{s.dataset}[/] with [bold]{s.backbone}[/] on {s.device} ({s.precision}): "
        f"{s.rows} rows, {s.rows_computed} computed ({s.images_per_second:.1f} img/s, "
        f"{s.seconds:.1f} s), {s.shards_skipped} shard(s) already done, {s.invalid_rows} invalid.",
        highlight=False,
    )
    for example in s.invalid_examples:  # an id is a path or a manifest id, maybe absolute
        err.print(
            f"  invalid ({example['split']}): {example['id']}: {example['reason']}",
            highlight=False,
            markup=False,
        )
    print_table(s.feature_sets, FEATURE_SET_COLUMNS, title=f"store: {s.store}")


def register(app: typer.Typer) -> None:
    """Add the extract family's commands to ``app``."""
    app.command(
        epilog="Example: bob-cache extract --data builtin:digits --backbone resnet18\n\n"
        "Dense: bob-cache extract --data ./shapes --backbone vit_small_patch14_dinov2 --dense"
    )(extract)
