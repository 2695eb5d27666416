"""One streaming pass of first and second moments, per class: what LogME and H-score need.

Rows are read block by block and shifted by a pilot mean ``c`` (the first block's), so that
the float64 sums hold small centred values and recovering the exact statistics afterwards
loses no precision. Accumulated over ``z = x − c``:

* ``gram = Σ z zᵀ`` (``dim × dim``),
* ``sums[k] = Σ_{y=k} z`` and ``counts[k]`` per class,
* ``q = Σ ‖z‖² z`` and ``r = Σ ‖z‖⁴`` (the fourth moments of the Ledoit-Wolf shrinkage).

Each block's products run in float64 while ``rows × dim²`` stays under
:data:`FLOAT64_PRODUCTS`, in float32 above (a third of the time at ImageNet size, for a
relative error near 1e-7 per block); blocks are summed in float64 either way.
Memory: ``dim² + (classes + 1) × dim`` float64 numbers and one block of rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bob_cache.transfer.rows import LabelledRows

FLOAT64_PRODUCTS = 5e9  # rows × dim² up to which the pass runs in float64


@dataclass(frozen=True)
class ClassMoments:
    """Moments of labelled rows about the shift ``shift`` (see the module doc)."""

    n: int
    shift: np.ndarray  # (dim,)
    counts: np.ndarray  # (classes,)
    sums: np.ndarray  # (classes, dim), of x − shift
    gram: np.ndarray  # (dim, dim), of x − shift
    q: np.ndarray  # (dim,)
    r: float

    @classmethod
    def accumulate(cls, rows: LabelledRows) -> ClassMoments:
        """One pass over ``rows``' blocks."""
        d, k = rows.dim, rows.n_classes
        exact = rows.n * d * d <= FLOAT64_PRODUCTS
        dtype, np_dtype = (torch.float64, np.float64) if exact else (torch.float32, np.float32)
        shift, c = None, None
        gram = torch.zeros(d, d, dtype=torch.float64)
        sums = torch.zeros(k, d, dtype=torch.float64)
        q = torch.zeros(d, dtype=torch.float64)
        counts = np.zeros(k, dtype=np.int64)
        r, n = 0.0, 0
        for block, y in rows.blocks():
            if shift is None:  # the pilot mean, as stored in the chosen precision
                shift = block.astype(np.float64).mean(axis=0).astype(np_dtype)
                c = torch.from_numpy(shift)
                shift = shift.astype(np.float64)
            z = torch.from_numpy(block).to(dtype) - c
            gram += (z.T @ z).double()
            sums += torch.zeros(k, d, dtype=dtype).index_add_(0, torch.from_numpy(y), z).double()
            sq = (z * z).sum(dim=1)
            q += (sq @ z).double()
            r += float((sq.double() ** 2).sum())
            counts += np.bincount(y, minlength=k)
            n += len(y)
        return cls(n, shift, counts, sums.numpy(), gram.numpy(), q.numpy(), r)

    @property
    def dim(self) -> int:
        return len(self.shift)

    @property
    def mean(self) -> np.ndarray:
        """The mean row."""
        return self.shift + self.sums.sum(axis=0) / self.n

    def raw_gram(self) -> np.ndarray:
        """``Fᵀ F`` of the unshifted rows."""
        s, c = self.sums.sum(axis=0), self.shift
        return self.gram + np.outer(c, s) + np.outer(s, c) + self.n * np.outer(c, c)

    def raw_class_sums(self) -> np.ndarray:
        """``Fᵀ Y``: per class, the sum of its unshifted rows, ``(classes, dim)``."""
        return self.sums + self.counts[:, None] * self.shift

    def covariance(self) -> np.ndarray:
        """The empirical covariance (maximum likelihood: divided by n)."""
        delta = self.sums.sum(axis=0) / self.n  # mean − shift
        return self.gram / self.n - np.outer(delta, delta)

    def between_covariance(self) -> np.ndarray:
        """``cov(E[f | y])`` over the rows (divided by n): the class means' scatter."""
        means = self.sums / np.maximum(self.counts, 1)[:, None]
        centred = means - self.sums.sum(axis=0) / self.n
        return (centred * self.counts[:, None]).T @ centred / self.n

    def ledoit_wolf_shrinkage(self) -> float:
        """Ledoit & Wolf (2004)'s shrinkage towards ``μ I`` (``μ`` = mean variance), as
        scikit-learn's ``ledoit_wolf_shrinkage`` computes it on centred rows."""
        s = self.covariance()
        delta = self.sums.sum(axis=0) / self.n
        e = float(delta @ delta)
        # Σ‖x − mean‖⁴ from the shifted moments: ‖z − δ‖² = ‖z‖² − 2 z·δ + ‖δ‖²
        fourth = (
            self.r
            + 4 * float(delta @ self.gram @ delta)
            + self.n * e * e
            - 4 * float(self.q @ delta)
            + 2 * e * float(np.trace(self.gram))
            - 4 * e * self.n * e
        )
        d = self.dim
        mu = float(np.trace(s)) / d
        frobenius = float((s * s).sum())
        beta = (fourth / self.n - frobenius) / (d * self.n)
        spread = (frobenius - d * mu * mu) / d
        beta = min(beta, spread)
        return 0.0 if beta <= 0 or spread <= 0 else beta / spread
