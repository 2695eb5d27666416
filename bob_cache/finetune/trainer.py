"""The training loop shared by every fine-tuning task: epochs of AdamW updates with gradient
accumulation and autocast, a validation pass after each epoch, the best weights kept, and a
checkpoint that ``--resume`` continues exactly.

Exact resumption: every epoch reseeds torch, numpy and Python from (seed, epoch) and draws its
order from a generator seeded the same way, so the epoch after a restart is the epoch an
uninterrupted run would have had. Under ``torchrun`` the model is wrapped in
DistributedDataParallel, each rank reads its own part of every epoch, and rank 0 alone
validates and writes.

An epoch trains on full batches only: the last partial batch of its shuffled order is left
out (a new draw each epoch), as torchvision's detection reference does (its grouped sampler
yields ``len(dataset) // batch_size`` full batches) and timm's and MAE's training loaders do
(``drop_last``); a BatchNorm in training mode cannot take a one-image batch of a 1 × 1 map.
:func:`epoch_images` gives the count, each epoch's log record states it, and so do the
results rows.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler

from bob_cache.data.images import loader_context
from bob_cache.device import autocast
from bob_cache.errors import FinetuneError
from bob_cache.finetune import checkpoint as ckpt
from bob_cache.finetune.launch import is_distributed, rank
from bob_cache.finetune.optim import create_optimizer, create_scheduler, resolve_layer_decay
from bob_cache.progress import progress_bar
from bob_cache.stores.atomic import crash_point

if TYPE_CHECKING:
    from bob_cache.finetune.tasks import FinetuneTask, TaskData

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainSettings:
    """One run of the sweep: its learning rate and the loop's settings."""

    lr: float
    epochs: int
    batch_size: int
    accum_steps: int = 1
    weight_decay: float = 0.05
    layer_decay: float | None = None  # None: 0.75 for transformers, off otherwise
    warmup_epochs: float = 1.0
    seed: int = 0
    workers: int = 0
    precision: str = "fp32"
    steps_per_epoch: int | None = None  # cap on batches per epoch (quick runs, benchmarks)


@dataclass
class FitResult:
    best_epoch: int
    best: dict[str, float]
    history: list[dict[str, Any]]
    seconds: float
    images_per_second: float


def seed_everything(seed: int, epoch: int) -> torch.Generator:
    """Reseed every random source for ``epoch``; the generator draws the epoch's order."""
    value = seed * 100_003 + epoch
    torch.manual_seed(value)
    np.random.seed(value % 2**32)
    random.seed(value)
    return torch.Generator().manual_seed(value)


def epoch_batches(
    n_images: int, *, batch_size: int, steps_per_epoch: int | None = None, world: int = 1
) -> int:
    """Batches each rank trains on per epoch: full batches only (one partial batch when the
    whole set is smaller than a batch), capped by ``steps_per_epoch``."""
    batches = max((n_images // batch_size or 1) // world, 1)
    return batches if steps_per_epoch is None else min(batches, steps_per_epoch)


def epoch_images(
    n_images: int, *, batch_size: int, steps_per_epoch: int | None = None, world: int = 1
) -> int:
    """Training images seen per epoch (all ranks): 40 of 45 at batch size 8."""
    batches = epoch_batches(
        n_images, batch_size=batch_size, steps_per_epoch=steps_per_epoch, world=world
    )
    return min(batches * batch_size * world, n_images)


def make_loader(
    dataset: Dataset, settings: TrainSettings, *, epoch: int, collate: Callable[..., Any]
) -> DataLoader:
    """The epoch's shuffled loader (a DistributedSampler's part under torchrun)."""
    generator = seed_everything(settings.seed, epoch)
    if is_distributed():
        from torch.utils.data.distributed import DistributedSampler

        sampler: Any = DistributedSampler(dataset, shuffle=True, seed=settings.seed)
        sampler.set_epoch(epoch)
    else:
        sampler = RandomSampler(dataset, generator=generator)
    return DataLoader(
        dataset,
        batch_size=settings.batch_size,
        sampler=sampler,
        num_workers=settings.workers,
        collate_fn=collate,
        generator=generator,
        drop_last=len(dataset) > settings.batch_size,
        persistent_workers=False,
        multiprocessing_context=loader_context(settings.workers),
    )


class Fitter:
    """Runs one learning rate's training in ``run_dir``."""

    def __init__(
        self,
        task: FinetuneTask,
        model: nn.Module,
        *,
        backbone: nn.Module,
        data: TaskData,
        settings: TrainSettings,
        device: torch.device,
        run_dir: Path,
        quiet: bool = True,
    ) -> None:
        self.task, self.data, self.settings = task, data, settings
        self.device, self.run_dir, self.quiet = device, run_dir, quiet
        self.model = model.to(device)
        self.net = _wrap_distributed(self.model, device, find_unused=task.pyramid)
        decay = resolve_layer_decay(backbone, settings.layer_decay)
        self.optimizer = create_optimizer(
            self.model, backbone, lr=settings.lr, weight_decay=settings.weight_decay,
            layer_decay=decay,
        )  # fmt: skip
        steps = self.updates_per_epoch()
        self.scheduler = create_scheduler(
            self.optimizer,
            total_steps=steps * settings.epochs,
            warmup_steps=round(settings.warmup_epochs * steps),
        )
        fp16 = settings.precision == "fp16" and device.type == "cuda"
        self.scaler = torch.amp.GradScaler(device.type, enabled=fp16)

    def updates_per_epoch(self) -> int:
        s = self.settings
        batches = epoch_batches(
            len(self.data.train), batch_size=s.batch_size, steps_per_epoch=s.steps_per_epoch,
            world=_world(),
        )  # fmt: skip
        return math.ceil(batches / s.accum_steps)

    def images_per_epoch(self) -> int:
        """Training images each epoch trains on (the last partial batch left out)."""
        s = self.settings
        return epoch_images(
            len(self.data.train), batch_size=s.batch_size, steps_per_epoch=s.steps_per_epoch,
            world=_world(),
        )  # fmt: skip

    def fit(self, state: dict[str, Any] | None) -> FitResult:
        """Train from ``state`` (a checkpoint) or from the start; validate after each epoch."""
        start, updates, best, history = 0, 0, None, []
        if state is not None:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.scaler.load_state_dict(state["scaler"])
            start, updates = state["epoch"], state["updates"]
            best, history = state["best"], state["history"]
            self.scheduler.step_update(updates)
            if rank() == 0:  # a kill after the checkpoint, before the log: the log catches up
                ckpt.write_log(self.run_dir, history)
        total, per_epoch = len(self.data.train), self.images_per_epoch()
        if per_epoch < total and rank() == 0:
            logger.info(
                "Each epoch trains on %d of the %d training images: full batches of %d, the "
                "rest of the shuffled order (%d) left out, a new draw each epoch.",
                per_epoch, total, self.settings.batch_size, total - per_epoch,
            )  # fmt: skip
        started, images = time.perf_counter(), 0
        for epoch in range(start, self.settings.epochs):
            record, seen, updates = self._epoch(epoch, updates)
            images += seen
            if rank() == 0:
                best = self._end_epoch(record, best, history, updates)
        seconds = time.perf_counter() - started
        if best is None and rank() != 0:  # rank 0 alone validates
            return FitResult(-1, {}, history, seconds, images / seconds if seconds > 0 else 0.0)
        if best is None:
            raise FinetuneError(f"No epoch was run in {self.run_dir}: --epochs must be ≥ 1.")
        return FitResult(
            best_epoch=best["epoch"],
            best=best["metrics"],
            history=history,
            seconds=seconds,
            images_per_second=images / seconds if seconds > 0 else 0.0,
        )

    def _end_epoch(
        self,
        record: dict[str, Any],
        best: dict[str, Any] | None,
        history: list[dict[str, Any]],
        updates: int,
    ) -> dict[str, Any]:
        metrics = self.task.evaluate(self.model, self.data, split="val", device=self.device)
        record["val"] = metrics
        primary = metrics[self.task.primary]
        if best is None or primary > best["metrics"][self.task.primary]:
            best = {"epoch": record["epoch"], "metrics": metrics}
            ckpt.save_best(self.run_dir, self.model)
            crash_point("finetune-best")
        history.append(record)
        state = {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict(),
            "epoch": record["epoch"] + 1,
            "updates": updates,
            "best": best,
            "history": history,
            "settings": asdict(self.settings),
        }
        ckpt.save_checkpoint(self.run_dir, state)
        crash_point("finetune-checkpoint")
        ckpt.write_log(self.run_dir, history)
        crash_point("finetune-log")
        return best

    def _epoch(self, epoch: int, updates: int) -> tuple[dict[str, Any], int, int]:
        s = self.settings
        loader = make_loader(self.data.train, s, epoch=epoch, collate=self.task.collate)
        limit = self.updates_per_epoch() * s.accum_steps
        self.net.train()
        losses: list[float] = []
        seen, started = 0, time.perf_counter()
        bar = progress_bar(
            limit, desc=f"lr {s.lr:g} epoch {epoch + 1}", unit="batch", quiet=self.quiet
        )
        startup = 0.0
        for step, batch in enumerate(loader):
            if step >= limit:
                break
            if step == 0:  # the loader's processes start once per epoch: timed apart
                startup = time.perf_counter() - started
                started = time.perf_counter()
            loss = self._backward(batch)
            losses.append(loss)
            seen += self.task.batch_size(batch)
            if (step + 1) % s.accum_steps == 0 or step + 1 == limit:
                self._update()
                updates += 1
                self.scheduler.step_update(updates)
            bar.update(1)
        bar.close()
        seconds = time.perf_counter() - started
        record = {
            "epoch": epoch,
            "lr": s.lr,
            "train_loss": float(np.mean(losses)) if losses else float("nan"),
            "images": seen,  # on this rank: full batches only
            "train_images": len(self.data.train),
            "seconds": seconds,  # from the first batch's arrival to the last update
            "startup_seconds": startup,  # the loader's start and its first batch
            "images_per_second": seen / seconds if seconds > 0 else 0.0,
        }
        return record, seen, updates

    def _backward(self, batch: Any) -> float:
        try:
            with autocast(self.device, self.settings.precision):
                loss = self.task.loss(self.net, batch, device=self.device)
            value = float(loss.detach())  # the one device sync of a step
            if not math.isfinite(value):
                raise FinetuneError(
                    f"The training loss became {value} at lr {self.settings.lr:g}. Fix: "
                    "lower --lr, or raise --warmup-epochs."
                )
            self.scaler.scale(loss / self.settings.accum_steps).backward()
        except torch.OutOfMemoryError as exc:
            raise FinetuneError(
                f"Out of memory on {self.device} at --batch-size {self.settings.batch_size}. "
                "Fix: lower --batch-size (and raise --accum-steps to keep the effective batch), "
                "or lower --image-size."
            ) from exc
        return value

    def _update(self) -> None:
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.optimizer.zero_grad(set_to_none=True)


def _world() -> int:
    return torch.distributed.get_world_size() if is_distributed() else 1


def _wrap_distributed(model: nn.Module, device: torch.device, *, find_unused: bool) -> nn.Module:
    """DDP under torchrun; detectors skip some heads in some steps (``find_unused``)."""
    if not is_distributed():
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [device.index] if device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids, find_unused_parameters=find_unused)
