"""Linear probe: L2-regularized logistic regression on standardized features.

The objective is scikit-learn's, ``C·Σ loss + ½‖W‖²``, written per sample as
``mean loss + (λ/2)‖W‖²`` with ``λ = 1/(C·n)`` (the intercept is not penalized). Single-label
sets use the multinomial (softmax) loss; multi-label sets (several 0/1 label columns, -1 for
unknown) use one sigmoid per column. Optimization is full-batch L-BFGS in float32 (torch:
BLAS on CPU, cuBLAS on GPU) whose loss and gradient are summed over row blocks, so a
feature set streamed from Zarr is optimized exactly like one held in memory.

:func:`sweep` chooses λ on the validation split along a warm-started regularization path
(coarse grid from strong to weak, stopped once validation accuracy falls; then a finer step
around the best), stopping each fit when validation accuracy stops improving, and refits the
best λ on train+val.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from bob_cache.errors import SpecError
from bob_cache.probes.features import Features, Standardizer

COARSE = tuple(10.0**-k for k in range(0, 7))  # λ from strong to weak regularization
COARSE_ROWS = 20_000


@dataclass
class LinearModel:
    """Weights over standardized features; :meth:`scores` returns logits."""

    weight: np.ndarray
    bias: np.ndarray
    standardizer: Standardizer
    lam: float
    iterations: int = 0

    def scores(self, features: Features) -> np.ndarray:
        blocks = [self.standardizer(b) @ self.weight.T + self.bias for b in features.blocks()]
        return np.concatenate(blocks) if blocks else np.zeros((0, len(self.bias)), np.float32)


@dataclass
class SweepResult:
    """The refit model and the path that chose its λ."""

    model: LinearModel
    lam: float
    C: float
    val_score: float
    path: list[dict[str, float]] = field(default_factory=list)


class _Blocks:
    """Standardized (rows, labels) tensor blocks on the device; cached when in memory."""

    def __init__(
        self, features: Features, labels: np.ndarray, std: Standardizer, device: torch.device
    ):
        self.features, self.labels, self.std, self.device = features, labels, std, device
        self.n = features.n
        self.multilabel = labels.ndim == 2
        self._cache = None if features.is_streamed else list(self._make())

    def _make(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        start = 0
        for block in self.features.blocks():
            y = self.labels[start : start + len(block)]
            start += len(block)
            x = torch.from_numpy(self.std(block)).to(self.device)
            yt = torch.from_numpy(y).to(self.device)
            yield x, (yt.float() if self.multilabel else yt.long())

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return iter(self._cache) if self._cache is not None else self._make()


def _block_loss(logits: torch.Tensor, y: torch.Tensor, multilabel: bool) -> torch.Tensor:
    if not multilabel:
        return F.cross_entropy(logits, y, reduction="sum")
    known = y >= 0
    return F.binary_cross_entropy_with_logits(logits[known], y[known], reduction="sum")


def fit(
    blocks: _Blocks,
    n_outputs: int,
    lam: float,
    *,
    init: tuple[torch.Tensor, torch.Tensor] | None = None,
    max_iter: int = 500,
    check_every: int = 5,
    monitor: Callable[[torch.Tensor, torch.Tensor], float] | None = None,
    patience: int = 1,
    min_delta: float = 1e-3,
) -> tuple[torch.Tensor, torch.Tensor, int, float]:
    """Minimize ``mean loss + (λ/2)‖W‖²`` with L-BFGS; returns ``(W, b, iterations, score)``.

    With ``monitor`` (validation score, higher is better) the fit stops once the score has
    not risen by ``min_delta`` for ``patience`` checks, and returns the best weights seen.
    """
    dim = blocks.features.dim
    w = torch.zeros(n_outputs, dim, device=blocks.device) if init is None else init[0].clone()
    b = torch.zeros(n_outputs, device=blocks.device) if init is None else init[1].clone()
    w.requires_grad_(True)
    b.requires_grad_(True)
    opt = torch.optim.LBFGS(
        [w, b], lr=1, max_iter=check_every, max_eval=4 * check_every, history_size=10,
        line_search_fn="strong_wolfe", tolerance_grad=1e-6, tolerance_change=1e-9,
    )  # fmt: skip
    denom = blocks.n * (n_outputs if blocks.multilabel else 1)

    def closure() -> torch.Tensor:
        opt.zero_grad()
        total = torch.zeros((), device=blocks.device)
        for x, y in blocks:
            loss = _block_loss(x @ w.T + b, y, blocks.multilabel) / denom
            loss.backward()
            total += loss.detach()
        reg = 0.5 * lam * (w * w).sum()
        reg.backward()
        return total + reg.detach()

    best = (w.detach().clone(), b.detach().clone(), -np.inf)
    mark, stale, done = -np.inf, 0, 0
    while done < max_iter:
        before = opt.state[w].get("n_iter", 0)
        opt.step(closure)
        ran = opt.state[w].get("n_iter", 0) - before
        done += max(ran, 1)
        score = monitor(w.detach(), b.detach()) if monitor else 0.0
        if score > best[2]:
            best = (w.detach().clone(), b.detach().clone(), score)
        stale = 0 if score > mark + min_delta else stale + 1
        mark = max(mark, score)
        if ran < check_every or (monitor and stale >= patience):
            break
    if not monitor:
        best = (w.detach().clone(), b.detach().clone(), 0.0)
    return best[0], best[1], done, best[2]


def fit_logistic(
    train: Features,
    y: np.ndarray,
    *,
    n_outputs: int,
    C: float,
    device: torch.device | str = "cpu",
    max_iter: int = 1000,
) -> LinearModel:
    """One fit at scikit-learn's ``C`` (no validation), to convergence or ``max_iter``."""
    std = Standardizer.fit(train)
    blocks = _Blocks(train, y, std, torch.device(device))
    lam = 1.0 / (C * train.n)
    w, b, iters, _ = fit(blocks, n_outputs, lam, max_iter=max_iter)
    return LinearModel(w.cpu().numpy(), b.cpu().numpy(), std, lam, iters)


def sweep(
    train: Features,
    y_train: np.ndarray,
    val: Features,
    y_val: np.ndarray,
    *,
    n_outputs: int,
    score: Callable[[np.ndarray, np.ndarray], float],
    device: torch.device | str = "cpu",
    grid: tuple[float, ...] = COARSE,
    coarse_rows: int = COARSE_ROWS,
    refit: bool = True,
) -> SweepResult:
    """Choose λ on ``val`` along a warm-started path, then refit train+val with it.

    The coarse grid runs on a stratified subsample of at most ``coarse_rows`` training rows,
    at scikit-learn's ``C`` (a fixed prior, so λ scales with the row count). On all rows, the
    best coarse λ and one half-decade step toward its better neighbour are then fitted.

    Args:
        score: ``score(y_val, val_logits)`` to maximize (top-1 accuracy, ROC-AUC, ...).
    """
    device = torch.device(device)
    std = Standardizer.fit(train)
    full = _Blocks(train, y_train, std, device)
    val_x = torch.from_numpy(std(val.materialize())).to(device)

    def monitor(w: torch.Tensor, b: torch.Tensor) -> float:
        return score(y_val, (val_x @ w.T + b).cpu().numpy())

    path: list[dict[str, float]] = []
    rows = _subsample(y_train, coarse_rows) if train.n > 2 * coarse_rows else None
    coarse = full if rows is None else _Blocks(train.take(rows), y_train[rows], std, device)
    fits = _coarse_path(path, coarse, train.n, n_outputs, grid, monitor)
    best = max(fits, key=lambda k: fits[k][2])
    i = grid.index(best)
    stronger = fits.get(grid[i - 1]) if i > 0 else None
    weaker = fits.get(grid[i + 1]) if i + 1 < len(grid) else None
    toward = 10**0.5 if stronger and (not weaker or stronger[2] > weaker[2]) else 10**-0.5
    candidates = [best * toward] if rows is None else [best, best * toward]
    start = fits[best][:2]
    final = {} if rows is not None else fits
    for lam in candidates:
        _record(path, final, lam, full, n_outputs, start, monitor, stage="fine")
    lam = max(final, key=lambda k: final[k][2])
    w, b, val_score = final[lam]
    iters = 0
    if refit:
        both = train.concat(val)
        std = Standardizer.fit(both)
        labels = np.concatenate([y_train, y_val])
        w, b, iters, _ = fit(
            _Blocks(both, labels, std, device), n_outputs, lam, init=(w, b), max_iter=30
        )
    model = LinearModel(w.cpu().numpy(), b.cpu().numpy(), std, lam, iters)
    return SweepResult(model, lam, 1.0 / (lam * train.n), val_score, path)


def _coarse_path(
    path: list[dict[str, float]],
    blocks: _Blocks,
    n_full: int,
    n_outputs: int,
    grid: tuple[float, ...],
    monitor: Callable[[torch.Tensor, torch.Tensor], float],
) -> dict[float, tuple[torch.Tensor, torch.Tensor, float]]:
    """Strong → weak, warm-started; stops two steps after the best. Keys are full-scale λ."""
    fits: dict[float, tuple[torch.Tensor, torch.Tensor, float]] = {}
    init = None
    for lam in grid:
        init = _record(
            path, fits, lam, blocks, n_outputs, init, monitor, stage="coarse", n_full=n_full
        )
        best = max(fits, key=lambda k: fits[k][2])
        if len([k for k in fits if k < best]) >= 2:
            break
    return fits


def _subsample(labels: np.ndarray, rows: int) -> np.ndarray:
    """Sorted indices of a stratified (when possible) subsample, fixed seed."""
    from bob_cache.probes.fewshot import sample_fraction

    try:
        return sample_fraction(
            labels if labels.ndim == 1 else labels[:, 0], rows / len(labels), seed=0
        )
    except SpecError:
        return np.sort(np.random.default_rng(0).choice(len(labels), rows, replace=False))


def _record(
    path: list[dict[str, float]],
    fits: dict[float, tuple[torch.Tensor, torch.Tensor, float]],
    lam: float,
    blocks: _Blocks,
    n_outputs: int,
    init: tuple[torch.Tensor, torch.Tensor] | None,
    monitor: Callable[[torch.Tensor, torch.Tensor], float],
    *,
    stage: str,
    n_full: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit at full-scale ``lam`` (rescaled to the blocks' row count, keeping C) and log it."""
    started = time.perf_counter()
    scale = (n_full or blocks.n) / blocks.n
    w, b, iters, val_score = fit(blocks, n_outputs, lam * scale, init=init, monitor=monitor)
    fits[lam] = (w, b, val_score)
    path.append({
        "stage": stage, "rows": blocks.n, "lam": lam, "C": 1.0 / (lam * (n_full or blocks.n)),
        "val_score": val_score, "iterations": iters, "seconds": time.perf_counter() - started,
    })  # fmt: skip
    return w, b
