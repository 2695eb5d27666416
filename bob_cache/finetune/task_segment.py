"""Semantic segmentation on image + PNG mask folders (ADE20K style, with an ignore index):
an FPN semantic head over the backbone; mIoU, pixel accuracy, mean accuracy and per-class IoU
over the masks at their own resolution."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader

from bob_cache.finetune.coco_data import resize_image
from bob_cache.finetune.models import Normalized, SemanticFPN
from bob_cache.finetune.pyramid import PyramidBody
from bob_cache.finetune.seg_data import (
    SegDataset,
    SegSet,
    check_masks,
    horizontal_flip_seg,
    load_seg_folder,
    resize_seg_pair,
    split_seg_set,
)
from bob_cache.finetune.seg_metrics import SegMeter
from bob_cache.finetune.tasks import FinetuneTask, TaskData, TaskInputs, register_finetune_task


class _TrainPair:
    """Resize to the training size, a left-right flip with probability 0.5, and ignored
    pixels marked -100 (cross-entropy's ignore value)."""

    def __init__(self, size: int, ignore_index: int) -> None:
        self.size, self.ignore_index = size, ignore_index

    def __call__(
        self, image: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        image, mask = resize_seg_pair(image, mask, self.size)
        mask = mask.masked_fill(mask == self.ignore_index, -100)
        return horizontal_flip_seg(image, mask) if torch.rand(()) < 0.5 else (image, mask)


class _EvalPair:
    """Resize the image only: predictions are scored against the mask as stored."""

    def __init__(self, size: int) -> None:
        self.size = size

    def __call__(
        self, image: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return resize_image(image, self.size), mask


def dataset_name(path: str) -> str:
    """``shapes/train`` → ``shapes``; a folder not named after a split keeps its own name;
    ``ade20k:ROOT/train`` → ``ade20k`` (the name extraction gives that source)."""
    from bob_cache.data.ade20k import PREFIX

    if path.startswith(PREFIX):
        return PREFIX.rstrip(":")
    folder = Path(path).resolve()
    return folder.parent.name if folder.name in ("train", "val", "test") else folder.name


def _split_rule(inputs: TaskInputs) -> str:
    """``id-hash …`` when one folder serves several roles, else the folders as given."""
    if inputs.roles_of(inputs.train) > 1:
        return f"id-hash {inputs.fractions_for(inputs.train)}"
    return "as distributed"


@register_finetune_task
class SemanticTask(FinetuneTask):
    name = "semantic"
    primary = "mIoU"
    description = "FPN semantic head over the backbone; mIoU"
    expects = "a folder with images/ and masks/ sub-folders"

    def load(self, inputs: TaskInputs, *, mean: list[float], std: list[float]) -> TaskData:
        specs = {"train": inputs.train, "val": inputs.val, "test": inputs.test}
        sets: dict[str, SegSet] = {}
        for split, spec in specs.items():
            if spec is None:
                continue
            sets[split] = load_seg_folder(
                spec, classes=inputs.classes, ignore_index=inputs.ignore_index
            )
            if inputs.roles_of(spec) > 1:  # one folder for several roles: split by id hash
                sets[split] = split_seg_set(sets[split], split, inputs.fractions_for(spec))
            check_masks(sets[split])
        _check_classes(sets)
        size = inputs.image_size
        data = TaskData(
            train=SegDataset(sets["train"], transform=_TrainPair(size, sets["train"].ignore_index),
                             check_values=False),
            val=SegDataset(sets["val"], transform=_EvalPair(size), check_values=False),
            test=SegDataset(sets["test"], transform=_EvalPair(size), check_values=False)
            if "test" in sets else None,  # every mask was checked once above
            classes=list(sets["train"].classes),
            sources=sets,
        )  # fmt: skip
        data.info = {
            "dataset": dataset_name(inputs.train),
            "ignore_index": sets["train"].ignore_index,
            "split_rule": _split_rule(inputs),
            **{f"{s}_images": len(v) for s, v in sets.items()},
        }
        return data

    def build(
        self, net: nn.Module, data: TaskData, *, name: str, frozen: bool, inputs: TaskInputs,
        mean: list[float], std: list[float],
    ) -> nn.Module:  # fmt: skip
        body = PyramidBody(net, name=name, frozen=frozen)
        return Normalized(SemanticFPN(body, num_classes=len(data.classes)), mean, std)

    def collate(self, batch: list[Any]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        return torch.stack([b[0] for b in batch]), [b[1] for b in batch]

    def loss(self, model: nn.Module, batch: Any, *, device: torch.device) -> torch.Tensor:
        images, masks = batch
        logits = model(images.to(device, non_blocking=True))
        target = torch.stack(masks).to(device)
        return F.cross_entropy(logits.float(), target, ignore_index=-100)

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, data: TaskData, *, split: str, device: torch.device,
        out_dir: Path | None = None, batch_size: int = 8,
    ) -> dict[str, float]:  # fmt: skip
        model.eval()
        segset: SegSet = data.sources[split]
        meter = SegMeter(
            segset.num_classes, ignore_index=segset.ignore_index, class_names=segset.classes
        )
        loader = DataLoader(data.split(split), batch_size=batch_size, collate_fn=self.collate)
        for images, masks in loader:
            logits = model(images.to(device)).float()
            for one, mask in zip(logits, masks, strict=True):
                up = F.interpolate(one[None], size=mask.shape, mode="bilinear", align_corners=False)
                meter.update(up[0].argmax(0).cpu().numpy(), mask.numpy())
        scores = meter.compute()
        per_class = {
            f"iou_{name}": v for name, v in scores.pop("per_class_iou").items() if not math.isnan(v)
        }
        return {**scores, **per_class}


def _check_classes(sets: dict[str, SegSet]) -> None:
    from bob_cache.errors import AnnotationError

    train = sets["train"]
    for split, other in sets.items():
        if other.classes != train.classes:
            raise AnnotationError(
                f"The {split} folder's classes ({', '.join(other.classes)}) differ from train's "
                f"({', '.join(train.classes)}). Fix: give both the same classes.json or --classes."
            )
