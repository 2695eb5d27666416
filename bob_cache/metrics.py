"""Classification metrics, computed with scikit-learn's metric functions.

Single-label: top-1, top-5 (when there are more than 5 classes), balanced accuracy and
macro-F1 from a score matrix. Multi-label (labels with several 0/1 columns, -1 = unknown):
macro ROC-AUC and mean average precision over the columns whose known rows hold both
outcomes, and ``labels_scored``, the number of such columns.
"""

from __future__ import annotations

import numpy as np
from sklearn import metrics as skm

from bob_cache.errors import DataSourceError


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
    """Macro ROC-AUC and mAP over the label columns that can be scored, and how many could.

    Each column is scored on its known rows (1 or 0; -1 is unknown). A column whose known rows
    hold only one outcome, or none at all, has no ROC-AUC or AP: it is left out of both means,
    and ``labels_scored`` counts the columns that were averaged.

    Raises:
        DataSourceError: when no column can be scored.
    """
    aucs, aps = [], []
    for j in range(y_true.shape[1]):
        known = y_true[:, j] >= 0
        truth = y_true[known, j]
        if np.unique(truth).size < 2:  # no known rows, or one outcome only: undefined
            continue
        aucs.append(skm.roc_auc_score(truth, scores[known, j]))
        aps.append(skm.average_precision_score(truth, scores[known, j]))
    if not aucs:
        raise _nothing_to_score(y_true)
    return {
        "roc_auc": float(np.mean(aucs)),
        "mean_average_precision": float(np.mean(aps)),
        "labels_scored": float(len(aucs)),
    }


def _nothing_to_score(y_true: np.ndarray) -> DataSourceError:
    n, labels = y_true.shape
    return DataSourceError(
        f"No label column can be scored: ROC-AUC and AP need both a 1 and a 0 among a label's "
        f"known rows, and none of the {labels} label(s) has both in these {n} row(s). Score "
        "more labelled rows: label both outcomes for some label in this split, or, when these "
        "are the validation rows that choose C, hold out more of train (--val-fraction)."
    )


def _balanced_accuracy(y_true: np.ndarray, predicted: np.ndarray) -> float:
    import warnings

    with warnings.catch_warnings():  # classes absent from y_pred are expected on hard data
        warnings.simplefilter("ignore", category=UserWarning)
        return skm.balanced_accuracy_score(y_true, predicted)
