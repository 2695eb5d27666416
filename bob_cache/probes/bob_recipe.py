"""The BoB-paper linear probe: MAE's recipe, for parity with the published numbers.

A non-affine ``BatchNorm1d`` followed by a linear head, trained with LARS (timm's, with
trust-ratio adaptation on the weight as in MAE's ``util/lars.py``), base learning rate 0.1
scaled by batch/256, momentum 0.9, no weight decay, 10 warm-up epochs then cosine decay,
90 epochs, batch 16384 (capped at the training size). As MAE's loader does
(``drop_last=True``), each epoch drops the last incomplete batch (its rows are reshuffled into
the next epoch), so BatchNorm never sees a batch of one row; a training set smaller than a
batch is one batch. The head starts at ``trunc_normal(std=0.01)``. This recipe holds the
training features in memory; it is slower than :mod:`bob_cache.probes.linear` and does not
tune regularization. Its learning rate is set for ImageNet-sized training sets (thousands of
LARS steps, each relative to the weight norm); on a few thousand images it underfits, so use
the default sweep there.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bob_cache.errors import SpecError
from bob_cache.probes.features import Features


@dataclass(frozen=True)
class BobRecipe:
    """Hyper-parameters of the recipe (the defaults are the paper's)."""

    epochs: int = 90
    batch_size: int = 16384
    base_lr: float = 0.1
    warmup_epochs: int = 10
    momentum: float = 0.9


class _Probe(nn.Module):
    def __init__(self, dim: int, n_outputs: int) -> None:
        super().__init__()
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.head = nn.Linear(dim, n_outputs)
        nn.init.trunc_normal_(self.head.weight, std=0.01)
        nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.norm(x))


def train_bob_probe(
    train: Features,
    y: np.ndarray,
    *,
    n_outputs: int,
    seed: int,
    recipe: BobRecipe = BobRecipe(),
    device: torch.device | str = "cpu",
) -> nn.Module:
    """Train the probe; returns the module in eval mode (call it on raw features).

    Raises:
        SpecError: with fewer than two training rows (BatchNorm has no batch statistics).
    """
    from timm.optim import Lars
    from timm.scheduler import CosineLRScheduler

    if train.n < 2:
        raise SpecError(
            f"The BoB recipe needs at least 2 training rows (its BatchNorm normalizes each "
            f"batch by the batch's own statistics), got {train.n}. Label more training images, "
            "or use the default linear probe (--recipe sweep)."
        )
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    x = torch.from_numpy(train.materialize()).to(device)
    labels = torch.from_numpy(y).to(device)
    labels = labels.float() if y.ndim == 2 else labels.long()
    probe = _Probe(x.shape[1], n_outputs).to(device)
    batch = min(recipe.batch_size, len(x))
    lr = recipe.base_lr * batch / 256
    opt = Lars(
        [{"params": [probe.head.weight], "always_adapt": True}, {"params": [probe.head.bias]}],
        lr=lr, momentum=recipe.momentum, weight_decay=0.0,
    )  # fmt: skip
    steps = len(x) // batch  # the last incomplete batch is dropped (MAE's drop_last=True)
    sched = CosineLRScheduler(
        opt,
        t_initial=recipe.epochs * steps,
        warmup_t=recipe.warmup_epochs * steps,
        warmup_lr_init=0.0,
        t_in_epochs=False,
    )
    probe.train()
    for epoch in range(recipe.epochs):
        order = torch.randperm(len(x), generator=generator).to(device)
        for i in range(steps):
            rows = order[i * batch : (i + 1) * batch]
            logits = probe(x[rows])
            loss = _loss(logits, labels[rows])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step_update(epoch * steps + i + 1)
    return probe.eval()


def bob_scores(probe: nn.Module, features: Features) -> np.ndarray:
    """Logits of the trained probe, block by block."""
    device = next(probe.parameters()).device
    with torch.no_grad():
        return np.concatenate(
            [probe(torch.from_numpy(b).to(device)).cpu().numpy() for b in features.blocks()]
        )


def _loss(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if y.dtype == torch.long:
        return F.cross_entropy(logits, y)
    known = y >= 0
    if not known.any():  # a batch without one known label: nothing to learn (not NaN)
        return logits.sum() * 0.0
    return F.binary_cross_entropy_with_logits(logits[known], y[known])
