"""The logistic objective over row blocks, and the preconditioned L-BFGS that minimizes it.

``Σ loss / n + (λ/2)‖W‖²`` at weights over standardized features, ``n`` the rows: with
``λ = 1/(C·n)`` it is scikit-learn's ``C·Σ loss + ½‖W‖²`` divided by ``C·n``. Single-label
sums the softmax loss of every row; multi-label sums each label's sigmoid loss over the rows
where that label is known (unknown, -1, entries add nothing), which is every label's own
binary logistic regression on its known rows.

The exact objective works in float32 on the raw rows with the standardization folded into
the weights, so neither a standardized copy nor a streamed feature set is ever held whole.
The reported model of a small problem (:data:`SMALL_WORK`) is fitted in float64
(:func:`final_dtype`): its tight tolerance needs loss decreases that a float32 loss does not
resolve. On large in-memory problems, where the hardware has fast bfloat16 matrix products
(AVX512-BF16 or AMX CPUs, CUDA GPUs), a bfloat16 twin on a standardized copy (2 bytes per
value) does the bulk of the iterations and the exact objective finishes: the stopping rule
is always checked on the float32 objective.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F

from bob_cache.probes.features import Features, Standardizer
from bob_cache.probes.precondition import Preconditioner

FINAL_GTOL = 1e-4  # the reported model: scikit-learn's default tolerance ...
SMALL_GTOL = 1e-6  # ... or tighter where a fit costs well under a second
SMALL_WORK = 2e8  # rows × dim × outputs of such a fit
WATCH_ROWS = 20_000  # training rows whose predictions tell a large fit has settled
CHUNK = 5  # iterations between checks of the stopping rule
MAX_ITER = 2000
RESOLUTION = 4  # machine epsilons: the relative loss change a loss in that dtype resolves
CHANGE_TOL = {torch.float32: 1e-12, torch.float64: 1e-20}  # L-BFGS's tolerance_change
CACHE_BYTES = 2**30  # rows (in the fit's dtype) kept between evaluations up to this size
BF16_MIN_WORK = 5e9  # rows × dim × outputs above which the bfloat16 twin pays off

Weights = tuple[torch.Tensor, torch.Tensor]
logger = logging.getLogger(__name__)


class Objective:
    """``Σ loss / n + (λ/2)‖W‖²`` over ``features`` and its gradient, block by block."""

    def __init__(
        self,
        features: Features,
        labels: np.ndarray,
        std: Standardizer,
        n_outputs: int,
        device: torch.device,
        *,
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.features, self.n, self.n_outputs, self.device = features, features.n, n_outputs, device
        self.standardizer, self.dtype = std, dtype
        self.multilabel = labels.ndim == 2
        y = torch.from_numpy(labels)
        self.labels = y.to(dtype) if self.multilabel else y.long()
        self.mean = torch.from_numpy(std.mean).to(device, dtype)
        self.std = torch.from_numpy(std.std).to(device, dtype)
        # rows stay where they are unless a copy is cheap (or they must move to a GPU)
        small = features.n * features.dim * dtype.itemsize <= CACHE_BYTES
        keep = not features.is_streamed and (small or device.type != "cpu")
        self._cache = list(self._blocks()) if keep else None
        self.fast = _Bf16Twin(self) if _bf16_pays_off(self) else None

    @functools.cached_property
    def preconditioner(self) -> Preconditioner:
        """The L-BFGS preconditioner from these rows' second moments (computed once)."""
        return Preconditioner.fit(self.features, self.standardizer, self.device)

    def _blocks(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        start = 0
        for block in self.features.blocks():
            y = self.labels[start : start + len(block)]
            start += len(block)
            yield torch.from_numpy(block).to(self.device, self.dtype), y.to(self.device)

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
        gw = (gw - gb[:, None] * self.mean[None, :]) / self.std  # back to standardized space
        return self.regularized(total, gw, gb, w, lam)

    def regularized(
        self, total: float, gw: torch.Tensor, gb: torch.Tensor, w: torch.Tensor, lam: float
    ) -> tuple[float, Weights]:
        """Summed loss and gradient → divided by the rows ``n``, plus ``(λ/2)‖W‖²``.

        Multi-label: the sum runs over the known entries only, and is divided by ``n`` too
        (not by the entries): times ``C·n`` it is scikit-learn's objective of every label.
        """
        loss = total / self.n + 0.5 * lam * float((w * w).sum())
        return loss, (gw / self.n + lam * w, gb / self.n)

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
        dim = exact.features.dim
        self.width = -(-(dim + 1) // 16) * 16  # a column of ones (the intercept), padded
        self.blocks = []
        for x, y in exact._blocks():
            z = torch.zeros(len(x), self.width, dtype=torch.bfloat16, device=x.device)
            z[:, :dim] = (x - exact.mean) / exact.std
            z[:, dim] = 1
            self.blocks.append((z, y))

    @torch.no_grad()
    def __call__(self, w: torch.Tensor, b: torch.Tensor, lam: float) -> tuple[float, Weights]:
        exact, dim = self.exact, w.shape[1]
        wb = torch.zeros(len(w), self.width, dtype=torch.bfloat16, device=w.device)
        wb[:, :dim], wb[:, dim] = w, b
        g = torch.zeros(wb.shape, device=w.device)
        total = 0.0
        for z, y in self.blocks:
            residual, loss = self._residual(torch.mm(z, wb.T), y)
            total += loss
            g += torch.mm(residual.T, z).float()
        return exact.regularized(total, g[:, :dim], g[:, dim], w, lam)

    def _residual(self, logits: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, float]:
        """bfloat16 dloss/dlogits and the summed loss (softmax fused, in float32)."""
        if self.exact.multilabel:
            full = logits.float()
            loss = self.exact._loss_and_residual(full, y)
            return full.to(torch.bfloat16), loss
        p = torch.softmax(logits, 1, dtype=torch.float32)
        rows = torch.arange(len(y), device=y.device)
        loss = -float(p[rows, y].clamp_min(1e-30).log().sum())
        p[rows, y] -= 1
        return p.to(torch.bfloat16), loss


def _bf16_pays_off(objective: Objective) -> bool:
    work = objective.n * objective.features.dim * objective.n_outputs
    if work < BF16_MIN_WORK or objective.features.is_streamed or objective.dtype != torch.float32:
        return False
    if objective.device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return objective.device.type == "cpu" and torch.ops.mkldnn._is_mkldnn_bf16_supported()


@dataclass(frozen=True)
class Stop:
    """When a fit is done: its largest gradient entry is ≤ ``gtol``, or, with ``watch`` rows,
    their predictions have settled: at most a ``changed`` share of them (rows × outputs for
    multi-label) moved over the last ``window`` iterations. ``rtol`` also asks the gradient
    to fall to ``rtol`` times its value at a warm start (which at a slightly weaker
    regularization begins small, ``Δλ·W``, and an absolute tolerance would accept at once)."""

    gtol: float
    watch: torch.Tensor | None = None  # standardized rows
    changed: float = 1e-3
    window: int = 10
    rtol: float | None = None


def final_stop(objective: Objective, train: Features, std: Standardizer) -> Stop:
    """The reported model's rule: a tight gradient tolerance where fits are cheap; on large
    problems scikit-learn's default tolerance, or predictions on up to ``WATCH_ROWS`` of the
    training rows that no longer move (0.1% over 10 iterations)."""
    work = objective.n * objective.features.dim * objective.n_outputs
    if work <= SMALL_WORK:
        return Stop(SMALL_GTOL)
    rows = np.linspace(0, train.n - 1, min(train.n, WATCH_ROWS)).astype(np.int64)
    watch = torch.from_numpy(std(train.take(np.unique(rows)).materialize()))
    return Stop(FINAL_GTOL, watch.to(objective.device))


def final_dtype(n: int, dim: int, n_outputs: int, device: torch.device) -> torch.dtype:
    """float64 for a small problem's reported model (its gradient tolerance,
    :data:`SMALL_GTOL`, needs loss decreases that float32 does not resolve), else float32."""
    small = n * dim * n_outputs <= SMALL_WORK
    return torch.float64 if small and device.type in ("cpu", "cuda") else torch.float32


def minimize(
    objective: Objective,
    lam: float,
    stop: Stop,
    *,
    init: Weights | None = None,
    max_iter: int = MAX_ITER,
) -> tuple[Weights, int, bool]:
    """L-BFGS until ``stop`` says done; ``((W, b), iterations, converged)``.

    L-BFGS runs on preconditioned weights (:mod:`bob_cache.probes.precondition`); ``stop``
    reads the gradient in ``W`` itself. With a bfloat16 twin, the twin runs first (to half
    the gradient tolerance: its gradient is approximate), then the same L-BFGS, its
    curvature history kept, continues on the exact objective, its predictions compared with
    the twin's. converged is True only when ``stop`` is met; False when ``max_iter`` stopped
    the fit, or when it stalled first (the loss no longer decreases in its dtype, by L-BFGS's
    change tolerance or line searches that find no decrease, while the gradient is still
    above ``stop.gtol``).
    """
    k, dim, dtype = objective.n_outputs, objective.features.dim, objective.dtype
    start = init or (torch.zeros(k, dim), torch.zeros(k))
    w, b = (t.detach().to(objective.device, dtype).clone() for t in start)
    if stop.rtol is not None and init is not None:
        _, (gw, gb) = (objective.fast or objective)(w, b, lam)
        stop = replace(stop, gtol=min(stop.gtol, stop.rtol * _largest(gw, gb)))
    pre = objective.preconditioner
    v = pre.params(w).contiguous()
    opt = torch.optim.LBFGS(
        [v, b], lr=1, max_iter=CHUNK, max_eval=4 * CHUNK, history_size=10,
        line_search_fn="strong_wolfe", tolerance_grad=stop.gtol, tolerance_change=CHANGE_TOL[dtype],
    )  # fmt: skip
    seen = None
    if objective.fast is not None:
        _run(opt, _Closure(objective.fast, pre, lam, opt), replace(stop, gtol=stop.gtol / 2),
             max_iter, None)  # fmt: skip
        seen = _predict(objective, stop, (pre.weights(v), b))
    converged = _run(opt, _Closure(objective, pre, lam, opt), stop, max_iter, seen)
    weights = (pre.weights(v).detach().float(), b.detach().float())
    return weights, int(opt.state[v].get("n_iter", 0)), converged


def _largest(gw: torch.Tensor, gb: torch.Tensor) -> float:
    return max(float(gw.abs().max()), float(gb.abs().max()))


def _predict(objective: Objective, stop: Stop, weights: Weights) -> torch.Tensor | None:
    """Predicted classes (multi-label: every output's yes/no) of the watched rows."""
    if stop.watch is None:
        return None
    logits = stop.watch.to(weights[0].dtype) @ weights[0].T + weights[1]
    return logits > 0 if objective.multilabel else logits.argmax(1)


class _Closure:
    """L-BFGS's closure over ``(V, b)``. It keeps its last point, so evaluating there again
    (L-BFGS does at every ``step``, and :func:`_run` to read the gradient) costs nothing."""

    def __init__(
        self, fn: Objective | _Bf16Twin, pre: Preconditioner, lam: float, opt: torch.optim.LBFGS
    ) -> None:
        self.fn, self.pre, self.lam = fn, pre, lam
        self.v, self.b = opt.param_groups[0]["params"]
        self.last: tuple[torch.Tensor, torch.Tensor, float, torch.Tensor, torch.Tensor] | None
        self.last = None
        self.evaluations, self.started = 0, time.perf_counter()

    def evaluate(self) -> tuple[float, torch.Tensor, torch.Tensor]:
        """Loss and ``W``-space gradient at the current ``(V, b)``."""
        last = self.last
        if last is not None and torch.equal(last[0], self.v) and torch.equal(last[1], self.b):
            return last[2], last[3], last[4]
        loss, (gw, gb) = self.fn(self.pre.weights(self.v), self.b, self.lam)
        self.last = (self.v.detach().clone(), self.b.detach().clone(), loss, gw, gb)
        self.evaluations += 1
        if self.evaluations % 10 == 0:
            logger.info(
                "%s L-BFGS: %d evaluations, loss %.6f, largest gradient %.2e, %.0f s",
                type(self.fn).__name__, self.evaluations, loss, _largest(gw, gb),
                time.perf_counter() - self.started,
            )  # fmt: skip
        return loss, gw, gb

    def __call__(self) -> torch.Tensor:
        loss, gw, gb = self.evaluate()
        self.v.grad, self.b.grad = self.pre.gradient(gw), gb.clone()
        return torch.tensor(loss, dtype=torch.float64)  # L-BFGS reads it as a Python float

    def largest_gradient(self) -> tuple[float, float]:
        """The largest gradient entry at the current point, in ``W`` and in ``V``."""
        _, gw, gb = self.evaluate()
        return _largest(gw, gb), _largest(self.pre.gradient(gw), gb)


def _run(
    opt: torch.optim.LBFGS, closure: _Closure, stop: Stop, max_iter: int, seen: torch.Tensor | None
) -> bool:
    """Step ``opt`` in chunks, checking ``stop`` between them; False at ``max_iter`` or at a
    stall before ``stop`` is met."""
    v, b = closure.v, closure.b
    fn = closure.fn
    objective = fn.exact if isinstance(fn, _Bf16Twin) else fn
    lag = max(stop.window // CHUNK, 1)
    history = [] if seen is None else [seen] * lag
    group = opt.param_groups[0]
    group["tolerance_grad"] = stop.gtol  # L-BFGS's own test, in V: a hint, checked in W below
    before = int(opt.state[v].get("n_iter", 0))
    iterations = 0
    while iterations < max_iter:
        evaluations, loss = int(opt.state[v].get("func_evals", 0)), closure.evaluate()[0]
        opt.step(closure)
        ran = int(opt.state[v].get("n_iter", 0)) - before - iterations
        iterations += ran
        in_w, in_v = closure.largest_gradient()
        if in_w <= stop.gtol:
            return True
        if ran < CHUNK:  # L-BFGS ended the chunk early: why?
            if int(opt.state[v]["func_evals"]) - evaluations >= group["max_eval"]:
                resolved = RESOLUTION * torch.finfo(objective.dtype).eps * abs(loss)
                if loss - closure.evaluate()[0] <= resolved:
                    return _stalled(in_w, stop)  # no decrease that the dtype resolves
            elif in_v > group["tolerance_grad"]:
                return _stalled(in_w, stop)  # no more decrease (L-BFGS's change tolerance)
            else:
                group["tolerance_grad"] = in_v / 2  # small in V, not yet in W: go on
        if stop.watch is None:
            continue
        history.append(_predict(objective, stop, (closure.pre.weights(v), b)))
        if len(history) > lag and _share_changed(history[-1], history[-1 - lag]) <= stop.changed:
            return True
    return False


def _stalled(largest: float, stop: Stop) -> bool:
    """A fit that can make no more progress before ``stop`` is met: not converged (False)."""
    logger.info(
        "L-BFGS stalled: the loss no longer decreases in its dtype, largest gradient %.2e > %.2e",
        largest, stop.gtol,
    )  # fmt: skip
    return False


def _share_changed(now: torch.Tensor, before: torch.Tensor) -> float:
    return float((now != before).float().mean())
