"""Class-conditional Gaussian detectors with one shared (tied) covariance.

Distances are *squared* Mahalanobis distances ``d_k(x) = (x - mu_k)^T P (x - mu_k)``, as in
Lee et al. 2018, Ren et al. 2021 and the ViM benchmark code. ``mu_k`` is the mean of class k's
ID rows; the tied covariance is ``sum_k sum_{i in k} (x_i - mu_k)(x_i - mu_k)^T / N`` (the
covariance of the class-centered rows, divided by N) and ``P`` its pseudo-inverse
(``scipy.linalg.pinvh`` with its default cutoff, i.e. scikit-learn's
``EmpiricalCovariance(assume_centered=True).precision_``; no ridge).

* ``mahalanobis``: score ``-min_k d_k(x)``.
* ``relative-mahalanobis`` (Ren et al. 2021, "A Simple Fix to Mahalanobis Distance"):
  ``RMD_k(x) = d_k(x) - d_0(x)`` with ``d_0`` under one background Gaussian fitted to all ID
  rows (mean ``mu_0``, covariance divided by N, pseudo-inverted the same way); score
  ``-min_k RMD_k(x) = d_0(x) - min_k d_k(x)``.

Both fit in one pass over labelled ID blocks (:class:`~bob_cache.ood.stats.GaussianMoments`).

**Singular fits.** With more feature dimensions than ID rows span (e.g. 1,280 dims from
1,078 rows, or units no image activates) the tied covariance is singular: a pseudo-inverse
then ignores every direction the rows do not span, and the relative distance compares two
Gaussians that ignore different directions (in a demo, relative Mahalanobis ranked every
noisy image above every clean one: AUROC 0.0). When the tied covariance's rank (eigenvalues
above ``pinvh``'s cutoff) is below ``D``, both covariances get the same ridge,
``delta = 1e-6 · tr(Sigma_0) / D`` (``RIDGE`` times the mean variance of all ID rows), and
are inverted: ``P = inv(Sigma_w + delta I)``, ``P_0 = inv(Sigma_0 + delta I)``. This is
pytorch-ood's fix (it adds ``eps = 1e-6`` to the diagonal of both scatter matrices), made
relative to the features' scale; one ridge for both means the directions no ID row spans
weigh the same in ``d_k`` and ``d_0`` and cancel in the relative score. A non-singular fit
is unchanged. The detector's :attr:`note` says when the ridge was used (the ood stage puts it
in each row's protocol).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from bob_cache.ood.blocks import BlockSource, LinearHead, iter_blocks
from bob_cache.ood.detectors import Detector, State, register_detector
from bob_cache.ood.stats import RIDGE, GaussianMoments, pinv_psd, psd_rank, ridge_inverse

_ROWS = 4096  # query rows per chunk: bounds the (rows, classes) distance matrix


def min_class_distance(x: np.ndarray, means: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """``min_k (x - mu_k)^T P (x - mu_k)`` per row (squared Mahalanobis), float64."""
    center = means.mean(axis=0)  # expand about the class centroid: fewer digits cancel
    mc = means - center
    pm = precision @ mc.T  # (D, K)
    mq = (mc.T * pm).sum(axis=0)  # mu_k^T P mu_k
    out = np.empty(len(x))
    for start in range(0, len(x), _ROWS):
        xc = x[start : start + _ROWS] - center
        quad = ((xc @ precision) * xc).sum(axis=1)
        d = quad[:, None] - 2 * (xc @ pm) + mq[None, :]
        out[start : start + _ROWS] = np.maximum(d.min(axis=1), 0.0)
    return out


def gaussian_distance(x: np.ndarray, mean: np.ndarray, precision: np.ndarray) -> np.ndarray:
    """``(x - mu)^T P (x - mu)`` per row, float64."""
    xc = x - mean
    return np.maximum(((xc @ precision) * xc).sum(axis=1), 0.0)


@register_detector("mahalanobis")
class Mahalanobis(Detector):
    """Negative minimum squared Mahalanobis distance to the class means (tied covariance)."""

    needs_labels = True
    state_version = 2  # 2: a singular fit is regularized (rank, ridge)

    def __init__(self) -> None:
        super().__init__()
        self.classes = np.zeros(0, dtype=np.int64)
        self.means = np.zeros((0, 0))
        self.precision = np.zeros((0, 0))
        self.rank = 0  # of the tied within-class covariance
        self.ridge = 0.0  # added to the covariance(s) when singular (see the module doc)

    def _fit(self, stream: BlockSource, head: LinearHead | None) -> None:
        moments = GaussianMoments()
        for x, y in iter_blocks(stream, detector=self.name, labels=True):
            moments.update(x, y)
        self._set_from(moments)
        self.dim, self.n_fit = len(moments.shift), moments.n

    def _set_from(self, moments: GaussianMoments) -> None:
        self.classes = moments.classes()
        self.means = moments.class_means()
        within = moments.within_covariance()
        self.rank = psd_rank(within)
        if self.rank < len(within):  # singular: one ridge for every covariance of the fit
            self.ridge = RIDGE * float(np.trace(moments.covariance())) / len(within)
        self.precision = self._inverse(within)

    def _inverse(self, covariance: np.ndarray) -> np.ndarray:
        return ridge_inverse(covariance, self.ridge) if self.ridge else pinv_psd(covariance)

    @property
    def note(self) -> str:
        if not self.ridge:
            return ""
        return (
            f"regularized: singular covariance (rank {self.rank} of {self.dim} dims, "
            f"{self.n_fit} fit rows), ridge {self.ridge:.3g} (1e-6 x mean variance) added"
        )

    def _score(self, x: np.ndarray) -> np.ndarray:
        return -min_class_distance(x, self.means, self.precision)

    def _state(self) -> State:
        return {"classes": self.classes, "means": self.means, "precision": self.precision,
                "rank": self.rank, "ridge": self.ridge}  # fmt: skip

    @classmethod
    def _state_keys(cls) -> tuple[str, ...]:
        return ("classes", "means", "precision", "rank", "ridge")

    @classmethod
    def _restore(cls, state: Mapping[str, Any]) -> Mahalanobis:
        detector = cls()
        detector.classes = np.asarray(state["classes"], dtype=np.int64)
        detector.means = np.asarray(state["means"], dtype=np.float64)
        detector.precision = np.asarray(state["precision"], dtype=np.float64)
        detector.rank, detector.ridge = int(state["rank"]), float(state["ridge"])
        return detector


@register_detector("relative-mahalanobis")
class RelativeMahalanobis(Mahalanobis):
    """Class Mahalanobis distance minus the distance under one background Gaussian."""

    def __init__(self) -> None:
        super().__init__()
        self.background_mean = np.zeros(0)
        self.background_precision = np.zeros((0, 0))

    def _set_from(self, moments: GaussianMoments) -> None:
        super()._set_from(moments)
        self.background_mean = moments.mean()
        self.background_precision = self._inverse(moments.covariance())  # the same ridge

    def _score(self, x: np.ndarray) -> np.ndarray:
        background = gaussian_distance(x, self.background_mean, self.background_precision)
        return background - min_class_distance(x, self.means, self.precision)

    def _state(self) -> State:
        return {
            **super()._state(),
            "background_mean": self.background_mean,
            "background_precision": self.background_precision,
        }

    @classmethod
    def _state_keys(cls) -> tuple[str, ...]:
        return (*super()._state_keys(), "background_mean", "background_precision")

    @classmethod
    def _restore(cls, state: Mapping[str, Any]) -> RelativeMahalanobis:
        detector = super()._restore(state)
        detector.background_mean = np.asarray(state["background_mean"], dtype=np.float64)
        detector.background_precision = np.asarray(state["background_precision"], dtype=np.float64)
        return detector
