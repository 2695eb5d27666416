"""LogME (You, Liu, Wang & Long, "LogME: Practical Assessment of Pre-trained Models for
Transfer Learning", ICML 2021).

For each class ``k`` the one-hot target ``y_k ∈ {0,1}ⁿ`` is modelled as ``y = F w + ε`` with
prior ``w ~ N(0, α⁻¹ I)`` and noise ``ε ~ N(0, β⁻¹ I)`` on the raw features ``F`` (``n × D``,
no centring, no bias), and the log evidence (the paper's Eq. 2)

    L(α, β) = n/2 log β + D/2 log α − n/2 log 2π − β/2 ‖F m − y‖² − α/2 mᵀm − 1/2 log |A|,
    A = α I + β FᵀF,  m = β A⁻¹ Fᵀ y,

is maximized by the fixed-point iteration of the paper's Algorithm 1 (MacKay's): with
``σ_i`` the eigenvalues of ``FᵀF``, ``γ = Σ β σ_i / (α + β σ_i)``, ``α ← γ / (mᵀm + ε)``,
``β ← (n − γ) / (‖F m − y‖² + ε)``, from ``α = β = 1`` until ``λ = α/β`` changes by less than
``tol`` (relative). ``ε = 1e-5`` is the authors' code's (``each_evidence``), which also puts it
in the evidence's two fit terms (``− β/2 (‖F m − y‖² + ε) − α/2 (mᵀm + ε)``): without it a class
that the features fit exactly (``n ≤ D``, separable) has no finite maximizer (β → ∞) and the
iteration diverges. With it, the updates and the evidence are scikit-learn's
``BayesianRidge`` with Gamma priors ``alpha_2 = lambda_2 = ε/2`` (shape terms 0). Where
``n < D`` the ``D − n`` smallest eigenvalues of ``FᵀF`` are zero by rank (round-off is set to
0). LogME is the mean over the ``K`` classes of ``L_k / n``.

Everything needed is ``FᵀF`` and ``Fᵀ y_k`` (the per-class sums of rows) and the class
counts (``yᵀy = n_k``): one streaming pass (:class:`ClassMoments`), then one
eigendecomposition of the ``D × D`` Gram matrix; the iteration runs for all classes at
once in the eigenbasis, where ``t = Vᵀ Fᵀ y``, ``mᵀm = Σ t²/(σ+λ)²`` and
``‖F m − y‖² = n_k − 2 Σ t²/(σ+λ) + Σ σ t²/(σ+λ)²``. The evidence is evaluated at the
final ``(α, β)`` with ``m`` recomputed there.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from bob_cache.transfer.estimators import Estimate, Estimator, TransferInputs, register_estimator

TOL = 1e-6
EPS = 1e-5  # the authors' code's ε in the updates and the evidence (module doc)
MAX_ITER = 1000  # slow near-interpolating classes take a few hundred (cheap: eigenbasis)


def logme_from_moments(
    gram: np.ndarray,
    class_sums: np.ndarray,
    counts: np.ndarray,
    n: int,
    *,
    tol: float = TOL,
    max_iter: int = MAX_ITER,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-class ``(evidence / n, α, β, iterations)`` from ``FᵀF``, ``Fᵀ Y`` and the counts.

    Args:
        gram: ``FᵀF`` (``D × D``) of the raw rows.
        class_sums: ``(K, D)``: row ``k`` is the sum of the rows of class ``k`` (``Fᵀ y_k``).
        counts: ``(K,)`` rows per class (``y_kᵀ y_k``).
        n: rows in all.
    """
    sigma, vectors = np.linalg.eigh(gram)
    sigma = np.maximum(sigma, 0.0)
    t2 = (class_sums @ vectors) ** 2  # (K, D)
    d = len(sigma)
    if n < d:  # FᵀF has rank ≤ n: the rest (ascending order) is round-off
        sigma[: d - n] = 0.0
        t2[:, : d - n] = 0.0
    alpha, beta = np.ones(len(counts)), np.ones(len(counts))
    iterations = np.zeros(len(counts), dtype=np.int64)
    active = np.ones(len(counts), dtype=bool)
    tiny = np.finfo(np.float64).tiny
    for _ in range(max_iter):
        if not active.any():
            break
        lam = (alpha / beta)[active]
        m2, res2 = _fit_terms(sigma, t2[active], counts[active], lam)
        gamma = (sigma / (sigma + lam[:, None])).sum(axis=1)
        new_alpha = gamma / (m2 + EPS)
        new_beta = np.maximum(n - gamma, tiny) / (res2 + EPS)
        idx = np.flatnonzero(active)
        alpha[idx], beta[idx] = new_alpha, new_beta
        iterations[idx] += 1
        done = np.abs(new_alpha / new_beta - lam) <= tol * lam
        active[idx[done]] = False
    lam = alpha / beta
    m2, res2 = _fit_terms(sigma, t2, counts, lam)
    log_det = np.log(alpha[:, None] + beta[:, None] * sigma).sum(axis=1)
    evidence = (
        n / 2 * np.log(beta) + d / 2 * np.log(alpha) - n / 2 * np.log(2 * np.pi)
        - beta / 2 * (res2 + EPS) - alpha / 2 * (m2 + EPS) - log_det / 2
    )  # fmt: skip
    return evidence / n, alpha, beta, np.where(active, -iterations, iterations)


def _fit_terms(
    sigma: np.ndarray, t2: np.ndarray, counts: np.ndarray, lam: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """``(mᵀm, ‖F m − y‖²)`` per class at ``λ = α/β`` (in the eigenbasis; see the module)."""
    inv = 1.0 / (sigma + lam[:, None])
    m2 = (t2 * inv * inv).sum(axis=1)
    res2 = counts - 2 * (t2 * inv).sum(axis=1) + (sigma * t2 * inv * inv).sum(axis=1)
    return m2, np.maximum(res2, 0.0)


@register_estimator("logme")
class LogME(Estimator):
    """LogME: the mean per-class log evidence per row (higher = better)."""

    metric = "logme"
    reference = "You et al. 2021"

    def __init__(self, tol: float = TOL, max_iter: int = MAX_ITER) -> None:
        self.tol, self.max_iter = float(tol), int(max_iter)

    def options(self) -> dict[str, Any]:
        return {"tol": self.tol, "max_iter": self.max_iter}

    def _estimate(self, inputs: TransferInputs) -> Estimate:
        mom = inputs.moments
        per_class, _, _, iterations = logme_from_moments(
            mom.raw_gram(), mom.raw_class_sums(), mom.counts.astype(np.float64), mom.n,
            tol=self.tol, max_iter=self.max_iter,
        )  # fmt: skip
        stalled = int((iterations < 0).sum())
        note = (
            f"; {stalled} class(es) NOT CONVERGED after {self.max_iter} iterations"
            if stalled
            else f"; converged in at most {int(iterations.max())} iterations"
        )
        protocol = (
            "LogME (You et al. 2021): per class, the log evidence of Bayesian linear "
            "regression of the one-hot target on the raw features, maximized over (α, β) by "
            f"the paper's fixed-point iteration with the authors' code's ε = {EPS:g} "
            f"(relative tolerance {self.tol:g} on α/β){note}; "
            f"the mean over the {inputs.rows.n_classes} classes of evidence / n, on train_rows "
            "labelled rows; nothing is fitted on other rows"
        )
        return self.result(inputs, per_class.mean(), protocol)
