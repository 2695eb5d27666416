"""Planning a battle: one extraction job per backbone × dataset, then each task on its
feature sets, and what the store and the results table already hold.

Extraction is done when every split of the dataset has a complete feature set recorded with
the same request (options as given) over the same data (fingerprint). A task is done when
the results table holds the config hash of every unit its stage would run on each of the
extraction's feature sets. Nothing here loads a model or reads features.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

from bob_cache.config import ExtractConfig, without_loaders_in_daemon
from bob_cache.data import parse_source
from bob_cache.pipelines.battle.tasks import TaskContext, get_task
from bob_cache.stores import FeatureSet, open_store
from bob_cache.stores.results import ResultsTable
from bob_cache.suite import BackboneSpec, DatasetSpec, Suite


@dataclass
class Job:
    """One unit of the battle: an extraction, or a task on one backbone × dataset."""

    id: str
    kind: str  # "extract" or a task kind
    dataset: str
    backbone: str  # display label
    detail: str = ""
    deps: tuple[str, ...] = ()
    done: bool = False
    gpu: bool = False
    run: Any = None  # ExtractRun or TaskRun: called with the results of ``deps``
    keys: tuple[str, ...] = ()  # extraction: the feature keys, when known

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "kind": self.kind, "dataset": self.dataset,
                "backbone": self.backbone, "detail": self.detail, "deps": list(self.deps),
                "done": self.done}  # fmt: skip


@dataclass
class Plan:
    """Every job of a suite, in dependency order."""

    suite: str
    store: str
    results: str
    jobs: list[Job] = field(default_factory=list)
    # each extracted dataset's rows per split and how they were split (the dry run shows it)
    splits: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def todo(self) -> list[Job]:
        return [j for j in self.jobs if not j.done]

    def get(self, job_id: str) -> Job:
        return next(j for j in self.jobs if j.id == job_id)


Variant = tuple[tuple[str, Any], ...]  # extraction options a task kind overrides (e.g. dense)


def plan_battle(suite: Suite, *, store: str, results: str, device: str | None = None) -> Plan:
    """All jobs of ``suite``, each marked done or not."""
    device = device or suite.options.device
    # One listing of the store and one fingerprint per dataset serve every backbone's check.
    sets = open_store(store).feature_sets() if store_exists(store) else None
    done_hashes = ResultsTable.open(results).config_hashes()
    plan = Plan(suite.name, store, results)
    variants = _variants(suite)
    used = {d for d, _ in variants}
    sources = {d.name: _source(d) for d in suite.datasets if d.name in used}
    fingerprints = {name: source.fingerprint() for name, source in sources.items()}
    limits = {d.name: d.limit for d in suite.datasets}
    plan.splits = {
        name: {"rule": source.split_rule.text,
               "rows": {k: min(len(v), limits[name] or len(v))
                        for k, v in sorted(source.splits.items(), key=_split_order)}}
        for name, source in sources.items()
    }  # fmt: skip
    extracted: dict[tuple[str, str, Variant], Job] = {}
    for dataset in suite.datasets:  # every extraction first: a task may read several
        if dataset.name not in used:
            continue
        source, fingerprint = sources[dataset.name], fingerprints[dataset.name]
        found = {
            (b.display, v): _found(sets, suite, b, dataset, v, source, fingerprint, store, device)
            for b in suite.backbones
            for v in variants.get((dataset.name, b.display), ())
        }
        for job in _extraction_jobs(suite, dataset, found, store=store, device=device):
            plan.jobs.append(job)
            for label, variant in job.run.covers:
                extracted[dataset.name, label, variant] = job
    for dataset in suite.datasets:
        for backbone in suite.backbones:
            plan.jobs += _task_jobs(suite, dataset, backbone, extracted, done_hashes,
                                    store=store, results=results, device=device)  # fmt: skip
    return plan


def _split_order(item: tuple[str, Any]) -> tuple[int, str]:
    """train, val, test first, then any other split by name."""
    order = ("train", "val", "test")
    return (order.index(item[0]) if item[0] in order else len(order), item[0])


def _source(dataset: DatasetSpec) -> Any:
    """The dataset's listed source, split by its ``split_fractions`` where it has no splits."""
    from bob_cache.data.splits import check_fractions_apply, parse_split_fractions

    fractions = parse_split_fractions(dataset.split_fractions)
    source = parse_source(dataset.data, name=dataset.name, fractions=fractions)
    check_fractions_apply(source, fractions)
    return source


def _found(
    sets: list[FeatureSet] | None, suite: Suite, backbone: BackboneSpec, dataset: DatasetSpec,
    variant: Variant, source: Any, fingerprint: str, store: str, device: str,
) -> list[str] | None:  # fmt: skip
    """Keys of the complete sets of one extraction (variant), or None when it is to do."""
    if sets is None:
        return None
    config = extract_config(suite, backbone, dataset, store=store, device=device)
    return _extracted(sets, replace(config, **dict(variant)), list(source.splits), fingerprint)


def _variants(suite: Suite) -> dict[tuple[str, str], set[Variant]]:
    """The extractions each dataset × backbone needs: the suite's own for image datasets, and
    each variant a task kind asks for (``TaskKind.extraction``) where it runs."""
    needed: dict[tuple[str, str], set[Variant]] = {}
    for dataset in suite.datasets:
        for backbone in suite.backbones:
            own: set[Variant] = {()} if dataset.extractable else set()
            needed[dataset.name, backbone.display] = own
    for i, task in enumerate(suite.tasks):
        kind, options = get_task(task.kind), suite.task_options[i]
        if not kind.reads_features or not kind.extraction:
            continue
        for dataset in suite.datasets_of(task):
            for backbone in suite.backbones:
                if suite.runs_on(task, backbone) and kind.applies(options, dataset):
                    needed[dataset.name, backbone.display].add(kind.extraction)
    return {k: v for k, v in needed.items() if v}


def _extraction_jobs(
    suite: Suite, dataset: DatasetSpec, found: dict[tuple[str, Variant], list[str] | None], *,
    store: str, device: str,
) -> list[Job]:  # fmt: skip
    """One job per extraction to do (the suite's own decoded once for many backbones), and one
    done job per extraction found complete."""
    jobs: list[Job] = []
    todo: list[tuple[BackboneSpec, ExtractConfig]] = []
    for (label, variant), keys in found.items():
        backbone = next(b for b in suite.backbones if b.display == label)
        config = replace(extract_config(suite, backbone, dataset, store=store, device=device),
                         **dict(variant))  # fmt: skip
        if keys is None and config.decode == "pil" and not variant:
            todo.append((backbone, config))  # decoded once with the others, below
            continue
        jobs.append(Job(
            id=f"extract/{dataset.name}/{label}{_suffix(variant)}", kind="extract",
            dataset=dataset.name, backbone=label, done=keys is not None, gpu=_uses_gpu(device),
            run=ExtractRun(config, covers=((label, variant),)), keys=tuple(keys or ()),
        ))  # fmt: skip
    if len(todo) == 1:
        ((backbone, config),) = todo
        jobs.append(Job(id=f"extract/{dataset.name}/{backbone.display}", kind="extract",
                        dataset=dataset.name, backbone=backbone.display, gpu=_uses_gpu(device),
                        run=ExtractRun(config, covers=((backbone.display, ()),))))  # fmt: skip
    elif todo:  # decode once, extract many: the data cost does not grow with backbones
        labels = tuple(b.display for b, _ in todo)
        jobs.append(Job(id=f"extract/{dataset.name}/{'+'.join(labels)}", kind="extract",
                        dataset=dataset.name, backbone=f"{len(todo)} backbones, one decode",
                        gpu=_uses_gpu(device),
                        run=SharedExtractRun(labels, tuple(c for _, c in todo))))  # fmt: skip
    return jobs


def _suffix(variant: Variant) -> str:
    return "".join(f"+{k}={v}" for k, v in variant)


def _task_jobs(
    suite: Suite, dataset: DatasetSpec, backbone: BackboneSpec,
    extracted: dict[tuple[str, str, Variant], Job], done_hashes: set[str], *, store: str,
    results: str, device: str,
) -> list[Job]:  # fmt: skip
    """The task jobs of one dataset × backbone, each after the extractions it reads."""
    ctx = TaskContext(
        store=store, results=results, device=device, backbone=backbone.name,
        weights=backbone.weights, random_init=backbone.random_init, runs=suite.options.runs,
        label=backbone.display,
    )  # fmt: skip
    jobs = []
    for i, task in enumerate(suite.tasks):
        kind, options = get_task(task.kind), suite.task_options[i]
        if (
            dataset not in suite.datasets_of(task)
            or not suite.runs_on(task, backbone)
            or not kind.applies(options, dataset)
        ):
            continue
        keys: tuple[str, ...] | None = ("",)
        deps: tuple[str, ...] = ()
        if kind.reads_features:  # after its extraction and those it reads (same backbone)
            names = [dataset.name, *dict.fromkeys(kind.reads(options, dataset))]
            sources = [extracted[n, backbone.display, kind.extraction] for n in names]
            deps = tuple(job.id for job in sources)
            keys = sources[0].keys if sources[0].done else None
        done = keys is not None and all(
            kind.is_done(kind.config(options, dataset, key, ctx), key, done_hashes) for key in keys
        )
        jobs.append(Job(
            id=f"{task.kind}#{i}/{dataset.name}/{backbone.display}", kind=task.kind,
            dataset=dataset.name, backbone=backbone.display, detail=kind.describe(options),
            deps=deps, done=done, gpu=not kind.reads_features and _uses_gpu(device),
            run=TaskRun(task.kind, options, dataset, ctx),
        ))  # fmt: skip
    return jobs


@dataclass(frozen=True)
class ExtractRun:
    """Run one extraction; returns its feature keys and a summary (picklable for Dask)."""

    config: ExtractConfig
    covers: tuple[tuple[str, Variant], ...] = ()  # (backbone label, variant) it extracts

    def __call__(self) -> dict[str, Any]:
        from bob_cache.pipelines import get_stage

        summary = get_stage("extract")(without_loaders_in_daemon(self.config))
        keys = sorted({f["key"] for f in summary.feature_sets})
        return {"keys": keys, "slug": summary.backbone, "rows_computed": summary.rows_computed,
                "invalid_rows": summary.invalid_rows, "seconds": summary.total_seconds}  # fmt: skip


@dataclass(frozen=True)
class SharedExtractRun:
    """Extract several backbones of one dataset from one decode of each image; returns each
    one's feature keys by display label (picklable for Dask)."""

    labels: tuple[str, ...]
    configs: tuple[ExtractConfig, ...]

    @property
    def covers(self) -> tuple[tuple[str, Variant], ...]:
        return tuple((label, ()) for label in self.labels)

    def __call__(self) -> dict[str, Any]:
        from bob_cache.pipelines.extract_many import extract_shared

        configs = [without_loaders_in_daemon(c) for c in self.configs]
        failed: dict[int, str] = {}
        summaries = extract_shared(configs, failed=failed)  # a broken backbone spares the rest
        by_label = {
            label: {"keys": sorted({f["key"] for f in s.feature_sets}), "slug": s.backbone}
            if s is not None else {"error": failed[i]}
            for i, (label, s) in enumerate(zip(self.labels, summaries, strict=True))
        }  # fmt: skip
        ran = [s for s in summaries if s is not None]
        return {"by_backbone": by_label, "rows_computed": sum(s.rows_computed for s in ran),
                "seconds": max((s.total_seconds for s in ran), default=0.0)}  # fmt: skip


@dataclass(frozen=True)
class TaskRun:
    """Run one task kind's stage on every feature set of its extraction."""

    kind: str
    options: Any
    dataset: DatasetSpec
    ctx: TaskContext  # its label: the backbone's display label (its keys in a shared extraction)

    def __call__(self, *deps: dict[str, Any]) -> dict[str, Any]:
        """Runs after its extraction and the extractions it reads (same backbone); a kind
        that reads no features runs once, with no dependency."""
        from bob_cache.pipelines import get_stage

        kind = get_task(self.kind)
        if not kind.reads_features:
            config = kind.config(self.options, self.dataset, "", self.ctx)
            run = get_stage(kind.stage)(without_loaders_in_daemon(config))
            return {"keys": [], "seconds": getattr(run, "seconds", 0.0)}
        keys = self._keys(deps)
        runs = [
            get_stage(kind.stage)(kind.config(self.options, self.dataset, key, self.ctx))
            for key in keys
        ]
        seconds = sum(getattr(r, "seconds", 0.0) for r in runs)
        return {"keys": keys, "seconds": seconds}

    def finished(self, *deps: dict[str, Any]) -> dict[str, Any] | None:
        """The job's result when the results table already holds all of it (another battle
        ran it since the plan; ``joined``), else None."""
        kind = get_task(self.kind)
        keys = self._keys(deps) if kind.reads_features else []
        hashes = ResultsTable.open(self.ctx.results).config_hashes()
        done = all(
            kind.is_done(kind.config(self.options, self.dataset, key, self.ctx), key, hashes)
            for key in keys or [""]
        )
        return {"keys": keys, "seconds": 0.0, "joined": True} if done else None

    def _keys(self, deps: tuple[dict[str, Any], ...]) -> list[str]:
        """The feature keys of this backbone's extraction (the first dependency)."""
        from bob_cache.errors import BackboneUnavailableError

        extraction = deps[0]
        if "by_backbone" in extraction:  # several backbones were decoded together
            extraction = extraction["by_backbone"][self.ctx.label]
            if "error" in extraction:
                raise BackboneUnavailableError(
                    f"the extraction of '{self.ctx.label}' failed: {extraction['error']}"
                )
        return list(extraction["keys"])


def extract_config(
    suite: Suite, backbone: BackboneSpec, dataset: DatasetSpec, *, store: str, device: str
) -> ExtractConfig:
    """The extraction a suite asks for one backbone × dataset."""
    o = suite.options
    return ExtractConfig(
        data=dataset.data, backbone=backbone.name, store=store, name=dataset.name, split="all",
        weights=backbone.weights, random_init=backbone.random_init, seed=backbone.seed,
        layers=backbone.layers, pool=backbone.pool, image_size=backbone.image_size,
        dtype=backbone.dtype, precision=backbone.precision, device=device,
        split_fractions=dataset.split_fractions,
        batch_size=o.batch_size, workers=o.workers, decode=backbone.decode, limit=dataset.limit,
        shard_rows=o.shard_rows, quiet=True,
        command=f"bob-cache battle {suite.path.name}  # {backbone.display} × {dataset.name}",
    )  # fmt: skip


def _extracted(
    sets: list[FeatureSet], config: ExtractConfig, splits: list[str], fingerprint: str
) -> list[str] | None:
    """Keys of the complete sets that hold this extraction for every split, or None."""
    request = config.request()
    keys: dict[str, set[str]] = {split: set() for split in splits}
    for fs in sets:
        a = fs.attrs
        if (
            a.get("request") == request
            and a["dataset"].get("fingerprint") == fingerprint
            and a["dataset"].get("name") == config.name
            and a.get("split") in keys
            and fs.complete
        ):
            keys[a["split"]].add(fs.key)
    found = set.intersection(*keys.values()) if keys else set()
    per_output = len(config.layers)
    return sorted(found) if len(found) >= per_output else None


def store_exists(store: str) -> bool:
    """Whether ``store`` is an existing store (URLs are assumed to be)."""
    from pathlib import Path

    from bob_cache.stores.location import is_url

    return is_url(store) or (Path(store) / "zarr.json").is_file()


def _uses_gpu(device: str) -> bool:
    if device.startswith("cuda"):
        return True
    if device != "auto":
        return False
    import torch

    return torch.cuda.is_available()
