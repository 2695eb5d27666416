"""Estimators that read the backbone's source-task classifier: LEEP and NCE.

The source model ``θ`` is the backbone's own classifier over its pre-logit features:
``θ(x) = softmax(x Wᵀ + b)`` over its ``Z`` source classes (e.g. ImageNet's 1000).

* **LEEP** (Nguyen, Hassner, Seeger & Archambeau, "LEEP: A New Measure to Evaluate
  Transferability of Learned Representations", ICML 2020, Eqs. 1-3): the empirical joint
  ``P̂(y, z) = 1/n Σ_{i: y_i = y} θ(x_i)_z``, the conditional ``P̂(y | z) = P̂(y, z) / P̂(z)``
  and ``LEEP = 1/n Σ_i log Σ_z P̂(y_i | z) θ(x_i)_z``.
* **NCE** (Tran, Nguyen & Hassner, "Transferability and Hardness of Supervised
  Classification Tasks", ICCV 2019): with the source's hard labels ``z_i = argmax θ(x_i)``,
  ``NCE = −H(Y | Z) = Σ_{y,z} P̂(y, z) log P̂(y | z)`` from the counts of ``(y_i, z_i)`` (as
  in the LEEP paper's comparison).

Both are log-likelihoods (≤ 0; higher = better). One pass of logits gives the soft joint
(LEEP) and the hard counts (NCE); LEEP reads the rows a second time for its per-row term, so
no ``n × Z`` matrix is ever held.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from bob_cache.transfer.estimators import Estimate, Estimator, TransferInputs, register_estimator


@dataclass(frozen=True)
class SourceJoint:
    """``Σ_i θ(x_i)`` split by target class (soft, ``K × Z``) and the counts of
    ``(y_i, argmax θ(x_i))`` (hard, ``K × Z``)."""

    soft: np.ndarray
    hard: np.ndarray


def _probabilities(inputs: TransferInputs, block: np.ndarray) -> torch.Tensor:
    """``θ(x)`` of one block: float32 logits (one product), softmax in float32."""
    weight, bias = inputs.shared("source_float32", lambda: _float32(inputs))
    return torch.softmax(torch.addmm(bias, torch.from_numpy(block), weight.T), dim=1)


def _float32(inputs: TransferInputs) -> tuple[torch.Tensor, torch.Tensor]:
    head = inputs.source
    return (torch.from_numpy(head.weight.astype(np.float32)),
            torch.from_numpy(head.bias.astype(np.float32)))  # fmt: skip


def source_joint(inputs: TransferInputs) -> SourceJoint:
    """One pass of source-head probabilities over the rows (shared by LEEP and NCE)."""
    k, z = inputs.rows.n_classes, len(inputs.source.bias)
    soft = torch.zeros(k, z, dtype=torch.float64)
    hard = np.zeros(k * z, dtype=np.int64)
    for block, y in inputs.rows.blocks():
        theta = _probabilities(inputs, block)
        soft += torch.zeros(k, z).index_add_(0, torch.from_numpy(y), theta).double()
        top = theta.argmax(dim=1).numpy()
        hard += np.bincount(y * z + top, minlength=k * z)
    return SourceJoint(soft.numpy(), hard.reshape(k, z))


def _joint(inputs: TransferInputs) -> SourceJoint:
    return inputs.shared("source_joint", lambda: source_joint(inputs))


def _describe(inputs: TransferInputs) -> str:
    z = len(inputs.source.bias)
    return inputs.source_note or f"a {z}-class source classifier"


@register_estimator("leep")
class LEEP(Estimator):
    """Log expected empirical prediction (higher = better)."""

    metric = "leep"
    needs_source = True
    reference = "Nguyen et al. 2020"

    def _estimate(self, inputs: TransferInputs) -> Estimate:
        soft = _joint(inputs).soft
        marginal = soft.sum(axis=0)  # n P̂(z)
        conditional = np.divide(soft, marginal, out=np.zeros_like(soft), where=marginal > 0)
        table = torch.from_numpy(conditional.astype(np.float32))
        total = 0.0
        for block, y in inputs.rows.blocks():
            theta = _probabilities(inputs, block)
            expected = (theta * table[torch.from_numpy(y)]).sum(dim=1).double()
            total += float(torch.log(expected.clamp_min(1e-300)).sum())
        protocol = (
            f"LEEP (Nguyen et al. 2020): source model θ = softmax of {_describe(inputs)} over "
            "the stored features; 1/n Σ log Σ_z P̂(y_i|z) θ(x_i)_z with P̂ from the soft joint "
            "of the same train_rows labelled rows; nothing is fitted on other rows"
        )
        return self.result(inputs, total / inputs.rows.n, protocol)


@register_estimator("nce")
class NCE(Estimator):
    """Negative conditional entropy of the target labels given the source's top class."""

    metric = "nce"
    needs_source = True
    reference = "Tran et al. 2019"

    def _estimate(self, inputs: TransferInputs) -> Estimate:
        hard = _joint(inputs).hard.astype(np.float64)
        n = hard.sum()
        per_z = hard.sum(axis=0)
        ratio = np.divide(hard, per_z, out=np.ones_like(hard), where=hard > 0)
        value = float((hard * np.log(ratio)).sum() / n)
        used = int((per_z > 0).sum())
        protocol = (
            f"NCE (Tran et al. 2019): −H(Y|Z), Z the top class of {_describe(inputs)} over the "
            f"stored features ({used} of {len(per_z)} source classes occur), from the counts "
            "of train_rows labelled rows; nothing is fitted on other rows"
        )
        return self.result(inputs, value, protocol)
