"""Classification: the backbone and a new linear head trained end to end on any data source
the extraction stage reads, with timm's training augmentation; scored like the probe
(top-1, top-5, balanced accuracy, macro-F1 from scikit-learn)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset

from bob_cache.data.source import DataSource, Sample, parse_source
from bob_cache.errors import DataSourceError
from bob_cache.finetune.models import Classifier, Normalized
from bob_cache.finetune.tasks import FinetuneTask, TaskData, TaskInputs, register_finetune_task
from bob_cache.metrics import classification_metrics


class LabeledImages(Dataset):
    """``(uint8 CHW tensor, label)`` rows of one split through a PIL transform."""

    def __init__(self, source: DataSource, samples: list[Sample], transform: Any) -> None:
        self.source, self.samples, self.transform = source, samples, transform

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        sample = self.samples[index]
        image: Image.Image = self.source.open_image(sample)
        return self.transform(image), sample.label


def pick_split(source: DataSource, preferred: str, *, option: str) -> list[Sample]:
    """``preferred`` split of ``source``, or its only split; labelled rows only."""
    if preferred in source.splits:
        rows = source.splits[preferred]
    elif len(source.splits) == 1:
        rows = next(iter(source.splits.values()))
    else:
        raise DataSourceError(
            f"--{option} {source.origin} has splits {', '.join(source.splits)} but no "
            f"'{preferred}' split. Fix: point --{option} at a folder or manifest holding one "
            "split, or name its split folder 'train', 'val' or 'test'."
        )
    rows = [s for s in rows if s.label >= 0]
    if not rows:
        raise DataSourceError(f"--{option} {source.origin} has no labelled images.")
    return rows


def relabel(
    rows: list[Sample], source: DataSource, classes: list[str], *, option: str
) -> list[Sample]:
    """Map ``source``'s labels onto ``classes`` by class name."""
    if source.class_names == classes or not source.class_names:
        return rows
    index = {name: i for i, name in enumerate(classes)}
    unknown = sorted({source.class_names[s.label] for s in rows} - index.keys())
    if unknown:
        raise DataSourceError(
            f"--{option} {source.origin} has classes the training data lacks: "
            f"{', '.join(unknown[:5])}. Fix: use data with the training classes."
        )
    return [Sample(s.id, index[source.class_names[s.label]], s.location) for s in rows]


@register_finetune_task
class ClassificationTask(FinetuneTask):
    name = "classification"
    primary = "top1"
    pyramid = False
    description = "backbone + linear head, end to end; top-1/top-5"
    expects = "a folder of images (class sub-folders), a .csv/.jsonl manifest or builtin:digits"

    def load(self, inputs: TaskInputs, *, mean: list[float], std: list[float]) -> TaskData:
        from timm.data import create_transform

        size = (3, inputs.image_size, inputs.image_size)
        common = dict(input_size=size, mean=mean, std=std, use_prefetcher=True)
        train_tf = create_transform(**common, is_training=True)
        eval_tf = create_transform(**common, is_training=False, crop_pct=1.0)
        train_src = parse_source(inputs.train, fractions=inputs.fractions_for(inputs.train))
        classes = list(train_src.class_names)
        train_rows = pick_split(train_src, "train", option="train")
        if not classes:
            classes = [str(i) for i in range(max(s.label for s in train_rows) + 1)]
        data = TaskData(LabeledImages(train_src, train_rows, train_tf), None, None, classes)  # type: ignore[arg-type]
        for split in ("val", "test"):
            spec = getattr(inputs, split)
            if spec is None:
                continue
            src = (
                train_src
                if spec == inputs.train
                else parse_source(spec, fractions=inputs.fractions_for(spec))
            )
            rows = relabel(pick_split(src, split, option=split), src, classes, option=split)
            setattr(data, split, LabeledImages(src, rows, eval_tf))
        sizes = {f"{k}_rows": len(getattr(data, k)) for k in ("train", "val", "test")
                 if getattr(data, k) is not None}  # fmt: skip
        data.info = {"dataset": train_src.name, "split_rule": train_src.split_rule.text, **sizes}
        return data

    def build(
        self, net: nn.Module, data: TaskData, *, name: str, frozen: bool, inputs: TaskInputs,
        mean: list[float], std: list[float],
    ) -> nn.Module:  # fmt: skip
        model = Classifier(net, num_classes=len(data.classes), frozen=frozen)
        return Normalized(model, mean, std)

    def collate(self, batch: list[Any]) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.stack([b[0] for b in batch])
        return images, torch.tensor([b[1] for b in batch])

    def loss(self, model: nn.Module, batch: Any, *, device: torch.device) -> torch.Tensor:
        images, labels = batch
        logits = model(images.to(device, non_blocking=True))
        return F.cross_entropy(logits.float(), labels.to(device))

    @torch.no_grad()
    def evaluate(
        self, model: nn.Module, data: TaskData, *, split: str, device: torch.device,
        out_dir: Path | None = None, batch_size: int = 64,
    ) -> dict[str, float]:  # fmt: skip
        model.eval()
        loader = DataLoader(data.split(split), batch_size=batch_size, collate_fn=self.collate)
        scores, labels = [], []
        for images, y in loader:
            scores.append(model(images.to(device)).float().cpu())
            labels.append(y)
        logits = torch.cat(scores).numpy().astype(np.float64)
        return classification_metrics(
            torch.cat(labels).numpy(), logits, n_classes=len(data.classes)
        )
