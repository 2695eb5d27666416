"""Streaming sufficient statistics of the ID set, accumulated block by block in float64.

* :class:`GaussianMoments`: per-class sums and counts and the scatter matrix, taken about a
  shift (the first block's mean) so that large feature offsets do not cancel away digits.
  It yields the class means, the tied within-class covariance, and the mean and covariance of
  all rows (maximum-likelihood, divided by N, as scikit-learn's ``EmpiricalCovariance``).
* :class:`ReservoirSample`: a uniform random subsample (without replacement) of at most
  ``size`` scalar values: each value draws a uniform key and the ``size`` smallest keys are
  kept. The draws follow stream order, so the sample does not depend on how the stream is cut
  into blocks; with no more than ``size`` values it holds them all (an exact percentile).
"""

from __future__ import annotations

import numpy as np
from scipy import linalg

# A singular covariance's ridge, relative to the mean variance of all ID rows (see gaussian.py).
RIDGE = 1e-6


def pinv_psd(matrix: np.ndarray) -> np.ndarray:
    """Pseudo-inverse of a symmetric PSD matrix: ``scipy.linalg.pinvh`` with its default
    cutoff, exactly as scikit-learn's ``EmpiricalCovariance.precision_``."""
    return linalg.pinvh(matrix, check_finite=False)


def psd_rank(matrix: np.ndarray) -> int:
    """The dimensions a pseudo-inverse of ``matrix`` keeps; below ``D`` it is singular."""
    return eigenvalue_rank(linalg.eigvalsh(matrix, check_finite=False))


def eigenvalue_rank(values: np.ndarray) -> int:
    """Eigenvalues above ``pinvh``'s default cutoff (``D · eps · max |eigenvalue|``)."""
    values = np.abs(values)
    cutoff = len(values) * np.finfo(np.float64).eps * values.max(initial=0.0)
    return int((values > cutoff).sum())


def ridge_inverse(matrix: np.ndarray, ridge: float) -> np.ndarray:
    """``inv(matrix + ridge · I)`` of a symmetric PSD matrix, through its eigenvectors."""
    values, vectors = linalg.eigh(matrix, check_finite=False)
    return _symmetric((vectors / (np.maximum(values, 0.0) + ridge)) @ vectors.T)


class GaussianMoments:
    """Class sums/counts and the scatter of all rows, about a fixed shift."""

    def __init__(self) -> None:
        self.shift: np.ndarray | None = None
        self.n = 0
        self.total: np.ndarray | None = None  # sum of (x - shift)
        self.scatter: np.ndarray | None = None  # sum of (x - shift)(x - shift)^T
        self.class_sums = np.zeros((0, 0))
        self.class_counts = np.zeros(0, dtype=np.int64)

    def update(self, x: np.ndarray, labels: np.ndarray | None = None) -> None:
        """Add a float64 block (and its int64 labels, for the class statistics)."""
        if self.shift is None:
            self.shift = x.mean(axis=0)
            self.total = np.zeros(x.shape[1])
            self.scatter = np.zeros((x.shape[1], x.shape[1]))
            self.class_sums = np.zeros((0, x.shape[1]))
        z = x - self.shift
        self.n += len(z)
        self.total += z.sum(axis=0)
        self.scatter += z.T @ z
        if labels is not None:
            self._add_classes(z, labels)

    def _add_classes(self, z: np.ndarray, labels: np.ndarray) -> None:
        grow = int(labels.max()) + 1 - len(self.class_counts)
        if grow > 0:
            self.class_sums = np.vstack([self.class_sums, np.zeros((grow, z.shape[1]))])
            self.class_counts = np.concatenate([self.class_counts, np.zeros(grow, np.int64)])
        order = np.argsort(labels, kind="stable")
        classes, starts = np.unique(labels[order], return_index=True)
        self.class_sums[classes] += np.add.reduceat(z[order], starts, axis=0)
        self.class_counts[classes] += np.diff(np.append(starts, len(labels)))

    def mean(self) -> np.ndarray:
        return self.shift + self.total / self.n

    def covariance(self) -> np.ndarray:
        """Covariance of all rows about their mean (divided by N)."""
        m = self.total / self.n
        return _symmetric(self.scatter / self.n - np.outer(m, m))

    def classes(self) -> np.ndarray:
        """The labels seen (sorted)."""
        return np.flatnonzero(self.class_counts)

    def class_means(self) -> np.ndarray:
        present = self.classes()
        return self.shift + self.class_sums[present] / self.class_counts[present, None]

    def within_covariance(self) -> np.ndarray:
        """Tied covariance: sum over classes of the scatter about each class mean, over N."""
        present = self.classes()
        scaled = self.class_sums[present] / np.sqrt(self.class_counts[present])[:, None]
        return _symmetric((self.scatter - scaled.T @ scaled) / self.n)


def _symmetric(matrix: np.ndarray) -> np.ndarray:
    return (matrix + matrix.T) / 2


class ReservoirSample:
    """At most ``size`` values drawn uniformly without replacement from a stream."""

    def __init__(self, size: int, *, seed: int = 0) -> None:
        self.size = size
        self.rng = np.random.default_rng(seed)
        self.keys = np.zeros(0)
        self.values = np.zeros(0)
        self.seen = 0

    def update(self, values: np.ndarray) -> None:
        values = np.ravel(values)
        keys = self.rng.random(values.size)
        self.seen += values.size
        if len(self.keys) == self.size:  # full: only keys below the current largest can enter
            keep = keys < self.keys.max()
            keys, values = keys[keep], values[keep]
        self.keys = np.concatenate([self.keys, keys])
        self.values = np.concatenate([self.values, values])
        if len(self.keys) > self.size:
            smallest = np.argpartition(self.keys, self.size - 1)[: self.size]
            self.keys, self.values = self.keys[smallest], self.values[smallest]
