"""The extraction stage: run a backbone over a dataset once, into the feature store.

Plan → for every split and output, require its feature set (new, or reopened and checked
to resume) and list the shards still missing. Run → a DataLoader with worker processes
decodes images; the model runs on the main thread (autocast and channels_last on CUDA);
a writer thread compresses and commits whole shards. A killed run restarts with the same
command and computes only the missing shards; ``--part K/N`` lets N processes share one
feature set, each taking every N-th shard.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader

from bob_cache.backbones import Backbone, create_backbone
from bob_cache.config import ExtractConfig, resolve_workers
from bob_cache.data import DataSource, ImageDataset, Sample, collate_rows, parse_source
from bob_cache.device import autocast, resolve_device, resolve_precision
from bob_cache.errors import InvalidImageError
from bob_cache.pipelines.batching import ShardBatchSampler
from bob_cache.pipelines.registry import register_stage
from bob_cache.pipelines.writer import ShardWriter
from bob_cache.progress import progress_bar
from bob_cache.provenance import library_versions
from bob_cache.spec import feature_key, feature_spec
from bob_cache.stores import (
    FeatureSet,
    FeatureSetRequest,
    FeatureStore,
    StorageLayout,
    open_store,
    resolve_layout,
)
from bob_cache.stores.feature_store import feature_set_path


@dataclass
class SplitPlan:
    """The work for one split: its rows, one feature set per output, and shards to compute."""

    split: str
    samples: list[Sample]
    targets: dict[str, FeatureSet]
    shards: list[int]
    shards_skipped: int


@dataclass
class ExtractSummary:
    """What an extraction did (printed by the CLI, ``--json`` for machines)."""

    store: str
    dataset: str
    backbone: str
    device: str
    precision: str
    feature_sets: list[dict[str, Any]] = field(default_factory=list)
    rows: int = 0
    rows_computed: int = 0
    shards_computed: int = 0
    shards_skipped: int = 0
    invalid_rows: int = 0
    invalid_examples: list[dict[str, str]] = field(default_factory=list)
    seconds: float = 0.0
    images_per_second: float = 0.0
    total_seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@register_stage("extract")
def extract(config: ExtractConfig) -> ExtractSummary:
    """Run one extraction described by ``config``; returns its summary."""
    started = time.perf_counter()
    source = parse_source(config.data, name=config.name, split=config.split)
    splits = {s: rows[: config.limit] for s, rows in source.select(config.split).items()}
    device = resolve_device(config.device)
    precision = resolve_precision(config.precision, device)
    layout = resolve_layout(
        chunk_rows=config.chunk_rows, shard_rows=config.shard_rows, compression=config.compression
    )
    store = open_store(config.store, mode="a", storage_options=config.storage_options or None)
    backbone = _load_backbone(config, device)
    dims = backbone.output_dims(device)
    plans = [
        _plan_split(store, source, split, samples, backbone, dims, layout, precision, config)
        for split, samples in splits.items()
    ]
    summary = ExtractSummary(store.location, source.name, backbone.slug, str(device), precision)
    summary.rows = sum(len(p.samples) for p in plans)
    summary.shards_skipped = sum(p.shards_skipped for p in plans)
    loop_started = time.perf_counter()
    with progress_bar(
        sum(_rows_in(p, layout) for p in plans),
        desc=f"{source.name} {backbone.slug}",
        quiet=config.quiet,
    ) as bar:
        for plan in plans:
            summary.rows_computed += _run_split(
                plan, source, backbone, device, precision, config, bar
            )
            summary.shards_computed += len(plan.shards)
    summary.seconds = time.perf_counter() - loop_started
    summary.images_per_second = summary.rows_computed / summary.seconds if summary.seconds else 0.0
    _finish(plans, summary)
    summary.total_seconds = time.perf_counter() - started
    return summary


def _load_backbone(config: ExtractConfig, device: torch.device) -> Backbone:
    backbone = create_backbone(
        config.backbone,
        weights=config.weights,
        random_init=config.random_init,
        seed=config.seed,
        layers=config.layers,
        pool=config.pool,
        image_size=config.image_size,
    ).to(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
        backbone = backbone.to(memory_format=torch.channels_last)
    return backbone


def _plan_split(
    store: FeatureStore,
    source: DataSource,
    split: str,
    samples: list[Sample],
    backbone: Backbone,
    dims: dict[str, int],
    layout: StorageLayout,
    precision: str,
    config: ExtractConfig,
) -> SplitPlan:
    dataset = {k: v for k, v in source.describe().items() if k != "splits"}
    labels = np.array([s.label for s in samples], dtype=np.int64)
    ids = [s.id for s in samples]
    targets = {}
    for output in backbone.outputs:
        spec = feature_spec(
            backbone,
            output,
            precision=precision,
            dtype=config.dtype,
            dataset_fingerprint=dataset["fingerprint"],
            limit=config.limit,
        )
        key = feature_key(spec)
        request = FeatureSetRequest(
            path=feature_set_path(source.name, split, backbone.slug, key),
            key=key,
            spec=spec,
            provenance={
                "dataset": {**dataset, "limit": config.limit},
                "split": split,
                "backbone": {**backbone.describe(), "slug": backbone.slug, "output": output.name},
                "versions": library_versions(),
                "command": config.command,
            },
            n_rows=len(samples),
            dim=dims[output.name],
            dtype=config.dtype,
        )
        targets[output.name] = store.require(
            request, layout, labels=labels, ids=ids, overwrite=config.overwrite
        )
    mine = set(range(layout.n_shards(len(samples))))
    if config.part is not None:
        k, n = config.part
        mine = {s for s in mine if s % n == k}
    missing = set().union(*(fs.missing_shards() for fs in targets.values())) & mine
    return SplitPlan(split, samples, targets, sorted(missing), len(mine - missing))


def _rows_in(plan: SplitPlan, layout: StorageLayout) -> int:
    return sum(b - a for a, b in (layout.shard_bounds(s, len(plan.samples)) for s in plan.shards))


def _run_split(
    plan: SplitPlan,
    source: DataSource,
    backbone: Backbone,
    device: torch.device,
    precision: str,
    config: ExtractConfig,
    bar: Any,
) -> int:
    if not plan.shards:
        return 0
    layout = next(iter(plan.targets.values())).layout
    sampler = ShardBatchSampler(
        plan.shards,
        shard_rows=layout.shard_rows,
        n_rows=len(plan.samples),
        batch_size=config.batch_size,
    )
    workers = min(resolve_workers(config.workers), len(sampler))
    loader = DataLoader(
        ImageDataset(
            source, plan.samples, backbone.transform(), backbone.data_config["input_size"]
        ),
        batch_sampler=sampler,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        collate_fn=collate_rows,
        prefetch_factor=4 if workers else None,
    )
    with ShardWriter(plan.targets) as writer:
        for images, rows, errors in loader:
            if config.strict and any(errors):
                bad = next(i for i, e in enumerate(errors) if e)
                raise InvalidImageError(
                    f"Image '{plan.samples[int(rows[bad])].id}' of split '{plan.split}' cannot be "
                    f"used ({errors[bad]}). --strict makes this fatal; shards committed before it "
                    "are kept. Fix or remove the file, or drop --strict to record it as an "
                    "invalid row."
                )
            writer.put(rows.numpy(), _forward(backbone, images, device, precision), errors)
            bar.update(len(rows))
    return sampler.n_selected_rows


@torch.inference_mode()
def _forward(
    backbone: Backbone, images: torch.Tensor, device: torch.device, precision: str
) -> dict[str, np.ndarray]:
    x = images.to(device, non_blocking=True)
    if device.type == "cuda":
        x = x.contiguous(memory_format=torch.channels_last)
    with autocast(device, precision):
        out = backbone(x)
    return {name: t.float().cpu().numpy() for name, t in out.items()}


def _finish(plans: list[SplitPlan], summary: ExtractSummary) -> None:
    for plan in plans:
        invalid: dict[str, str] = {}
        for fs in plan.targets.values():
            fs.finalize()
            invalid.update(fs.invalid_rows())
            summary.feature_sets.append(fs.info())
        summary.invalid_rows += len(invalid)
        summary.invalid_examples += [
            {"split": plan.split, "id": i, "reason": r} for i, r in list(invalid.items())[:5]
        ]
