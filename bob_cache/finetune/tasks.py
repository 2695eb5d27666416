"""The fine-tuning task registry: each task (classification, detection, instance, semantic)
says how to read its data, which network to build over the backbone, its training loss, and
how it is scored. The stage and the trainer only look tasks up."""

from __future__ import annotations

import importlib
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from torch import nn
from torch.utils.data import Dataset

from bob_cache.errors import DataNotFoundError, SpecError, did_you_mean
from bob_cache.registry import Registry

MODES = ("finetune", "frozen", "random-init")


@dataclass(frozen=True)
class TaskInputs:
    """Where a task's data is and how to read it (from the command's options)."""

    train: str
    val: str
    test: str | None = None
    images: str | None = None  # COCO image folder when not beside the json
    classes: tuple[str, ...] | None = None  # semantic: class names when no classes.json
    ignore_index: int = 255
    image_size: int = 224
    # a source without splits given for several roles is split by id hash with these
    # train/val/test fractions (None: the defaults); one given for one role is taken whole
    split_fractions: tuple[float, float, float] | None = None

    def roles_of(self, spec: str) -> int:
        """How many of train/val/test name ``spec``."""
        return sum(spec == s for s in (self.train, self.val, self.test))

    def fractions_for(self, spec: str) -> Any:
        """The split fractions a source read for ``spec`` gets (see ``split_fractions``)."""
        from bob_cache.data.splits import DEFAULT_FRACTIONS, SplitFractions, parse_split_fractions

        if self.roles_of(spec) > 1:
            return parse_split_fractions(self.split_fractions) or DEFAULT_FRACTIONS
        return SplitFractions(1.0, 0.0, 0.0)  # one role: the whole source


@dataclass
class TaskData:
    """A task's datasets and label space; ``info`` holds what loading found (dropped boxes)."""

    train: Dataset
    val: Dataset
    test: Dataset | None
    classes: list[str]
    info: dict[str, Any] = field(default_factory=dict)
    sources: dict[str, Any] = field(default_factory=dict)  # per split, for scoring

    def split(self, name: str) -> Dataset:
        dataset = {"train": self.train, "val": self.val, "test": self.test}.get(name)
        if dataset is None:
            raise SpecError(f"This run has no {name} data. Pass --{name} SRC.")
        return dataset


class FinetuneTask(ABC):
    """One fine-tuning task."""

    name: ClassVar[str]
    primary: ClassVar[str]  # the validation metric that picks the epoch and the lr
    pyramid: ClassVar[bool] = True  # the network reads the backbone's feature pyramid
    description: ClassVar[str] = ""
    expects: ClassVar[str] = "a folder of images or a manifest"  # what --train/--val/--test name
    inputs_are_files: ClassVar[bool] = False  # True: --train/--val/--test are files, not folders

    def check(self, inputs: TaskInputs) -> None:
        """Check that every local input exists, before any weights are loaded (so that a
        missing file is named, not hidden behind a failed weights download)."""
        for option in ("train", "val", "test", "images"):
            spec = getattr(inputs, option)
            if spec is None or _SCHEME.match(spec):
                continue  # builtin:digits, s3://..., torchvision:...: their loaders check them
            path = Path(spec).expanduser()
            want_file = self.inputs_are_files and option != "images"
            if path.is_file() if want_file else path.exists():
                continue
            found = "a folder" if path.is_dir() else "nothing"
            expected = "a folder of images" if option == "images" else self.expects
            raise DataNotFoundError(
                f"--{option} {spec}: expected {expected}, found {found} at {path.resolve()}. "
                f"Fix: pass the path of an existing {'file' if want_file else 'file or folder'} "
                f"to --{option}."
            )

    @abstractmethod
    def load(self, inputs: TaskInputs, *, mean: list[float], std: list[float]) -> TaskData:
        """Read and check the data."""

    @abstractmethod
    def build(
        self, net: nn.Module, data: TaskData, *, name: str, frozen: bool, inputs: TaskInputs,
        mean: list[float], std: list[float],
    ) -> nn.Module:  # fmt: skip
        """The network to train over ``net`` (a timm model)."""

    @abstractmethod
    def collate(self, batch: list[Any]) -> Any:
        """Batch a list of dataset items."""

    @abstractmethod
    def loss(self, model: nn.Module, batch: Any, *, device: torch.device) -> torch.Tensor:
        """The training loss of one batch."""

    @abstractmethod
    def evaluate(
        self, model: nn.Module, data: TaskData, *, split: str, device: torch.device,
        out_dir: Path | None = None, batch_size: int = 8,
    ) -> dict[str, float]:  # fmt: skip
        """Metrics on ``split`` (with ``out_dir``, also write predictions there)."""

    def batch_size(self, batch: Any) -> int:
        return len(batch[0])


_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")  # builtin:, s3://; not C:\\ (one letter)
TASKS: Registry[FinetuneTask] = Registry("fine-tuning task", error=SpecError)
_TASK_MODULES = ("task_classify", "task_detect", "task_segment")


def register_finetune_task(cls: type[FinetuneTask]) -> type[FinetuneTask]:
    """Class decorator: register a fine-tuning task under its ``name``."""
    TASKS.register(cls.name, cls())
    return cls


def get_task(name: str) -> FinetuneTask:
    """The task called ``name``."""
    for module in _TASK_MODULES:
        importlib.import_module(f"bob_cache.finetune.{module}")
    return TASKS.get(name)


def parse_mode(mode: str) -> str:
    if mode not in MODES:
        raise SpecError(
            f"Unknown --mode '{mode}'.{did_you_mean(mode, MODES)} Expected one of: "
            f"{', '.join(MODES)}."
        )
    return mode


def parse_lrs(text: str) -> tuple[float, ...]:
    """``1e-4,3e-4`` → (0.0001, 0.0003); each must be a positive number."""
    values = []
    for part in (p.strip() for p in text.split(",")):
        try:
            value = float(part)
        except ValueError:
            value = float("nan")
        if not value > 0 or value != value or value == float("inf"):
            raise SpecError(
                f"--lr got '{part}'; expected positive numbers, comma-separated (e.g. 1e-4,3e-4)."
            )
        values.append(value)
    if not values:
        raise SpecError("--lr is empty; expected positive numbers, comma-separated.")
    return tuple(dict.fromkeys(values))
