"""The regularized H-score (Ibrahim, Ponomareva & Mazumder, "Newer is not always better:
Rethinking transferability metrics, their peculiarities, stability and performance", ECML
PKDD 2022), the shrinkage form of Bao et al. (2019)'s H-score
``tr(cov(f)⁻¹ cov(E[f | y]))``:

    H_α = tr( Σ_α⁻¹ (1 − α) cov(E[f | y]) ),   Σ_α = (1 − α) cov(f) + α μ I,

where ``α`` is Ledoit & Wolf (2004)'s shrinkage coefficient of the features' covariance,
``μ = tr(cov(f)) / D`` its mean variance, and ``cov(E[f | y])`` the covariance of each row's
class mean. Both covariances are the maximum-likelihood ones (divided by n), as Ledoit-Wolf's
is; the authors' published code divides the second by n − 1 (a factor n / (n − 1)).

All of it comes from one streaming pass (:class:`ClassMoments`): the centred Gram matrix, the
per-class sums and counts, and the fourth moment ``Σ ‖x − x̄‖⁴`` the shrinkage needs.
"""

from __future__ import annotations

import numpy as np

from bob_cache.transfer.estimators import Estimate, Estimator, TransferInputs, register_estimator
from bob_cache.transfer.moments import ClassMoments


def hscore_from_moments(moments: ClassMoments) -> tuple[float, float]:
    """``(H_α, α)`` of the rows summarized by ``moments``."""
    alpha = moments.ledoit_wolf_shrinkage()
    cov = moments.covariance()
    d = len(cov)
    shrunk = (1 - alpha) * cov + alpha * (np.trace(cov) / d) * np.eye(d)
    between = moments.between_covariance()
    values, vectors = np.linalg.eigh(shrunk)
    keep = values > values.max(initial=0.0) * d * np.finfo(np.float64).eps  # pinv's cut
    inverse = (vectors[:, keep] / values[keep]) @ vectors[:, keep].T
    return float(np.trace(inverse @ ((1 - alpha) * between))), float(alpha)


@register_estimator("hscore")
class HScore(Estimator):
    """The regularized (shrinkage) H-score (higher = better)."""

    metric = "hscore"
    reference = "Ibrahim et al. 2022"

    def _estimate(self, inputs: TransferInputs) -> Estimate:
        value, alpha = hscore_from_moments(inputs.moments)
        protocol = (
            "regularized H-score (Ibrahim et al. 2022): tr(Σ_α⁻¹ (1−α) cov(E[f|y])), Σ_α the "
            f"Ledoit-Wolf shrinkage covariance of the features (α = {alpha:.4g}, recorded as "
            "metric shrinkage), both covariances divided by n; on train_rows labelled rows; "
            "nothing is fitted on other rows"
        )
        return self.result(inputs, value, protocol, shrinkage=alpha)
