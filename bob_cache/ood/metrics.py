"""OOD detection metrics, with one sign convention: a score is **higher = more in-distribution**
and ID is the positive class.

* ``auroc``: ``roc_auc_score(is_id, scores)``.
* ``aupr_in``: ``average_precision_score(is_id, scores)`` (ID positive).
* ``aupr_out``: ``average_precision_score(is_ood, -scores)`` (OOD positive, scores negated).
* ``fpr_at_tpr`` (FPR@95%TPR for ``tpr=0.95``): with ``TPR(t) = #{ID >= t} / n_id`` and
  ``FPR(t) = #{OOD >= t} / n_ood``, the smallest ``FPR(t)`` over thresholds ``t`` with
  ``TPR(t) >= tpr`` (computed from ``roc_curve(..., drop_intermediate=False)``, whose
  thresholds are the distinct scores). Equivalently: ``t*`` is the ``ceil(tpr * n_id)``-th
  highest ID score, and the FPR is the fraction of OOD scores ``>= t*`` — OOD samples tied
  with the threshold count as false positives, ID samples tied with it as true positives.
  ``threshold`` reports ``t*``.

AUPR uses scikit-learn's average precision (a step-wise sum, not the trapezoidal area that
some OOD code bases compute with ``auc(recall, precision)``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from bob_cache.errors import DetectorError


@dataclass(frozen=True)
class OODMetrics:
    """Detection metrics of ID vs OOD scores (higher score = more ID)."""

    auroc: float
    aupr_in: float
    aupr_out: float
    fpr_at_tpr: float  # FPR at TPR >= ``tpr``
    threshold: float  # the score threshold t* that FPR is taken at
    tpr: float
    n_id: int
    n_ood: int

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


def _scores(values: Any, what: str) -> np.ndarray:
    x = np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or len(x) == 0:
        raise DetectorError(
            f"{what} scores must be a non-empty 1-D array (one score per sample); got shape "
            f"{x.shape}. Score both the ID and the OOD set with the same detector."
        )
    if not np.isfinite(x).all():
        raise DetectorError(
            f"{what} scores hold {int((~np.isfinite(x)).sum())} NaN/inf value(s); check the "
            "features scored (or the detector's fit)."
        )
    return x


def _labelled(id_scores: Any, ood_scores: Any) -> tuple[np.ndarray, np.ndarray]:
    ids, oods = _scores(id_scores, "ID"), _scores(ood_scores, "OOD")
    is_id = np.concatenate([np.ones(len(ids), dtype=np.int64), np.zeros(len(oods), np.int64)])
    return is_id, np.concatenate([ids, oods])


def fpr_at_tpr(id_scores: Any, ood_scores: Any, *, tpr: float = 0.95) -> tuple[float, float]:
    """``(FPR, threshold)`` at the highest threshold whose TPR is at least ``tpr``."""
    if not 0 < tpr <= 1:
        raise DetectorError(f"tpr must be in (0, 1]; got {tpr!r} (0.95 for FPR@95%TPR).")
    is_id, scores = _labelled(id_scores, ood_scores)
    fprs, tprs, thresholds = roc_curve(is_id, scores, drop_intermediate=False)
    first = int(np.argmax(tprs >= tpr))  # fpr is non-decreasing along the curve
    return float(fprs[first]), float(thresholds[first])


def ood_metrics(id_scores: Any, ood_scores: Any, *, tpr: float = 0.95) -> OODMetrics:
    """AUROC, AUPR-in, AUPR-out and FPR at ``tpr`` of ID vs OOD scores (higher = more ID)."""
    is_id, scores = _labelled(id_scores, ood_scores)
    fpr, threshold = fpr_at_tpr(id_scores, ood_scores, tpr=tpr)
    return OODMetrics(
        auroc=float(roc_auc_score(is_id, scores)),
        aupr_in=float(average_precision_score(is_id, scores)),
        aupr_out=float(average_precision_score(1 - is_id, -scores)),
        fpr_at_tpr=fpr,
        threshold=threshold,
        tpr=float(tpr),
        n_id=int(is_id.sum()),
        n_ood=int(len(is_id) - is_id.sum()),
    )
