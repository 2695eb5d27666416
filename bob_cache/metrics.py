"""Classification metrics, computed with scikit-learn's metric functions.

Single-label: top-1, top-5 (when there are more than 5 classes), balanced accuracy and
macro-F1 from a score matrix. Multi-label (labels with several 0/1 columns, -1 = unknown):
macro ROC-AUC and mean average precision over the columns that have both outcomes.
"""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm


def classification_metrics(
    y_true: np.ndarray, scores: np.ndarray, *, n_classes: int
) -> dict[str, float]:
    """Metrics of one prediction; ``scores`` is ``(n, n_classes)``, larger is more likely."""
    labels = np.arange(n_classes)
    predicted = scores.argmax(axis=1)
    out = {
        "top1": float(skm.accuracy_score(y_true, predicted)),
        "balanced_accuracy": float(_balanced_accuracy(y_true, predicted)),
        "macro_f1": float(
            skm.f1_score(
                y_true, predicted, labels=np.unique(y_true), average="macro", zero_division=0
            )
        ),
    }
    if n_classes > 5:
        out["top5"] = float(skm.top_k_accuracy_score(y_true, scores, k=5, labels=labels))
    return out


def multilabel_metrics(y_true: np.ndarray, scores: np.ndarray) -> dict[str, float]:
    """Macro ROC-AUC and mAP over label columns; unknown (-1) entries are ignored per column."""
    aucs, aps = [], []
    for j in range(y_true.shape[1]):
        known = y_true[:, j] >= 0
        truth = y_true[known, j]
        if truth.min(initial=1) == truth.max(initial=0):  # one outcome only: undefined
            continue
        aucs.append(skm.roc_auc_score(truth, scores[known, j]))
        aps.append(skm.average_precision_score(truth, scores[known, j]))
    if not aucs:
        return {}
    return {
        "roc_auc": float(np.mean(aucs)),
        "mean_average_precision": float(np.mean(aps)),
        "labels_scored": float(len(aucs)),
    }


def _balanced_accuracy(y_true: np.ndarray, predicted: np.ndarray) -> float:
    import warnings

    with warnings.catch_warnings():  # classes absent from y_pred are expected on hard data
        warnings.simplefilter("ignore", category=UserWarning)
        return skm.balanced_accuracy_score(y_true, predicted)
