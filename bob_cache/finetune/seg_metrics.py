"""Semantic segmentation metrics from a confusion matrix (numpy ``bincount``).

Rows of the confusion matrix are true classes, columns predicted classes (scikit-learn's
convention). Pixels whose target is the ignore index are left out. Per-class IoU is
``TP / (TP + FP + FN)``; a class absent from both target and prediction has NaN IoU and is left
out of ``mIoU``, as mmsegmentation does.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from bob_cache.errors import AnnotationError, SpecError


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def confusion_matrix(pred: Any, target: Any, *, num_classes: int, ignore_index: int) -> np.ndarray:
    """``num_classes x num_classes`` int64 counts (rows target, columns prediction).

    Args:
        pred: predicted labels (array or tensor), any shape.
        target: true labels of the same shape; ``ignore_index`` pixels are skipped.
        num_classes: classes including background.
        ignore_index: target value to skip.
    """
    pred, target = _numpy(pred), _numpy(target)
    if pred.shape != target.shape:
        raise SpecError(
            f"Prediction shape {pred.shape} differs from target shape {target.shape}; expected "
            "one label per target pixel. Upsample logits to the mask size before argmax."
        )
    keep = target != ignore_index
    pred, target = pred[keep].astype(np.int64), target[keep].astype(np.int64)
    bad_target = np.unique(target[(target < 0) | (target >= num_classes)])
    if bad_target.size:
        raise AnnotationError(
            f"Target values {bad_target[:10].tolist()} are outside 0..{num_classes - 1} and are "
            f"not the ignore index {ignore_index}. Fix the masks or the class list."
        )
    bad_pred = np.unique(pred[(pred < 0) | (pred >= num_classes)])
    if bad_pred.size:
        raise SpecError(
            f"Predicted values {bad_pred[:10].tolist()} are outside 0..{num_classes - 1}. "
            "Build the head with num_classes outputs (background included)."
        )
    counts = np.bincount(target * num_classes + pred, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


class SegMeter:
    """Accumulate a confusion matrix over batches and compute IoU and accuracies.

    Args:
        num_classes: classes including background.
        ignore_index: target value to skip.
        class_names: names keying ``per_class_iou``; default the class indices.
    """

    def __init__(
        self,
        num_classes: int,
        *,
        ignore_index: int = 255,
        class_names: Sequence[str] | None = None,
    ) -> None:
        if num_classes < 1 or (class_names is not None and len(class_names) != num_classes):
            n_names = "no" if class_names is None else len(class_names)
            raise SpecError(
                f"SegMeter needs num_classes >= 1 and one name per class; got {num_classes} "
                f"classes and {n_names} names. Include background in both."
            )
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names is not None else None
        self.confusion = np.zeros((num_classes, num_classes), dtype=np.int64)

    def reset(self) -> None:
        """Forget every update."""
        self.confusion[:] = 0

    def update(self, pred: Any, target: Any) -> None:
        """Add a batch of predicted and true labels (same shape)."""
        self.confusion += confusion_matrix(
            pred, target, num_classes=self.num_classes, ignore_index=self.ignore_index
        )

    def compute(self) -> dict[str, Any]:
        """``mIoU``, ``pixel_accuracy``, ``mean_accuracy`` and ``per_class_iou``.

        ``mIoU`` averages classes with a non-empty union; ``mean_accuracy`` averages the recall
        of classes present in the targets; both are NaN before any counted pixel.
        """
        cm = self.confusion.astype(np.float64)
        tp = np.diag(cm)
        true_count, pred_count = cm.sum(axis=1), cm.sum(axis=0)
        union = true_count + pred_count - tp
        with np.errstate(divide="ignore", invalid="ignore"):
            iou = np.where(union > 0, tp / union, np.nan)
            recall = np.where(true_count > 0, tp / true_count, np.nan)
        total = cm.sum()
        keys = self.class_names or list(range(self.num_classes))
        return {
            "mIoU": _nanmean(iou),
            "pixel_accuracy": float(tp.sum() / total) if total else float("nan"),
            "mean_accuracy": _nanmean(recall),
            "per_class_iou": {k: float(v) for k, v in zip(keys, iou, strict=True)},
        }


def _nanmean(values: np.ndarray) -> float:
    finite = values[~np.isnan(values)]
    return float(finite.mean()) if finite.size else float("nan")
