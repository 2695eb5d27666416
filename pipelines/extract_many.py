"""Decode once, extract many: ``bob-cache extract --backbone A,B,C``.

Each image is read and decoded once per batch and handed to every backbone with its own
resize, crop and normalization (its own timm transform), so the data cost does not grow with
the number of backbones. Each backbone keeps everything a separate run has: its own feature
sets and keys, request and provenance, resume (a backbone whose shard is committed skips it),
and batches (shard-aligned, same size), so its features equal a separate run's.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import replace

from torch.utils.data import DataLoader

from bob_cache.config import ExtractConfig, resolve_workers
from bob_cache.data.images import SharedDecodeDataset, collate_shared, loader_context
from bob_cache.errors import BobCacheError, SpecError
from bob_cache.pipelines.batching import ShardBatchSampler
from bob_cache.pipelines.extract import ExtractSummary
from bob_cache.pipelines.extract_single import Extraction, SplitPlan, _finish, _strict_error
from bob_cache.pipelines.writer import ShardWriter
from bob_cache.progress import progress_bar


def backbone_names(config: ExtractConfig) -> list[str]:
    """The comma-separated backbones of ``--backbone`` (one name: a plain extraction)."""
    names = [n.strip() for n in config.backbone.split(",") if n.strip()]
    if len(set(names)) < len(names):
        raise SpecError(f"--backbone names a backbone twice: {config.backbone}.")
    return names


def extract_many(config: ExtractConfig) -> list[ExtractSummary]:
    """Extract every backbone of ``config.backbone`` from one decode per image."""
    names = backbone_names(config)
    if config.weights:
        raise SpecError(
            "--weights names one checkpoint, but --backbone lists several. Extract a backbone "
            "with its own weights file separately."
        )
    return extract_shared([replace(config, backbone=name) for name in names])


SHARED = ("data", "name", "split", "limit", "store", "batch_size", "workers", "shard_rows",
          "chunk_rows", "compression", "device", "strict")  # fmt: skip


def extract_shared(
    configs: list[ExtractConfig], *, failed: dict[int, str] | None = None
) -> list[ExtractSummary | None]:
    """One extraction per config (one backbone each, with its own weights, layers, pooling,
    size, precision and dtype) from one decode per image. The configs must agree on the data,
    the store and the batching (:data:`SHARED`), and decode on the host.

    Args:
        failed: when given, a backbone that cannot be prepared (e.g. an unreadable weights
            file) is left out, its error message recorded here by index, and its summary is
            None; the others go on. Otherwise the error is raised.
    """
    _check_shared(configs)
    started = time.perf_counter()
    runs: list[Extraction | None] = []
    for i, c in enumerate(configs):
        try:
            runs.append(Extraction.prepare(c))
        except BobCacheError as exc:
            if failed is None:
                raise
            failed[i] = str(exc)
            runs.append(None)
    ready = [r for r in runs if r is not None]
    done = iter(_extract_runs(ready, configs[0], started) if ready else [])
    return [None if r is None else next(done) for r in runs]


def _check_shared(configs: list[ExtractConfig]) -> None:
    differ = [f for f in SHARED if len({str(getattr(c, f)) for c in configs}) > 1]
    if differ:
        raise SpecError(
            f"Backbones extracted from one decode must share {', '.join(differ)}; run the "
            "others separately."
        )
    if any(c.decode != "pil" for c in configs):
        raise SpecError(
            "Several backbones at once decode on the host (--decode pil); --decode torch "
            "decodes on the GPU per backbone. Run them separately, or drop --decode."
        )


def _extract_runs(
    runs: list[Extraction], config: ExtractConfig, started: float
) -> list[ExtractSummary]:
    first = runs[0]
    dims = [run.dims for run in runs]
    summaries = [
        ExtractSummary(r.store.location, r.source.name, r.backbone.slug, str(r.device),
                       r.precision)
        for r in runs
    ]  # fmt: skip
    begun = time.perf_counter()
    for split, rows in first.source.select(config.split).items():
        samples = rows[: config.limit]
        plans = [run.plan(split, samples, d) for run, d in zip(runs, dims, strict=True)]
        for plan, summary in zip(plans, summaries, strict=True):
            summary.rows += len(plan.samples)
            summary.shards_skipped += plan.shards_skipped
        computed = _run_split(runs, plans, config)
        for plan, summary, n in zip(plans, summaries, computed, strict=True):
            summary.rows_computed += n
            summary.shards_computed += len(plan.shards)
            _finish([plan], summary)
    for summary in summaries:
        summary.seconds = time.perf_counter() - begun
        summary.images_per_second = (
            summary.rows_computed / summary.seconds if summary.seconds else 0
        )
        summary.total_seconds = time.perf_counter() - started
    return summaries


def _run_split(runs: list[Extraction], plans: list[SplitPlan], config: ExtractConfig) -> list[int]:
    """Compute every backbone's missing shards of one split; rows computed per backbone."""
    wanted = [set(p.shards) for p in plans]
    shards = sorted(set().union(*wanted))
    if not shards:
        return [0] * len(runs)
    first = runs[0]
    sampler = ShardBatchSampler(
        shards, shard_rows=first.layout.shard_rows, n_rows=len(plans[0].samples),
        batch_size=config.batch_size,
    )  # fmt: skip
    # backbones whose resize and crop agree (normalization differs: it runs per batch) share
    # one transformed tensor, as they share the decode
    keys = [_resize_key(r) for r in runs]
    unique = list(dict.fromkeys(keys))
    which = [unique.index(k) for k in keys]
    makers = {k: r for k, r in zip(keys, runs, strict=True)}
    dataset = SharedDecodeDataset(
        first.source, plans[0].samples, [makers[k].backbone.transform() for k in unique],
        [makers[k].backbone.data_config["input_size"] for k in unique],
    )  # fmt: skip
    workers = min(resolve_workers(config.workers, first.device.type), len(sampler))
    loader = DataLoader(
        dataset, batch_sampler=sampler, num_workers=workers, collate_fn=collate_shared,
        pin_memory=first.device.type == "cuda", prefetch_factor=4 if workers else None,
        multiprocessing_context=loader_context(workers),
    )  # fmt: skip
    computed = [0] * len(runs)
    ids = [s.id for s in plans[0].samples]
    desc = f"{first.source.name} × {len(runs)} backbones"
    with ExitStack() as stack, progress_bar(sampler.n_selected_rows, desc=desc,
                                            quiet=config.quiet) as bar:  # fmt: skip
        writers = [
            stack.enter_context(ShardWriter(p.targets, labels=p.labels, ids=ids, writer=r.writer))
            for r, p in zip(runs, plans, strict=True)
        ]
        for images, rows, errors, digests in loader:
            if config.strict and any(errors):
                raise _strict_error(plans[0], rows, errors)
            shard = int(rows[0]) // first.layout.shard_rows
            for i, run in enumerate(runs):
                if shard in wanted[i]:
                    writers[i].put(rows.numpy(), run._forward(images[which[i]]), errors, digests)
                    computed[i] += len(rows)
            bar.update(len(rows))
    return computed


def _resize_key(run: Extraction) -> str:
    """What the uint8 transform depends on: the data config without mean and std."""
    config = {k: v for k, v in run.backbone.data_config.items() if k not in ("mean", "std")}
    return repr(sorted(config.items()))
