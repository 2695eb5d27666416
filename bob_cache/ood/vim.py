"""ViM: Virtual-logit Matching (Wang et al. 2022), as the official ``benchmark.py`` computes it.

With the head ``z = x @ W.T + b``:

1. origin ``u = -pinv(W) @ b``;
2. principal space: eigenvectors of ``C = sum_i (x_i - u)(x_i - u)^T / N`` over the ID fit rows
   (``EmpiricalCovariance(assume_centered=True)`` of ``x - u``); ``R`` = the eigenvectors of
   the ``D - principal_dim`` smallest eigenvalues (the residual space);
3. ``alpha = mean_i max_k z_ik / mean_i ||(x_i - u) @ R||`` over the ID fit rows;
4. score ``= logsumexp(z) - alpha * ||(x - u) @ R||`` (energy minus the virtual logit).

``principal_dim`` default: the official rule, 1000 when ``D >= 2048`` else 512, where that
leaves a residual space (``D > 512``); for ``D <= 512`` it is ``D // 2``. ``C`` is
decomposed with ``numpy.linalg.eigh`` (the official code calls ``eig``; the residual norm does
not depend on the eigenvectors' signs). Fitting reads the ID stream twice (``C`` first, then the
residual norms for ``alpha``), so the stream must be re-iterable.

**Singular fits.** When the ID rows span fewer dimensions than ``principal_dim`` (``rank(C)``,
eigenvalues above ``pinvh``'s cutoff, is at most ``principal_dim``: fewer rows than the rule
assumes), the principal space is not determined by the data (eigenvectors of the zero
eigenvalues are arbitrary) and the ID rows have no residual, so ``alpha`` is undefined. A
``principal_dim`` given explicitly is then an error naming the rank; the default becomes
``rank // 2`` (the rule for small ``D``, applied to the dimensions the rows span), and the
detector's :attr:`note` says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from bob_cache.errors import DetectorError
from bob_cache.ood.blocks import BlockSource, LinearHead, iter_blocks
from bob_cache.ood.detectors import Detector, State, check_int, register_detector
from bob_cache.ood.logit import energy
from bob_cache.ood.stats import eigenvalue_rank


def resolve_principal_dim(principal_dim: int | None, dim: int) -> int:
    """The principal-space dimension for ``dim``-dimensional features (see module doc)."""
    if principal_dim is None:
        principal_dim = (1000 if dim >= 2048 else 512) if dim > 512 else dim // 2
    if not 1 <= principal_dim < dim:
        raise DetectorError(
            f"Detector 'vim' needs 1 <= principal_dim < D, got principal_dim={principal_dim} "
            f"for D={dim}. Pass a smaller principal_dim (features need D >= 2)."
        )
    return principal_dim


@register_detector("vim")
class ViM(Detector):
    """Energy minus the alpha-scaled norm of the feature outside the ID principal space."""

    passes = 2
    needs_head = True
    state_version = 2  # 2: principal_dim below the rank of C (rank, official_dim)

    def __init__(self, principal_dim: int | None = None) -> None:
        super().__init__()
        if principal_dim is not None:
            check_int(principal_dim, option="principal_dim", detector="vim")
        self.principal_dim = principal_dim
        self.head: LinearHead | None = None
        self.origin = np.zeros(0)
        self.residual_space = np.zeros((0, 0))
        self.alpha = 0.0
        self.rank = 0  # of C: the dimensions the ID rows span
        self.official_dim = 0  # the default rule's principal_dim when the rank overruled it

    def _fit(self, stream: BlockSource, head: LinearHead) -> None:
        origin = -np.linalg.pinv(head.weight) @ head.bias
        second = np.zeros((head.dim, head.dim))
        rows, max_logit_sum = 0, 0.0
        for x, _ in iter_blocks(stream, detector=self.name, labels=False, dim=head.dim):
            centered = x - origin
            second += centered.T @ centered
            max_logit_sum += float(head.logits_tensor(x).amax(1).sum())
            rows += len(x)
        values, vectors = np.linalg.eigh((second + second.T) / (2 * rows))  # ascending
        self.rank = eigenvalue_rank(values)
        principal = self._principal(head.dim)
        residual_space = np.ascontiguousarray(vectors[:, : head.dim - principal])
        residual_sum, second_rows = 0.0, 0
        for x, _ in iter_blocks(stream, detector=self.name, labels=False, dim=head.dim):
            residual_sum += np.linalg.norm((x - origin) @ residual_space, axis=1).sum()
            second_rows += len(x)
        if second_rows != rows:
            raise DetectorError(
                f"The ID stream gave {rows} rows on the first pass and {second_rows} on the "
                "second; 'vim' needs the same blocks each time it is iterated."
            )
        if residual_sum <= 0:
            raise DetectorError(
                f"The ID features have no component outside the {principal}-dim principal "
                "space, so ViM's alpha is undefined. Pass a smaller principal_dim."
            )
        self.alpha = float((max_logit_sum / rows) / (residual_sum / rows))
        self.principal_dim, self.head, self.origin = principal, head, origin
        self.residual_space, self.dim, self.n_fit = residual_space, head.dim, rows

    def _principal(self, dim: int) -> int:
        """``principal_dim`` for this fit: below the rank of ``C`` (see the module doc)."""
        principal = resolve_principal_dim(self.principal_dim, dim)
        if principal < self.rank:
            return principal
        if self.principal_dim is not None or self.rank < 2:
            raise DetectorError(
                f"Detector 'vim' needs principal_dim below the {self.rank} dimensions the ID "
                f"rows span (of D={dim}); got principal_dim={principal}, so the principal space "
                f"is not determined by the data. Pass principal_dim < {self.rank}, or fit on "
                "more ID rows."
            )
        self.official_dim = principal
        return self.rank // 2

    @property
    def note(self) -> str:
        if not self.official_dim:
            return ""
        return (
            f"regularized: principal_dim {self.principal_dim} = rank // 2 (the ID rows span "
            f"{self.rank} of {self.dim} dims, the official rule's {self.official_dim} would "
            "leave them no residual)"
        )

    def virtual_logit(self, x: np.ndarray) -> np.ndarray:
        """``alpha * ||(x - u) @ R||`` per row."""
        return self.alpha * np.linalg.norm((x - self.origin) @ self.residual_space, axis=1)

    def _score(self, x: np.ndarray) -> np.ndarray:
        return energy(self.head.logits_tensor(x)).numpy() - self.virtual_logit(x)

    def _state(self) -> State:
        return {
            "weight": self.head.weight,
            "bias": self.head.bias,
            "principal_dim": self.principal_dim,
            "origin": self.origin,
            "residual_space": self.residual_space,
            "alpha": self.alpha,
            "rank": self.rank,
            "official_dim": self.official_dim,
        }

    @classmethod
    def _state_keys(cls) -> tuple[str, ...]:
        return ("weight", "bias", "principal_dim", "origin", "residual_space", "alpha", "rank",
                "official_dim")  # fmt: skip

    @classmethod
    def _restore(cls, state: Mapping[str, Any]) -> ViM:
        detector = cls(principal_dim=int(state["principal_dim"]))
        detector.head = LinearHead(state["weight"], state["bias"])
        detector.origin = np.asarray(state["origin"], dtype=np.float64)
        detector.residual_space = np.asarray(state["residual_space"], dtype=np.float64)
        detector.alpha = float(state["alpha"])
        detector.rank, detector.official_dim = int(state["rank"]), int(state["official_dim"])
        return detector
