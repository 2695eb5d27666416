"""One backbone over a dataset in this process, into the feature store (the extraction stage's
core; :mod:`bob_cache.pipelines.extract` dispatches to it).

Plan → for every split and output, require its feature set (new, or reopened and checked
to resume) and list the shards still missing. Run → a DataLoader with worker processes
decodes images (with ``--decode torch`` they only read files and the device decodes); the
model runs on the main thread (autocast and channels_last on CUDA);
a writer thread compresses and commits whole shards. A killed run restarts with the same
command and computes only the missing shards; ``--part K/N`` lets N processes share one
feature set, each taking every N-th shard. With ``--dense`` (pooling ``grid``) each row is an
H × W × D grid instead of a vector: one image per inner chunk, :data:`DENSE_SHARD_ROWS` rows per
shard by default, and the same commit, resume and ``--part`` rules.
"""

from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from bob_cache.backbones import Backbone, Output, create_backbone
from bob_cache.backbones.pooling import is_grid
from bob_cache.config import ExtractConfig, resolve_workers
from bob_cache.data import DataSource, ImageDataset, Sample, collate_rows, parse_source
from bob_cache.data.device_decode import DevicePreprocess, EncodedImageDataset, collate_encoded
from bob_cache.data.images import loader_context
from bob_cache.data.splits import check_fractions_apply
from bob_cache.device import autocast, resolve_device, resolve_precision
from bob_cache.errors import InvalidImageError
from bob_cache.pipelines.batching import ShardBatchSampler
from bob_cache.pipelines.extract import ExtractSummary
from bob_cache.pipelines.resume import (
    check_content,
    check_writers,
    command_without_part,
    writer_identity,
)
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

# Rows per shard of a dense set unless --shard-rows says otherwise: 256 ViT-B/16 grids
# (14 × 14 × 768 float16) are 77 MB, where the default 4096 rows would be 1.2 GB per object.
DENSE_SHARD_ROWS = 256


@dataclass
class SplitPlan:
    """The work for one split: its rows, one feature set per output, and shards to compute."""

    split: str
    samples: list[Sample]
    labels: np.ndarray
    targets: dict[str, FeatureSet]
    shards: list[int]
    shards_skipped: int


def extract_one(config: ExtractConfig) -> ExtractSummary:
    """Run one backbone's extraction described by ``config`` here; returns its summary."""
    started = time.perf_counter()
    run = Extraction.prepare(config)
    summary = run.execute()
    summary.total_seconds = time.perf_counter() - started
    return summary


@dataclass
class Extraction:
    """One extraction run: the resolved inputs every step needs."""

    config: ExtractConfig
    source: DataSource
    dataset: dict[str, Any]
    device: torch.device
    precision: str
    layout: StorageLayout
    store: FeatureStore
    backbone: Backbone

    @classmethod
    def prepare(cls, config: ExtractConfig) -> Extraction:
        """Resolve inputs cheapest first: bad data or store fail before a model loads."""
        source = parse_source(
            config.data, name=config.name, split=config.split, fractions=config.split_fractions
        )
        check_fractions_apply(source, config.split_fractions)
        source.select(config.split)
        device = resolve_device(config.device)
        layout = resolve_layout(**_row_options(config), compression=config.compression)
        store = open_store(config.store, mode="a", storage_options=config.storage_options or None)
        dataset = {k: v for k, v in source.describe().items() if k != "splits"}
        return cls(
            config=config,
            source=source,
            dataset={**dataset, "limit": config.limit},
            device=device,
            precision=resolve_precision(config.precision, device),
            layout=layout,
            store=store,
            backbone=_load_backbone(config, device),
        )

    def execute(self) -> ExtractSummary:
        """Plan every split, compute the missing shards, and finalize the feature sets."""
        dims = self.dims
        selected = self.source.select(self.config.split)
        plans = [
            self.plan(split, rows[: self.config.limit], dims) for split, rows in selected.items()
        ]
        summary = ExtractSummary(
            self.store.location,
            self.source.name,
            self.backbone.slug,
            str(self.device),
            self.precision,
        )
        summary.rows = sum(len(p.samples) for p in plans)
        summary.shards_skipped = sum(p.shards_skipped for p in plans)
        started = time.perf_counter()
        todo = sum(self._rows_in(p) for p in plans)
        desc = f"{self.source.name} {self.backbone.slug}"
        with progress_bar(todo, desc=desc, quiet=self.config.quiet) as bar:
            for plan in plans:
                summary.rows_computed += self.run(plan, bar)
                summary.shards_computed += len(plan.shards)
        summary.seconds = time.perf_counter() - started
        summary.images_per_second = (
            summary.rows_computed / summary.seconds if summary.seconds else 0.0
        )
        _finish(plans, summary)
        return summary

    def plan(self, split: str, samples: list[Sample], dims: dict[str, int]) -> SplitPlan:
        """Require one feature set per output and list the shards this run must compute.

        Resuming a set that has committed shards first checks that this run computes the
        same numbers (environment) from the same images (content digests).
        """
        labels = np.array([s.label for s in samples], dtype=np.int64)
        targets = {
            output.name: self.store.require(
                self._request(split, output, len(samples), dims[output.name]),
                self.layout,
                label_shape=labels.shape[1:],
                overwrite=self.config.overwrite,
            )
            for output in self.backbone.outputs
        }
        mine = set(range(self.layout.n_shards(len(samples))))
        if self.config.part is not None:
            k, n = self.config.part
            mine = {s for s in mine if s % n == k}
        missing = set().union(*(fs.missing_shards() for fs in targets.values())) & mine
        if missing:
            first = next(iter(targets.values()))
            for fs in targets.values():
                check_writers(fs, self.writer, allow_mixed=self.config.allow_mixed)
            check_content(
                first,
                self.source,
                samples,
                workers=resolve_workers(self.config.workers, self.device.type) or 1,
                quiet=self.config.quiet,
            )
        return SplitPlan(split, samples, labels, targets, sorted(missing), len(mine - missing))

    @functools.cached_property
    def request(self) -> dict[str, Any]:
        return self.config.request()

    @functools.cached_property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """Each output's shape per row, from one forward pass on a blank image."""
        return self.backbone.output_shapes(self.device)

    @property
    def dims(self) -> dict[str, int]:
        """Feature dimension of each output."""
        return {name: shape[-1] for name, shape in self.shapes.items()}

    @property
    def grids(self) -> dict[str, tuple[int, int]]:
        """``(H, W)`` of each grid output (``--dense``)."""
        names = {o.name for o in self.backbone.outputs if is_grid(o.pool)}
        return {n: (s[0], s[1]) for n, s in self.shapes.items() if n in names}

    @property
    def writer(self) -> dict[str, str]:
        """This run's environment, recorded in every shard it commits."""
        return writer_identity(self.device.type)

    def _request(self, split: str, output: Output, n_rows: int, dim: int) -> FeatureSetRequest:
        spec = feature_spec(
            self.backbone,
            output,
            precision=self.precision,
            dtype=self.config.dtype,
            dataset_fingerprint=self.dataset["fingerprint"],
            limit=self.config.limit,
            decode=self.config.decode,
        )
        key = feature_key(spec)
        provenance = {
            "dataset": self.dataset,
            "split": split,
            "backbone": {
                **self.backbone.describe(),
                "slug": self.backbone.slug,
                "output": output.name,
            },
            "versions": library_versions(),
            "device": self.device.type,
            "request": self.request,
            "command": command_without_part(self.config.command),
        }
        return FeatureSetRequest(
            path=feature_set_path(self.source.name, split, self.backbone.slug, key),
            key=key,
            spec=spec,
            provenance=provenance,
            n_rows=n_rows,
            dim=dim,
            dtype=self.config.dtype,
            grid=self.grids.get(output.name),
        )

    def run(self, plan: SplitPlan, bar: Any) -> int:
        """Compute ``plan``'s shards; returns the number of rows computed."""
        if not plan.shards:
            return 0
        cfg = self.config
        sampler = ShardBatchSampler(
            plan.shards,
            shard_rows=self.layout.shard_rows,
            n_rows=len(plan.samples),
            batch_size=cfg.batch_size,
        )
        workers = min(resolve_workers(cfg.workers, self.device.type), len(sampler))
        on_device = cfg.decode == "torch"
        if on_device:
            dataset: Dataset = EncodedImageDataset(self.source, plan.samples)
            preprocess = DevicePreprocess(self.backbone.data_config, self.device)
        else:
            dataset = ImageDataset(
                self.source,
                plan.samples,
                self.backbone.transform(),
                self.backbone.data_config["input_size"],
            )
        loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            num_workers=workers,
            pin_memory=self.device.type == "cuda",
            collate_fn=collate_encoded if on_device else collate_rows,
            prefetch_factor=4 if workers else None,
            multiprocessing_context=loader_context(workers),
        )
        ids = [s.id for s in plan.samples]
        with ShardWriter(plan.targets, labels=plan.labels, ids=ids, writer=self.writer) as writer:
            for batch in loader:
                if on_device:
                    images, errors = preprocess(batch)
                    rows, digests = batch.rows, batch.digests
                else:
                    images, rows, errors, digests = batch
                if cfg.strict and any(errors):
                    raise _strict_error(plan, rows, errors)
                writer.put(rows.numpy(), self._forward(images), errors, digests)
                bar.update(len(rows))
        return sampler.n_selected_rows

    @torch.inference_mode()
    def _forward(self, images: torch.Tensor) -> dict[str, np.ndarray]:
        x = self.backbone.normalize(images.to(self.device, non_blocking=True))
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(self.device, self.precision):
            out = self.backbone(x)
        return {name: t.float().cpu().numpy() for name, t in out.items()}

    def _rows_in(self, plan: SplitPlan) -> int:
        bounds = (self.layout.shard_bounds(s, len(plan.samples)) for s in plan.shards)
        return sum(b - a for a, b in bounds)


def _row_options(config: ExtractConfig) -> dict[str, int | None]:
    """Rows per inner chunk and per shard: as given; a dense set defaults to one image per
    inner chunk and :data:`DENSE_SHARD_ROWS` rows per shard."""
    chunk, shard = config.chunk_rows, config.shard_rows
    if is_grid(config.pool) and chunk is None:
        chunk, shard = 1, shard or DENSE_SHARD_ROWS
    return {"chunk_rows": chunk, "shard_rows": shard}


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


def _strict_error(plan: SplitPlan, rows: torch.Tensor, errors: list[str]) -> InvalidImageError:
    bad = next(i for i, e in enumerate(errors) if e)
    return InvalidImageError(
        f"Image '{plan.samples[int(rows[bad])].id}' of split '{plan.split}' cannot be used "
        f"({errors[bad]}). --strict makes this fatal; shards committed before it are kept. "
        "Fix or remove the file, or drop --strict to record it as an invalid row."
    )


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
