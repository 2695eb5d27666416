"""The fine-tuning stage: train a network over a backbone end to end (or over a frozen one,
or from random init) at each learning rate of a sweep, keep the best on val, score it on val
and test, and append the figures to the results table.

Protocol (stated in each row): the model is trained on the train split only; the learning
rate and the epoch are chosen on val; test is scored once, with the chosen model. A test set
from another dataset (cross-domain) is reported with its ``drop`` from val.

Layout of ``--out``: ``config.json`` and ``summary.json`` for the sweep, ``best.safetensors``
(the chosen model) and one folder per learning rate (``<mode>-lr<lr>/``) with its config,
per-epoch log, checkpoint, best weights, metrics and COCO predictions.

Interruptions: every file is written under a temporary name and renamed into place, each run's
``metrics.json`` once its epochs are done, ``summary.json`` and the results rows last; after a
kill or a full disk at any step, the same command with ``--resume`` finishes the sweep to the
same weights, figures and rows as an uninterrupted one.
"""

from __future__ import annotations

import os
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from bob_cache.data.splits import parse_split_fractions
from bob_cache.errors import SpecError
from bob_cache.finetune import checkpoint as ckpt
from bob_cache.finetune.launch import barrier, rank
from bob_cache.finetune.tasks import FinetuneTask, TaskData, TaskInputs, get_task, parse_mode
from bob_cache.finetune.trainer import Fitter, TrainSettings, epoch_images
from bob_cache.hashing import stable_hash
from bob_cache.pipelines.registry import register_stage
from bob_cache.provenance import library_versions, utc_now
from bob_cache.stores.atomic import (
    copy_file,
    crash_point,
    full_disk_is_reported,
    remove_temporaries,
)
from bob_cache.stores.results import DEFAULT_RESULTS, ResultsTable, config_columns

# Options that change no number: left out of the run's identity.
_NOT_IN_HASH = ("out", "results", "resume", "quiet", "workers", "device", "name")
_NOT_IDENTITY = (*_NOT_IN_HASH, "lrs")  # a run folder is one lr: the sweep is not its identity


def config_hash(config: FinetuneConfig) -> str:
    """The results-table hash of a run: every option that changes its numbers, from the
    config alone (the battle checks it without building a model)."""
    values = {k: v for k, v in asdict(config).items() if k not in _NOT_IN_HASH}
    if values.get("split_fractions") is None:  # the default: hashes from before it existed
        values.pop("split_fractions", None)
    return stable_hash(values)


@dataclass(frozen=True)
class FinetuneConfig:
    """Everything ``bob-cache finetune`` was asked to do."""

    task: str
    backbone: str
    train: str
    val: str
    test: str | None = None
    images: str | None = None
    classes: tuple[str, ...] | None = None
    ignore_index: int = 255
    split_fractions: tuple[float, float, float] | None = None  # a source in several roles
    mode: str = "finetune"
    lrs: tuple[float, ...] = (1e-4,)
    epochs: int = 10
    batch_size: int = 16
    accum_steps: int = 1
    image_size: int | None = None
    weight_decay: float = 0.05
    layer_decay: float | None = None
    warmup_epochs: float = 1.0
    steps_per_epoch: int | None = None
    weights: str | None = None
    seed: int = 0
    precision: str = "auto"
    device: str = "auto"
    workers: int | None = None  # None: 0 on a CPU (compute takes every core), else up to 8
    out: str = "bob-finetune"
    results: str | None = DEFAULT_RESULTS
    name: str | None = None
    resume: bool = False
    quiet: bool = True


@dataclass
class FinetuneSummary:
    task: str
    backbone: str
    dataset: str
    mode: str
    primary: str
    best_lr: float
    best_epoch: int
    val: dict[str, float]
    test: dict[str, float] | None
    runs: list[dict[str, Any]]
    info: dict[str, Any]
    out: str
    seconds: float
    drop: dict[str, float] | None = None
    files: dict[str, str] = field(default_factory=dict)
    slug: str = ""  # architecture and weights, as the results table names backbones

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@register_stage("finetune")
@full_disk_is_reported(
    "the fine-tuning run",
    "rerun the same command with --resume: it continues from the last checkpoint",
)
def finetune(config: FinetuneConfig) -> FinetuneSummary | None:
    """Run the learning-rate sweep of ``config`` and report the chosen model (on rank 0;
    the other ranks of a torchrun launch return None)."""
    from bob_cache.finetune.launch import init_distributed, resolve_run_device

    started = time.perf_counter()
    task = get_task(config.task)
    parse_mode(config.mode)
    _check(config)
    inputs = TaskInputs(
        train=config.train, val=config.val, test=config.test, images=config.images,
        classes=config.classes, ignore_index=config.ignore_index,
        split_fractions=config.split_fractions,
    )  # fmt: skip
    task.check(inputs)  # before any weights load: a missing file is named, not a download
    init_distributed()
    device, precision = resolve_run_device(config.device, config.precision)
    out = Path(config.out)
    probe = _backbone(config)
    mean, std = probe.data_config["mean"], probe.data_config["std"]
    image_size = config.image_size or int(probe.data_config["input_size"][-1])
    inputs = replace(inputs, image_size=image_size)
    data = task.load(inputs, mean=mean, std=std)
    dataset = config.name or data.info.get("dataset", "dataset")
    identity = _identity(config, probe, image_size, precision)
    if rank() == 0:
        out.mkdir(parents=True, exist_ok=True)
        remove_temporaries(out)  # a killed run's half-written files (never read)
        ckpt.write_json(out / ckpt.CONFIG, {**identity, "lrs": list(config.lrs)})
        crash_point("finetune-config")
    common = dict(identity=identity, device=device, precision=precision, inputs=inputs,
                  mean=mean, std=std)  # fmt: skip
    runs = [_run_one(task, config, data, lr=lr, **common) for lr in config.lrs]
    barrier()
    if rank() != 0:  # the other ranks trained; rank 0 scores, writes and reports
        return None
    best = max(runs, key=lambda r: (r["val"][task.primary], -r["lr"]))
    summary = _score_best(
        task, config, data, best, inputs=inputs, device=device, mean=mean, std=std
    )
    summary.update(dataset=dataset, runs=runs, seconds=time.perf_counter() - started,
                   slug=probe.slug)  # fmt: skip
    result = FinetuneSummary(**summary)
    ckpt.write_json(out / "summary.json", result.to_dict())
    crash_point("finetune-summary")
    table = ResultsTable.open(config.results) if config.results else None
    if table is not None and config_hash(config) not in table.config_hashes():
        table.append(_rows(task, config, result, identity, data))  # once per run
    return result


def resolve_workers(workers: int | None, device: torch.device) -> int:
    """Loader processes: as given; by default none on a CPU, where the training step already
    uses every core and loader processes only compete with it (measured: 0.81-0.83 of a bare
    loop's speed with 2 of them on 2 cores, 0.99 with none), and up to 8 beside a GPU."""
    if workers is not None:
        return workers
    if device.type != "cuda":
        return 0
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def _check(config: FinetuneConfig) -> None:
    for option, value, low in (
        ("epochs", config.epochs, 1), ("batch-size", config.batch_size, 1),
        ("accum-steps", config.accum_steps, 1), ("workers", config.workers or 0, 0),
    ):  # fmt: skip
        if value < low:
            raise SpecError(f"--{option} must be at least {low}; got {value}.")
    parse_split_fractions(config.split_fractions)  # checked before any work
    if config.image_size is not None and config.image_size < 32:
        raise SpecError(f"--image-size must be at least 32 pixels; got {config.image_size}.")


def _backbone(config: FinetuneConfig) -> Any:
    from bob_cache.backbones import create_backbone

    return create_backbone(
        config.backbone,
        weights=config.weights,
        random_init=config.mode == "random-init",
        seed=config.seed,
        image_size=config.image_size,
    )


def _identity(
    config: FinetuneConfig, backbone: Any, image_size: int, precision: str
) -> dict[str, Any]:
    values = {k: v for k, v in asdict(config).items() if k not in _NOT_IDENTITY}
    values.update(
        image_size=image_size,
        precision=precision,
        backbone_identity=backbone.identity(),
        world_size=_world_size(),
    )
    return values


def _run_one(
    task: FinetuneTask, config: FinetuneConfig, data: TaskData, *, lr: float,
    identity: dict[str, Any], device: torch.device, precision: str, inputs: TaskInputs,
    mean: list[float], std: list[float],
) -> dict[str, Any]:  # fmt: skip
    run_dir = Path(config.out) / f"{config.mode}-lr{lr:g}"
    run_config = {**identity, "lr": lr}
    state = ckpt.check_run_dir(run_dir, run_config, resume=config.resume)
    if rank() == 0:
        remove_temporaries(run_dir)  # a killed run's half-written files (never read)
    barrier()  # every rank has checked the folder before rank 0 writes into it
    done = run_dir / ckpt.METRICS
    if state is not None and done.exists() and state["epoch"] >= config.epochs:
        import json

        return json.loads(done.read_text())
    if rank() == 0:
        run_dir.mkdir(parents=True, exist_ok=True)
        ckpt.write_json(run_dir / ckpt.CONFIG, run_config)
        crash_point("finetune-run-config")
    barrier()
    model, net = _model(task, config, data, inputs=inputs, mean=mean, std=std)
    settings = TrainSettings(
        lr=lr, epochs=config.epochs, batch_size=config.batch_size,
        accum_steps=config.accum_steps, weight_decay=config.weight_decay,
        layer_decay=config.layer_decay, warmup_epochs=config.warmup_epochs, seed=config.seed,
        workers=resolve_workers(config.workers, device), precision=precision,
        steps_per_epoch=config.steps_per_epoch,
    )  # fmt: skip
    fitter = Fitter(task, model, backbone=net, data=data, settings=settings, device=device,
                    run_dir=run_dir, quiet=config.quiet)  # fmt: skip
    fit = fitter.fit(state)
    record = {
        "lr": lr,
        "run_dir": run_dir.as_posix(),
        "best_epoch": fit.best_epoch,
        "val": fit.best,
        "epochs": config.epochs,
        "train_images_per_epoch": fitter.images_per_epoch(),
        "train_images_per_second": fit.images_per_second,
        "history": fit.history,
    }
    if rank() == 0:
        ckpt.write_json(done, record)
        crash_point("finetune-record")
    return record


def _model(
    task: FinetuneTask, config: FinetuneConfig, data: TaskData, *, inputs: TaskInputs,
    mean: list[float], std: list[float],
) -> tuple[torch.nn.Module, torch.nn.Module]:  # fmt: skip
    with torch.random.fork_rng(devices=[]):  # new heads are drawn from the run's seed
        torch.manual_seed(config.seed)
        backbone = _backbone(config)
        net = backbone.model.requires_grad_(True).train()
        frozen = config.mode == "frozen"
        model = task.build(
            net, data, name=config.backbone, frozen=frozen, inputs=inputs, mean=mean, std=std
        )
    return model, net


def _score_best(
    task: FinetuneTask, config: FinetuneConfig, data: TaskData, best: dict[str, Any], *,
    inputs: TaskInputs, device: torch.device, mean: list[float], std: list[float],
) -> dict[str, Any]:  # fmt: skip
    run_dir = Path(best["run_dir"])
    model, _ = _model(task, config, data, inputs=inputs, mean=mean, std=std)
    ckpt.load_best(run_dir, model)
    model.to(device)
    val = task.evaluate(model, data, split="val", device=device, out_dir=run_dir)
    test = drop = None
    if data.test is not None:
        test = task.evaluate(model, data, split="test", device=device, out_dir=run_dir)
        # pycocotools' -1 means "no ground truth in that range": no drop to report there
        drop = {k: val[k] - test[k] for k in val.keys() & test.keys() if min(val[k], test[k]) >= 0}
    out = Path(config.out)
    if rank() == 0:
        copy_file(run_dir / ckpt.BEST, out / ckpt.BEST)
        crash_point("finetune-best-copy")
    files = {p.name: p.as_posix() for p in sorted(run_dir.glob("predictions*.json"))}
    return dict(
        task=task.name, backbone=config.backbone, mode=config.mode, primary=task.primary,
        best_lr=best["lr"],
        best_epoch=best["best_epoch"], val=val, test=test, drop=drop, info=data.info,
        out=out.as_posix(), files={**files, "best": (out / ckpt.BEST).as_posix()},
    )  # fmt: skip


def _rows(
    task: FinetuneTask, config: FinetuneConfig, summary: FinetuneSummary,
    identity: dict[str, Any], data: TaskData,
) -> list[dict[str, Any]]:  # fmt: skip
    train_rows, val_rows = len(data.train), len(data.val)
    base = {
        "run_id": uuid.uuid4().hex[:12], "stage": "finetune", "dataset": summary.dataset,
        "backbone": summary.slug, "feature_key": stable_hash(identity["backbone_identity"]),
        "method": task.name, "seed": config.seed, "config_hash": config_hash(config),
        "versions": library_versions(), "time": utc_now(), "train_rows": train_rows,
        "val_rows": val_rows, "task": "", "split_rule": data.info.get("split_rule", ""),
        **_row_config(config, identity),
    }  # fmt: skip
    per_epoch = _epoch_protocol(config, train_rows)
    sweep = (
        f"trained on train ({train_rows} rows) for {config.epochs} epochs{per_epoch} at each "
        f"lr of {', '.join(f'{lr:g}' for lr in config.lrs)}; lr and epoch chosen by val "
        f"{task.primary} ({val_rows} rows)"
    )
    rows = []
    for run in summary.runs:
        setting = f"{config.mode} lr={run['lr']:g}"
        protocol = f"trained on train for {config.epochs} epochs{per_epoch}; epoch chosen by val"
        rows += _metric_rows(base, run["val"], split="val", setting=setting, protocol=protocol)
    chosen = f"{sweep}; scored once with the chosen model"
    ranked = {**base, "task": f"finetune-{task.name}"}  # the report ranks test, else val
    val_base = base if summary.test is not None else ranked
    rows += _metric_rows(val_base, summary.val, split="val", setting=config.mode, protocol=chosen)
    if summary.test is not None:
        rows += _metric_rows(
            ranked, summary.test, split="test", setting=config.mode, protocol=chosen
        )
        drop = {f"drop_{k}": v for k, v in (summary.drop or {}).items()}
        rows += _metric_rows(
            base, drop, split="test", setting=config.mode, protocol=f"val − test; {chosen}"
        )
    return rows


def _row_config(config: FinetuneConfig, identity: dict[str, Any]) -> dict[str, str]:
    """The rows' ``config`` (the run's identity without seed, data and backbone label, with
    the lr sweep) and ``dataset_fingerprint`` (a hash of the data's locations: the data
    itself is not fingerprinted here)."""
    data = ("train", "val", "test", "images")
    options = {k: v for k, v in identity.items() if k not in ("seed", "backbone", *data)}
    columns = config_columns(None, stage="finetune", lrs=list(config.lrs), **options)
    where = [identity.get(k) for k in data]
    return {**columns, "dataset_fingerprint": "paths-" + stable_hash(where, length=16)}


def _epoch_protocol(config: FinetuneConfig, train_rows: int) -> str:
    """`` (40 of 45 images per epoch: full batches of 8, a new draw each epoch)``, or ``""``
    when every epoch sees every training image."""
    seen = epoch_images(
        train_rows, batch_size=config.batch_size, steps_per_epoch=config.steps_per_epoch,
        world=_world_size(),
    )  # fmt: skip
    if seen >= train_rows:
        return ""
    return (
        f" ({seen} of {train_rows} images per epoch: full batches of {config.batch_size}, "
        "a new draw each epoch)"
    )


def _metric_rows(
    base: dict[str, Any], metrics: dict[str, float], *, split: str, setting: str, protocol: str
) -> list[dict[str, Any]]:
    return [
        {
            **base,
            "split": split,
            "setting": setting,
            "metric": k,
            "value": float(v),
            "protocol": protocol,
        }
        for k, v in metrics.items()
        if isinstance(v, (int, float))
    ]


def _world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))
