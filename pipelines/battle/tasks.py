"""The battle's task registry: each task kind says how to check its options, which stage
runs it on one feature set, and which results-table rows mean it is done.

Kinds register with :func:`register_battle_task`; the planner only ever looks them up, so a new
stage (ood, finetune, dense) adds a kind without touching the planner.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, replace
from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from bob_cache.config import GRID
from bob_cache.errors import SpecError, did_you_mean
from bob_cache.registry import Registry
from bob_cache.suite import DatasetSpec


@dataclass(frozen=True)
class TaskContext:
    """Where a task's stage reads and writes, and on what device."""

    store: str
    results: str
    device: str
    backbone: str  # the name the set was extracted with
    weights: str | None = None  # the backbone's, for kinds that build the model (finetune)
    random_init: bool = False
    runs: str = "bob-runs"  # where kinds that train keep their run folders
    label: str = ""  # the backbone's display label


class TaskKind(ABC):
    """One kind of task: options schema, the stage that runs it, and its done check."""

    name: ClassVar[str]
    stage: ClassVar[str]
    Options: ClassVar[type[BaseModel]]
    # False: the stage reads the dataset itself (no extraction; ``key`` is "")
    reads_features: ClassVar[bool] = True
    # Extraction options this kind needs beyond the backbone's own (e.g. dense grids): the
    # planner extracts that variant, once per dataset × backbone, for the kinds that ask.
    extraction: ClassVar[tuple[tuple[str, Any], ...]] = ()

    def check(self, options: dict[str, Any]) -> tuple[Any, list[tuple[tuple[Any, ...], str]]]:
        """Parse this kind's options; problems as ``(key path, message)``."""
        try:
            return self.Options.model_validate(options), []
        except ValidationError as exc:
            return None, [(tuple(e["loc"]), _message(e, self.Options)) for e in exc.errors()]

    @abstractmethod
    def config(self, options: Any, dataset: DatasetSpec, key: str, ctx: TaskContext) -> Any:
        """The stage's config for one feature set (``key``)."""

    @abstractmethod
    def done_hashes(self, config: Any, key: str) -> set[str]:
        """Results-table config hashes that are all present once the task is done."""

    def is_done(self, config: Any, key: str, table_hashes: set[str]) -> bool:
        """Whether the task has nothing left to do: its rows are in the table (kinds whose
        later readers need more, such as a probe head in this store, check that too)."""
        return self.done_hashes(config, key) <= table_hashes

    def describe(self, options: Any) -> str:
        """A short summary of the options for plan listings."""
        return ""

    def applies(self, options: Any, dataset: DatasetSpec) -> bool:
        """Whether this kind has work on ``dataset`` (e.g. ood needs shift or detect sets);
        by default, image datasets (the ones extracted)."""
        return dataset.extractable

    def reads(self, options: Any, dataset: DatasetSpec) -> tuple[str, ...]:
        """Other datasets whose extraction (same backbone) the job reads."""
        return ()


TASKS: Registry[TaskKind] = Registry("task kind", error=SpecError)


def register_battle_task(kind: type[TaskKind]) -> type[TaskKind]:
    """Class decorator: register a task kind under its ``name``."""
    TASKS.register(kind.name, kind())
    return kind


def get_task(name: str) -> TaskKind:
    return TASKS.get(name)


def list_tasks() -> dict[str, TaskKind]:
    return dict(TASKS.items())


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class _ProbeKind(TaskKind):
    stage = "probe"

    def config(self, options: Any, dataset: DatasetSpec, key: str, ctx: TaskContext) -> Any:
        from bob_cache.pipelines.probe import ProbeConfig

        return ProbeConfig(
            store=ctx.store, dataset=dataset.name, backbone=ctx.backbone, feature=key,
            results=ctx.results, device=ctx.device, train_split=dataset.train_split,
            val_split=dataset.val_split, test_split=dataset.test_split, **self.probe(options),
        )  # fmt: skip

    def done_hashes(self, config: Any, key: str) -> set[str]:
        from bob_cache.pipelines.probe import unit_hashes

        return unit_hashes(config, key)

    def is_done(self, config: Any, key: str, table_hashes: set[str]) -> bool:
        from bob_cache.pipelines.probe import missing_heads

        return super().is_done(config, key, table_hashes) and not missing_heads(config, key)

    @abstractmethod
    def probe(self, options: Any) -> dict[str, Any]:
        """ProbeConfig fields for this kind."""


@register_battle_task
class LinearTask(_ProbeKind):
    """Linear probe on the full training split (C chosen on val, refit on train + val)."""

    name = "linear"

    class Options(_Options):
        recipe: str = Field("sweep", pattern="^(sweep|bob)$")
        epochs: int = Field(90, ge=1)
        seeds: tuple[int, ...] = (0,)

    def probe(self, options: Any) -> dict[str, Any]:
        return {"methods": ("linear",), "recipe": options.recipe, "epochs": options.epochs,
                "seeds": options.seeds}  # fmt: skip

    def describe(self, options: Any) -> str:
        return options.recipe


@register_battle_task
class KnnTask(_ProbeKind):
    """Weighted kNN on the full training split."""

    name = "knn"

    class Options(_Options):
        k: tuple[int, ...] = Field((10, 20, 100, 200), min_length=1)
        temperature: float = Field(0.07, gt=0)

    def probe(self, options: Any) -> dict[str, Any]:
        return {"methods": ("knn",), "ks": options.k, "temperature": options.temperature}

    def describe(self, options: Any) -> str:
        return "k=" + ",".join(map(str, options.k))


@register_battle_task
class FewShotTask(_ProbeKind):
    """Few-shot subsets of train (k per class or a fraction), linear and/or kNN."""

    name = "few-shot"

    class Options(_Options):
        shots: tuple[int, ...] = ()
        fractions: tuple[float, ...] = ()
        methods: tuple[str, ...] = ("linear",)
        seeds: tuple[int, ...] = (0, 1, 2)
        k: tuple[int, ...] = (10, 20)

    def check(self, options: dict[str, Any]) -> tuple[Any, list[tuple[tuple[Any, ...], str]]]:
        parsed, problems = super().check(options)
        if parsed is not None:
            if not (parsed.shots or parsed.fractions):
                problems.append((("shots",), "give shots (e.g. [1, 5]) and/or fractions"))
            bad = [m for m in parsed.methods if m not in ("linear", "knn")]
            if bad:
                problems.append((("methods",), f"unknown {bad}; valid choices: linear, knn"))
            if any(not 0 < f < 1 for f in parsed.fractions):
                problems.append((("fractions",), "fractions must be between 0 and 1"))
        return parsed, problems

    def probe(self, options: Any) -> dict[str, Any]:
        return {"methods": options.methods, "shots": options.shots,
                "fractions": options.fractions, "seeds": options.seeds, "ks": options.k,
                "include_full": False}  # fmt: skip

    def describe(self, options: Any) -> str:
        parts = [f"{s}-shot" for s in options.shots] + [f"{f:g}" for f in options.fractions]
        return f"{','.join(parts)} × {len(options.seeds)} seeds"


@register_battle_task
class RetrievalTask(TaskKind):
    """Retrieval mAP and precision@k: the classes protocol, or gnd when the dataset has one."""

    name = "retrieval"
    stage = "retrieval-eval"

    class Options(_Options):
        metric: str = Field("cosine", pattern="^(cosine|l2|ip)$")
        query_fraction: float = Field(0.2, gt=0, lt=1)
        seed: int = 0

    def config(self, options: Any, dataset: DatasetSpec, key: str, ctx: TaskContext) -> Any:
        from bob_cache.pipelines.retrieval_eval import RetrievalEvalConfig

        return RetrievalEvalConfig(
            store=ctx.store, dataset=dataset.name, backbone=ctx.backbone, feature=key,
            split=dataset.retrieval_split, protocol="gnd" if dataset.gnd else "classes",
            gnd=dataset.gnd, query_fraction=options.query_fraction, seed=options.seed,
            metric=options.metric, results=ctx.results,
        )  # fmt: skip

    def done_hashes(self, config: Any, key: str) -> set[str]:
        from bob_cache.pipelines.retrieval_eval import config_hash

        return {config_hash(config, key)}

    def describe(self, options: Any) -> str:
        return options.metric


def _message(error: Any, model: type[BaseModel]) -> str:
    if error["type"] == "extra_forbidden":
        hint = did_you_mean(str(error["loc"][-1]), model.model_fields)
        return f"unknown option.{hint} Valid options: {', '.join(model.model_fields)}"
    return str(error["msg"]).removeprefix("Value error, ")


@register_battle_task
class OODTask(TaskKind):
    """Generalization on the dataset's shift sets and detection of its detect sets."""

    name = "ood"
    stage = "ood"

    class Options(_Options):
        detectors: tuple[str, ...] | None = None  # default: every registered detector
        knn_k: int | None = Field(None, ge=1)  # None: 50, or every ID train row when fewer
        max_memory: str | None = None

    def check(self, options: dict[str, Any]) -> tuple[Any, list[tuple[tuple[Any, ...], str]]]:
        from bob_cache.ood import list_detectors

        parsed, problems = super().check(options)
        if parsed is not None and parsed.detectors is not None:
            known = list_detectors()
            for j, name in enumerate(parsed.detectors):
                if name not in known:
                    problems.append(
                        (
                            ("detectors", j),
                            f"unknown detector '{name}'."
                            f"{did_you_mean(name, known)} Known: {', '.join(known)}",
                        )
                    )
        return parsed, problems

    def applies(self, options: Any, dataset: DatasetSpec) -> bool:
        return dataset.extractable and bool(dataset.shift or dataset.detect)

    def reads(self, options: Any, dataset: DatasetSpec) -> tuple[str, ...]:
        return (*dataset.shift, *dataset.detect)

    def config(self, options: Any, dataset: DatasetSpec, key: str, ctx: TaskContext) -> Any:
        from bob_cache.ood import list_detectors
        from bob_cache.pipelines.ood import OODConfig
        from bob_cache.retrieval.auto import parse_memory

        budget = parse_memory(options.max_memory)
        return OODConfig(
            store=ctx.store, backbone=ctx.backbone, dataset=dataset.name, shifts=dataset.shift,
            detect=dataset.detect, detectors=options.detectors or tuple(list_detectors()),
            feature=key, knn_k=options.knn_k, train_split=dataset.train_split,
            val_split=dataset.val_split, test_split=dataset.test_split, results=ctx.results,
            device=ctx.device, max_memory_gb=budget / 2**30 if budget else None,
        )  # fmt: skip

    def done_hashes(self, config: Any, key: str) -> set[str]:
        from bob_cache.pipelines.ood import unit_hashes

        return unit_hashes(config, key)

    def describe(self, options: Any) -> str:
        return f"{len(options.detectors) if options.detectors else 'all'} detectors"


def _finetune_data(dataset: DatasetSpec) -> tuple[str, str, str | None]:
    """``(train, val, test)`` of a dataset for the fine-tuning stage: an image source's splits;
    ``data``/``val_data``/``test_data``; or a segmentation folder's train/ val/ test/."""
    from pathlib import Path

    if dataset.kind == "images":  # scored on its test split, when it has one
        from bob_cache.data import parse_source
        from bob_cache.data.splits import parse_split_fractions

        fractions = parse_split_fractions(dataset.split_fractions)
        test = (
            dataset.data
            if "test" in parse_source(dataset.data, fractions=fractions).splits
            else None
        )
        return dataset.data, dataset.data, test
    if dataset.val_data is not None:
        return dataset.data, dataset.val_data, dataset.test_data
    root = Path(dataset.data)
    if (root / "images").is_dir():  # one folder without splits: split by id hash
        return dataset.data, dataset.data, dataset.data
    test = root / dataset.test_split
    return (str(root / dataset.train_split), str(root / dataset.val_split),
            str(test) if test.is_dir() else None)  # fmt: skip


# The dataset kind each fine-tuning task reads.
_FINETUNE_DATA = {
    "classification": "images", "detection": "coco", "instance": "coco",
    "semantic": "segmentation",
}  # fmt: skip


@register_battle_task
class FinetuneTask(TaskKind):
    """Fine-tuning (classification, detection, instance or semantic segmentation) with an lr
    sweep; runs on the datasets of the matching kind, one run folder per backbone."""

    name = "finetune"
    stage = "finetune"
    reads_features = False

    class Options(_Options):
        task: str = Field(pattern="^(classification|detection|instance|semantic)$")
        mode: str = Field("finetune", pattern="^(finetune|frozen|random-init)$")
        lr: tuple[float, ...] = Field((1e-4,), min_length=1)
        epochs: int = Field(10, ge=1)
        batch_size: int = Field(16, ge=1)
        accum_steps: int = Field(1, ge=1)
        image_size: int | None = Field(None, ge=32)
        steps_per_epoch: int | None = Field(None, ge=1)
        warmup_epochs: float = Field(1.0, ge=0)
        workers: int | None = Field(None, ge=0)
        seed: int = 0

    def applies(self, options: Any, dataset: DatasetSpec) -> bool:
        return dataset.kind == _FINETUNE_DATA[options.task]

    def config(self, options: Any, dataset: DatasetSpec, key: str, ctx: TaskContext) -> Any:
        from pathlib import Path

        from bob_cache.pipelines.finetune import FinetuneConfig, config_hash

        train, val, test = _finetune_data(dataset)
        config = FinetuneConfig(
            task=options.task, backbone=ctx.backbone, train=train, val=val, test=test,
            mode="random-init" if ctx.random_init else options.mode, lrs=options.lr,
            epochs=options.epochs, batch_size=options.batch_size,
            accum_steps=options.accum_steps, image_size=options.image_size,
            steps_per_epoch=options.steps_per_epoch, warmup_epochs=options.warmup_epochs,
            weights=ctx.weights, seed=options.seed, device=ctx.device, workers=options.workers,
            results=ctx.results, name=dataset.name, resume=True,
            split_fractions=dataset.split_fractions,
        )  # fmt: skip
        label = ctx.label or ctx.backbone
        folder = f"{options.task}-{config.mode}-{config_hash(config)[:8]}"
        out = Path(ctx.runs) / dataset.name / label.replace("/", "_").replace(":", "_") / folder
        return replace(config, out=str(out))

    def done_hashes(self, config: Any, key: str) -> set[str]:
        from bob_cache.pipelines.finetune import config_hash

        return {config_hash(config)}

    def describe(self, options: Any) -> str:
        return f"{options.task} {options.mode} lr={','.join(f'{v:g}' for v in options.lr)}"


@register_battle_task
class DenseTask(TaskKind):
    """The dense linear probe (semantic segmentation from per-patch features) on a
    segmentation folder's dense grids, extracted for it with ``--dense``."""

    name = "dense"
    stage = "dense-probe"
    extraction = (("pool", GRID),)

    class Options(_Options):
        epochs: int = Field(10, ge=1)
        batch_size: int = Field(16, ge=1)
        lrs: tuple[float, ...] = Field((1e-4, 1e-3, 1e-2), min_length=1)
        seed: int = 0

    def applies(self, options: Any, dataset: DatasetSpec) -> bool:
        return dataset.kind == "segmentation"

    def config(self, options: Any, dataset: DatasetSpec, key: str, ctx: TaskContext) -> Any:
        from bob_cache.pipelines.dense_probe import DenseProbeConfig

        return DenseProbeConfig(
            store=ctx.store, dataset=dataset.name, backbone=ctx.backbone, feature=key,
            train_split=dataset.train_split, val_split=dataset.val_split,
            test_split=dataset.test_split, epochs=options.epochs, batch_size=options.batch_size,
            lrs=options.lrs, seed=options.seed, results=ctx.results,
        )  # fmt: skip

    def done_hashes(self, config: Any, key: str) -> set[str]:
        from bob_cache.pipelines.dense_probe import unit_hashes

        return unit_hashes(config, key)

    def describe(self, options: Any) -> str:
        return f"dense-linear, {options.epochs} epochs"


@register_battle_task
class TransferabilityTask(TaskKind):
    """Transferability estimates (LogME, H-score, LEEP, NCE, kNN-LOO) of the training split:
    cheap predictions beside the measured tasks, never ranked themselves."""

    name = "transferability"
    stage = "transferability"

    class Options(_Options):
        methods: tuple[str, ...] = Field(("logme", "hscore", "knn-loo"), min_length=1)
        k: int = Field(5, ge=1)  # knn-loo's neighbours
        max_rows: int = Field(10_000, ge=2)  # knn-loo's sample

    def check(self, options: dict[str, Any]) -> tuple[Any, list[tuple[tuple[Any, ...], str]]]:
        from bob_cache.transfer import list_estimators

        parsed, problems = super().check(options)
        known = list_estimators()
        for j, name in enumerate(parsed.methods if parsed is not None else ()):
            if name not in known:
                hint = did_you_mean(name, known)
                problems.append((("methods", j), f"unknown method '{name}'.{hint} Known: "
                                 f"{', '.join(known)}"))  # fmt: skip
        return parsed, problems

    def config(self, options: Any, dataset: DatasetSpec, key: str, ctx: TaskContext) -> Any:
        from bob_cache.pipelines.transferability import TransferConfig

        return TransferConfig(
            store=ctx.store, dataset=dataset.name, backbone=ctx.backbone, feature=key,
            methods=options.methods, train_split=dataset.train_split, knn_k=options.k,
            knn_max_rows=options.max_rows, weights=ctx.weights, results=ctx.results,
        )  # fmt: skip

    def done_hashes(self, config: Any, key: str) -> set[str]:
        from bob_cache.pipelines.transferability import unit_hashes

        return unit_hashes(config, key)

    def describe(self, options: Any) -> str:
        return ",".join(options.methods)
