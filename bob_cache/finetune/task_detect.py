"""Detection (Faster R-CNN) and instance segmentation (Mask R-CNN) on COCO-format data, scored
with pycocotools: box AP (and mask AP), AP50, AP75, AP small/medium/large and the recalls."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from bob_cache.finetune.coco_data import (
    CocoDetectionDataset,
    CocoSet,
    collate_detection,
    horizontal_flip,
    load_coco,
)
from bob_cache.finetune.coco_eval import evaluate_coco, results_for, to_coco_results, write_results
from bob_cache.finetune.models import create_detector
from bob_cache.finetune.pyramid import PyramidBody
from bob_cache.finetune.tasks import FinetuneTask, TaskData, TaskInputs, register_finetune_task


def random_flip(image: torch.Tensor, target: dict[str, Any]) -> tuple[torch.Tensor, dict[str, Any]]:
    """Training augmentation: a left-right flip with probability 0.5 (torch's seeded RNG)."""
    if torch.rand(()) < 0.5:
        return horizontal_flip(image, target)
    return image, target


def dataset_name(path: str) -> str:
    """``shapes/train.json`` → ``shapes``: a COCO set is named by the folder holding it."""
    folder = Path(path).resolve().parent
    return folder.name or Path(path).stem


@register_finetune_task
class DetectionTask(FinetuneTask):
    name = "detection"
    primary = "bbox_AP"
    masks = False
    description = "Faster R-CNN + FPN over the backbone; COCO box AP"
    expects = "a COCO instances json (e.g. instances_train2017.json)"
    inputs_are_files = True

    @property
    def iou_types(self) -> tuple[str, ...]:
        return ("bbox", "segm") if self.masks else ("bbox",)

    def load(self, inputs: TaskInputs, *, mean: list[float], std: list[float]) -> TaskData:
        sets = {
            split: load_coco(spec, images=inputs.images, masks=self.masks)
            for split, spec in (("train", inputs.train), ("val", inputs.val), ("test", inputs.test))
            if spec is not None
        }
        for split, cs in sets.items():
            _check_categories(sets["train"], cs, split)
        data = TaskData(
            train=CocoDetectionDataset(sets["train"], transform=random_flip),
            val=CocoDetectionDataset(sets["val"]),
            test=CocoDetectionDataset(sets["test"]) if "test" in sets else None,
            classes=list(sets["train"].categories),
            sources=sets,
        )
        data.info = {
            "dataset": dataset_name(inputs.train),
            **{f"{s}_images": len(cs) for s, cs in sets.items()},
            **{
                f"{s}_dropped": dict(cs.dropped)
                for s, cs in sets.items()
                if sum(cs.dropped.values())
            },
        }
        return data

    def build(
        self, net: nn.Module, data: TaskData, *, name: str, frozen: bool, inputs: TaskInputs,
        mean: list[float], std: list[float],
    ) -> nn.Module:  # fmt: skip
        body = PyramidBody(net, name=name, frozen=frozen)
        return create_detector(
            body, num_classes=len(data.classes) + 1, masks=self.masks,
            image_size=inputs.image_size, mean=mean, std=std,
        )  # fmt: skip

    def collate(self, batch: list[Any]) -> Any:
        return collate_detection(batch)

    def loss(self, model: nn.Module, batch: Any, *, device: torch.device) -> torch.Tensor:
        images, targets = batch
        images = [im.to(device, non_blocking=True).float().div_(255) for im in images]
        targets = [{k: _to(v, device) for k, v in t.items()} for t in targets]
        losses = model(images, targets)
        return sum(v.float() for v in losses.values())

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, data: TaskData, *, split: str, device: torch.device,
        out_dir: Path | None = None, batch_size: int = 4,
    ) -> dict[str, float]:  # fmt: skip
        model.eval()
        dataset = data.split(split)
        cocoset: CocoSet = data.sources[split]
        loader = DataLoader(dataset, batch_size=batch_size, collate_fn=self.collate)
        results: list[dict[str, Any]] = []
        for images, targets in loader:
            outputs = model([im.to(device).float().div_(255) for im in images])
            outputs = [{k: v.float().cpu() for k, v in o.items()} for o in outputs]
            ids = [t["image_id"] for t in targets]
            results += to_coco_results(
                outputs, image_ids=ids, label_to_cat=cocoset.label_to_cat, masks=self.masks
            )
        if out_dir is not None:
            for iou_type in self.iou_types:
                path = out_dir / f"predictions_{split}_{iou_type}.json"
                write_results(path, results_for(results, iou_type))
        return evaluate_coco(cocoset.coco, results, iou_types=self.iou_types)


@register_finetune_task
class InstanceTask(DetectionTask):
    name = "instance"
    primary = "segm_AP"
    masks = True
    description = "Mask R-CNN + FPN over the backbone; COCO box and mask AP"


def _check_categories(train: CocoSet, other: CocoSet, split: str) -> None:
    from bob_cache.errors import AnnotationError

    if other.label_to_cat != train.label_to_cat or other.categories != train.categories:
        raise AnnotationError(
            f"The {split} COCO file's categories ({', '.join(other.categories)}) differ from "
            f"train's ({', '.join(train.categories)}). Fix: give both files the same "
            "categories (ids and names); a category with no annotation may stay listed."
        )


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device, non_blocking=True) if isinstance(value, torch.Tensor) else value
