"""The logistic objective over row blocks, and the L-BFGS that minimizes it.

``mean loss + (λ/2)‖W‖²`` at weights over standardized features. The exact objective works
in float32 on the raw rows with the standardization folded into the weights, so neither a
standardized copy nor a streamed feature set is ever held whole. On large in-memory problems,
where the hardware has fast bfloat16 matrix products (AVX512-BF16 or AMX CPUs, CUDA GPUs), a
bfloat16 twin on a standardized copy (2 bytes per value) does the bulk of the iterations and
the exact objective finishes: the fit is always certified converged in float32.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from bob_cache.probes.features import Features, Standardizer

FINAL_GTOL = 1e-4  # the reported model: scikit-learn's default tolerance ...
SMALL_GTOL = 1e-6  # ... or tighter where a fit costs well under a second
SMALL_WORK = 2e8  # rows × dim × outputs of such a fit
MAX_ITER = 2000
BF16_MIN_WORK = 5e10  # rows × dim × outputs above which the bfloat16 twin pays off

Weights = tuple[torch.Tensor, torch.Tensor]


class Objective:
    """``mean loss + (λ/2)‖W‖²`` over ``features`` and its gradient, block by block."""

    def __init__(
        self,
        features: Features,
        labels: np.ndarray,
        std: Standardizer,
        n_outputs: int,
        device: torch.device,
    ) -> None:
        self.features, self.n, self.n_outputs, self.device = features, features.n, n_outputs, device
        self.multilabel = labels.ndim == 2
        y = torch.from_numpy(labels)
        self.labels = y.float() if self.multilabel else y.long()
        self.mean = torch.from_numpy(std.mean).to(device)
        self.std = torch.from_numpy(std.std).to(device)
        keep = device.type != "cpu" and not features.is_streamed
        self._cache = list(self._blocks()) if keep else None
        self.fast = _Bf16Twin(self) if _bf16_pays_off(self) else None

    def _blocks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        start = 0
        for block in self.features.blocks():
            y = self.labels[start : start + len(block)]
            start += len(block)
            yield torch.from_numpy(block).to(self.device), y.to(self.device)

    @torch.no_grad()
    def __call__(self, w: torch.Tensor, b: torch.Tensor, lam: float) -> tuple[float, Weights]:
        """Loss and gradient at standardized-space weights ``(w, b)``."""
        w_raw = w / self.std  # standardization folded into the weights
        b_raw = b - w_raw @ self.mean
        gw = torch.zeros_like(w)
        gb = torch.zeros_like(b)
        total = 0.0
        for x, y in self._cache if self._cache is not None else self._blocks():
            logits = torch.addmm(b_raw, x, w_raw.T)
            total += self._loss_and_residual(logits, y)  # logits now hold dloss/dlogits
            gw.addmm_(logits.T, x)
            gb += logits.sum(0)
        denom = self.n * (self.n_outputs if self.multilabel else 1)
        gw = (gw - gb[:, None] * self.mean[None, :]) / self.std / denom + lam * w
        loss = total / denom + 0.5 * lam * float((w * w).sum())
        return loss, (gw, gb / denom)

    def _loss_and_residual(self, logits: torch.Tensor, y: torch.Tensor) -> float:
        if not self.multilabel:
            lse = torch.logsumexp(logits, 1)
            loss = float((lse - logits.gather(1, y[:, None])[:, 0]).sum())
            logits.sub_(lse[:, None]).exp_()
            logits[torch.arange(len(y), device=y.device), y] -= 1
            return loss
        known = (y >= 0).float()
        target = y.clamp(min=0)
        loss = float(F.binary_cross_entropy_with_logits(logits, target, known, reduction="sum"))
        logits.sigmoid_().sub_(target).mul_(known)
        return loss


class _Bf16Twin:
    """The same objective with bfloat16 products on a standardized bfloat16 copy of the rows.

    Logits and block gradients carry bfloat16 rounding (about 3 significant digits), so it
    serves to get close; :func:`minimize` always finishes on the exact objective.
    """

    def __init__(self, exact: Objective) -> None:
        self.exact = exact
        self.blocks = [
            (((x - exact.mean) / exact.std).to(torch.bfloat16), y) for x, y in exact._blocks()
        ]

    @torch.no_grad()
    def __call__(self, w: torch.Tensor, b: torch.Tensor, lam: float) -> tuple[float, Weights]:
        exact = self.exact
        w16 = w.to(torch.bfloat16)
        gw = torch.zeros_like(w)
        gb = torch.zeros_like(b)
        total = 0.0
        for z, y in self.blocks:
            logits = torch.mm(z, w16.T).float().add_(b)
            total += exact._loss_and_residual(logits, y)
            gw += torch.mm(logits.to(torch.bfloat16).T, z).float()
            gb += logits.sum(0)
        denom = exact.n * (exact.n_outputs if exact.multilabel else 1)
        loss = total / denom + 0.5 * lam * float((w * w).sum())
        return loss, (gw / denom + lam * w, gb / denom)


def _bf16_pays_off(objective: Objective) -> bool:
    work = objective.n * objective.features.dim * objective.n_outputs
    if work < BF16_MIN_WORK or objective.features.is_streamed:
        return False
    if objective.device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return objective.device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def final_gtol(objective: Objective) -> float:
    """The reported model's tolerance: tight for small problems, where weak regularization
    leaves the most room between a loose stop and the optimum and iterations are cheap."""
    work = objective.n * objective.features.dim * objective.n_outputs
    return SMALL_GTOL if work <= SMALL_WORK else FINAL_GTOL


def minimize(
    objective: Objective,
    lam: float,
    *,
    init: Weights | None = None,
    gtol: float = FINAL_GTOL,
    max_iter: int = MAX_ITER,
) -> tuple[Weights, int, bool]:
    """L-BFGS until the largest gradient entry is ≤ ``gtol`` or float32 makes no more progress.

    With a bfloat16 twin, the twin runs first and the exact objective continues from where it
    stopped. Returns ``((W, b), iterations, converged)``; converged is False only when
    ``max_iter`` stopped the exact fit.
    """
    done = 0
    if objective.fast is not None:
        init, done, _ = _lbfgs(objective.fast, objective, lam, init, gtol, max_iter)
    weights, iterations, converged = _lbfgs(objective, objective, lam, init, gtol, max_iter)
    return weights, done + iterations, converged


def _lbfgs(
    fn: Objective | _Bf16Twin,
    objective: Objective,
    lam: float,
    init: Weights | None,
    gtol: float,
    max_iter: int,
) -> tuple[Weights, int, bool]:
    k, dim = objective.n_outputs, objective.features.dim
    device = objective.device
    w = torch.zeros(k, dim, device=device) if init is None else init[0].detach().clone()
    b = torch.zeros(k, device=device) if init is None else init[1].detach().clone()
    opt = torch.optim.LBFGS(
        [w, b], lr=1, max_iter=max_iter, max_eval=2 * max_iter, history_size=10,
        line_search_fn="strong_wolfe", tolerance_grad=gtol, tolerance_change=1e-12,
    )  # fmt: skip

    def closure() -> torch.Tensor:
        loss, (w.grad, b.grad) = fn(w, b, lam)
        return torch.tensor(loss)

    opt.step(closure)
    iterations = int(opt.state[w].get("n_iter", 0))
    return (w.detach(), b.detach()), iterations, iterations < max_iter
