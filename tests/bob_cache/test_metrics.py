"""Metrics come from scikit-learn and follow the documented rules."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn import metrics as skm

from bob_cache.metrics import classification_metrics, multilabel_metrics


def test_single_label_metrics_match_sklearn() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 10, 200)
    scores = rng.normal(size=(200, 10))
    scores[np.arange(200), y] += 1.0
    m = classification_metrics(y, scores, n_classes=10)
    pred = scores.argmax(1)
    assert m["top1"] == pytest.approx(skm.accuracy_score(y, pred))
    assert m["top5"] == pytest.approx(skm.top_k_accuracy_score(y, scores, k=5))
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))


def test_top5_only_with_more_than_five_classes() -> None:
    y = np.array([0, 1, 2, 3, 4])
    assert "top5" not in classification_metrics(y, np.eye(5), n_classes=5)
    assert classification_metrics(y, np.eye(5), n_classes=5)["top1"] == 1.0


def test_multilabel_auc_ignores_unknown_entries_and_single_outcome_columns() -> None:
    y = np.array([[1, 0, 1], [0, 0, -1], [1, 0, 0], [0, 0, 1]])
    scores = np.array([[0.9, 0.1, 0.8], [0.2, 0.3, 0.9], [0.7, 0.2, 0.1], [0.1, 0.4, 0.7]])
    m = multilabel_metrics(y, scores)
    assert m["labels_scored"] == 2  # column 1 has only negatives
    expected = np.mean(
        [skm.roc_auc_score(y[:, 0], scores[:, 0]), skm.roc_auc_score([1, 0, 1], [0.8, 0.1, 0.7])]
    )
    assert m["roc_auc"] == pytest.approx(expected)


def _per_column_reference(y: np.ndarray, scores: np.ndarray) -> tuple[list, list]:
    """scikit-learn's ROC-AUC and AP per column on its known rows, where both outcomes occur."""
    aucs, aps = [], []
    for j in range(y.shape[1]):
        known = y[:, j] >= 0
        if len(np.unique(y[known, j])) == 2:
            aucs.append(skm.roc_auc_score(y[known, j], scores[known, j]))
            aps.append(skm.average_precision_score(y[known, j], scores[known, j]))
    return aucs, aps


def test_multilabel_columns_without_known_labels_are_left_out_not_a_crash() -> None:
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, size=(60, 5))
    y[rng.random(y.shape) < 0.3] = -1
    y[:, 1] = -1  # entirely unknown (scikit-learn would see 0 samples)
    y[:, 3] = np.where(y[:, 3] >= 0, 1, -1)  # only positives among its known rows
    scores = rng.normal(size=y.shape) + y
    m = multilabel_metrics(y, scores)
    aucs, aps = _per_column_reference(y, scores)
    assert m["labels_scored"] == len(aucs) == 3
    assert m["roc_auc"] == pytest.approx(np.mean(aucs), abs=1e-12)
    assert m["mean_average_precision"] == pytest.approx(np.mean(aps), abs=1e-12)


def test_multilabel_metrics_with_no_scorable_column_name_the_fix() -> None:
    from bob_cache.errors import DataSourceError

    y = np.array([[1, -1], [1, -1], [-1, -1]])
    with pytest.raises(DataSourceError, match="No label column can be scored") as caught:
        multilabel_metrics(y, np.zeros(y.shape))
    assert "both a 1 and a 0" in str(caught.value)
