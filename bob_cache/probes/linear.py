"""Linear probe: L2-regularized logistic regression on standardized features.

The objective is scikit-learn's, ``C·Σ loss + ½‖W‖²``, written per sample as
``Σ loss / n + (λ/2)‖W‖²`` with ``λ = 1/(C·n)`` (the intercept is not penalized). Single-label
sets use the multinomial (softmax) loss. Multi-label sets (several 0/1 label columns, -1 for
unknown) use one sigmoid per column, summed over the rows where that label is known: at the
same C, each column's weights are scikit-learn's ``LogisticRegression(C=C)`` fitted on that
label's known rows alone (``OneVsRestClassifier`` over the known labels). Optimization is
full-batch L-BFGS, preconditioned by the features' second moments
(:mod:`bob_cache.probes.objective`, :mod:`~bob_cache.probes.precondition`).

Two protocols choose C (both state exactly which rows trained, chose and were refit):

* :func:`sweep` (the full training split, VTAB/CLIP style): C is chosen on the validation
  split along a warm-started path, then refit on train + val.
* :func:`sweep_cv` (few-shot and fraction subsets): C is chosen by stratified
  cross-validation inside the subset and refit on the subset alone, so the fit never sees a
  label outside it; with one row in some class it falls back to :data:`FIXED_C`.

Every reported model is fitted to convergence (:func:`~bob_cache.probes.objective.final_stop`);
one that stopped short (iteration cap, or a float32 stall) has ``converged=False``, a warning
in the log, and says so in its ``protocol``.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch

from bob_cache.probes.features import Features, Standardizer
from bob_cache.probes.objective import (
    MAX_ITER,
    Objective,
    Stop,
    Weights,
    final_dtype,
    final_stop,
    minimize,
)

COARSE = tuple(10.0**-k for k in range(0, 7))  # λ (at the training size) strong → weak
COARSE_ROWS = 20_000
FIXED_C = 1.0  # scikit-learn's default, for subsets too small to cross-validate
PATH_GTOL = 1e-3  # fits that only choose C: gradient ≤ 1e-3 and a tenth of its start, ...
PATH_RTOL = 0.1
PATH_CHANGED = 1e-2  # ... or validation predictions settled (1% moved over 10 iterations)

Score = Callable[[np.ndarray, np.ndarray], float]
logger = logging.getLogger(__name__)


def _note(log: list[dict[str, float]], **entry: float | str) -> None:
    """Append one fit to the path log (and to the ``bob_cache`` logger at INFO)."""
    log.append(entry)
    logger.info("linear probe fit: %s", entry)


@dataclass
class LinearModel:
    """Weights over standardized features; :meth:`scores` returns logits."""

    weight: np.ndarray
    bias: np.ndarray
    standardizer: Standardizer
    C: float
    iterations: int = 0
    converged: bool = True

    def scores(self, features: Features) -> np.ndarray:
        blocks = [self.standardizer(b) @ self.weight.T + self.bias for b in features.blocks()]
        return np.concatenate(blocks) if blocks else np.zeros((0, len(self.bias)), np.float32)


@dataclass
class SweepResult:
    """The reported model, the C that was chosen, and how (the rows each step used)."""

    model: LinearModel
    C: float
    val_score: float
    train_rows: int  # labelled training rows (the reported model was fitted on them)
    val_rows: int  # labelled rows that chose C (disjoint; ``protocol`` says if refit on too)
    protocol: str
    path: list[dict[str, float]] = field(default_factory=list)


def fit_logistic(
    train: Features,
    y: np.ndarray,
    *,
    n_outputs: int,
    C: float,
    device: torch.device | str = "cpu",
    init: Weights | None = None,
    gtol: float | None = None,
    max_iter: int = MAX_ITER,
) -> LinearModel:
    """One fit at scikit-learn's ``C`` on standardized ``train``, to convergence.

    ``gtol`` (a pure gradient tolerance) replaces the default rule,
    :func:`~bob_cache.probes.objective.final_stop`.
    """
    device = torch.device(device)
    std = Standardizer.fit(train)
    dtype = final_dtype(train.n, train.dim, n_outputs, device)
    objective = Objective(train, y, std, n_outputs, device, dtype=dtype)
    stop = Stop(gtol) if gtol else final_stop(objective, train, std)
    (w, b), iters, ok = minimize(objective, 1.0 / (C * train.n), stop, init=init, max_iter=max_iter)
    if not ok:
        logger.warning(
            "linear probe at C=%g on %d rows stopped after %d iterations before converging",
            C, train.n, iters,
        )  # fmt: skip
    return LinearModel(w.cpu().numpy(), b.cpu().numpy(), std, C, iters, ok)


class _Path:
    """Warm-started fits at several C on one training set, scored on one validation set."""

    def __init__(
        self,
        train: Features,
        y_train: np.ndarray,
        val: Features,
        y_val: np.ndarray,
        *,
        n_outputs: int,
        score: Score,
        device: torch.device,
        log: list[dict[str, float]],
        stage: str,
    ) -> None:
        self.std = Standardizer.fit(train)
        self.objective = Objective(train, y_train, self.std, n_outputs, device)
        self.val_x = torch.from_numpy(self.std(val.materialize())).to(device)
        self.stop = Stop(PATH_GTOL, self.val_x, changed=PATH_CHANGED, rtol=PATH_RTOL)
        self.y_val, self.score, self.log, self.stage = y_val, score, log, stage
        self.fits: dict[float, tuple[Weights, float]] = {}

    def fit(self, C: float, init: Weights | None) -> Weights:
        started = time.perf_counter()
        lam = 1.0 / (C * self.objective.n)
        (w, b), iters, _ = minimize(self.objective, lam, self.stop, init=init)
        val = self.score(self.y_val, (self.val_x @ w.T + b).cpu().numpy())
        self.fits[C] = ((w, b), val)
        _note(
            self.log, stage=self.stage, rows=self.objective.n, C=C, val_score=val,
            iterations=iters, seconds=time.perf_counter() - started,
        )  # fmt: skip
        return w, b

    def run(self, grid: tuple[float, ...], *, stop_early: bool = True) -> dict[float, float]:
        """Fit ``grid`` (strong → weak); stops two steps past the best when ``stop_early``."""
        init = None
        for C in grid:
            init = self.fit(C, init)
            best = max(self.fits, key=lambda c: self.fits[c][1])
            if stop_early and len([c for c in self.fits if c > best]) >= 2:
                break
        return {c: v for c, (_, v) in self.fits.items()}


def sweep(
    train: Features,
    y_train: np.ndarray,
    val: Features,
    y_val: np.ndarray,
    *,
    n_outputs: int,
    score: Score,
    device: torch.device | str = "cpu",
    grid: tuple[float, ...] = COARSE,
    coarse_rows: int | None = None,
    refit: bool = True,
) -> SweepResult:
    """Choose C on ``val`` along a warm-started path, then refit train+val with it, converged.

    The grid holds λ values at the training size (``C = 1/(λ·n_train)``), fitted from strong
    to weak and stopped two steps past the best, then half a decade from the best toward its
    better neighbour. When train holds more than twice ``coarse_rows`` rows (default: the
    larger of 20,000 and 50 per output), the path runs on a stratified subsample of that
    many rows at the same C values, and all rows are fitted once, at the chosen C.
    ``refit=False`` fits train alone instead of train+val.

    Args:
        score: ``score(y_val, val_logits)`` to maximize (top-1 accuracy, ROC-AUC, ...).
    """
    device = torch.device(device)
    log: list[dict[str, float]] = []
    Cs = tuple(1.0 / (lam * train.n) for lam in grid)
    coarse_rows = coarse_rows or max(COARSE_ROWS, 50 * n_outputs)
    rows = _subsample(y_train, coarse_rows) if train.n > 2 * coarse_rows else None
    sub, y_sub = (train, y_train) if rows is None else (train.take(rows), y_train[rows])
    path = _Path(
        sub, y_sub, val, y_val, n_outputs=n_outputs, score=score, device=device, log=log,
        stage="coarse" if rows is None else f"coarse on {len(rows)} rows",
    )  # fmt: skip
    scores = path.run(Cs)
    best = max(scores, key=scores.get)
    path.fit(_step_toward_better_neighbour(Cs, scores, best), path.fits[best][0])
    C = max(path.fits, key=lambda c: path.fits[c][1])
    (w, b), val_score = path.fits[C]
    if refit:
        rows_fit, labels = train.concat(val), np.concatenate([y_train, y_val])
        how = "C chosen on val_rows, refit on train_rows + val_rows"
    else:
        rows_fit, labels, how = train, y_train, "C chosen on val_rows, fitted on train_rows"
    started = time.perf_counter()
    model = fit_logistic(rows_fit, labels, n_outputs=n_outputs, C=C, device=device, init=(w, b))
    _note(
        log, stage="final", rows=rows_fit.n, C=C, val_score=float("nan"),
        iterations=model.iterations, seconds=time.perf_counter() - started,
    )  # fmt: skip
    return SweepResult(model, C, val_score, train.n, val.n, _noted(how, model), log)


def sweep_cv(
    train: Features,
    y_train: np.ndarray,
    folds: np.ndarray | None,
    *,
    n_outputs: int,
    score: Score,
    device: torch.device | str = "cpu",
    grid: tuple[float, ...] = COARSE,
    max_rows_all_folds: int = COARSE_ROWS,
) -> SweepResult:
    """Choose C by cross-validation inside ``train`` and refit on all of it, converged.

    ``folds`` gives each row's fold (:func:`~bob_cache.probes.fewshot.cv_folds`). The first
    fold runs the path (``C = 1/(λ·n)`` for ``grid``, stopped two steps past the best); the
    other folds fit the same values, and the best mean validation score wins (ties: the
    stronger regularization). Subsets over ``max_rows_all_folds`` rows use the first fold
    only (one split inside the subset). ``folds=None`` (a class with a single row) fits
    :data:`FIXED_C` and says so in ``protocol``.
    """
    device = torch.device(device)
    if folds is None:
        model = fit_logistic(train, y_train, n_outputs=n_outputs, C=FIXED_C, device=device)
        how = f"fixed C={FIXED_C:g} (a class has one row: too few to cross-validate)"
        return SweepResult(model, FIXED_C, float("nan"), train.n, 0, _noted(how, model))
    log: list[dict[str, float]] = []
    n_folds = int(folds.max()) + 1
    used = range(n_folds) if train.n <= max_rows_all_folds else range(1)
    Cs = tuple(1.0 / (lam * train.n) for lam in grid)
    totals: dict[float, list[float]] = {}
    for fold in used:
        inside, held = np.flatnonzero(folds != fold), np.flatnonzero(folds == fold)
        path = _Path(
            train.take(inside), y_train[inside], train.take(held), y_train[held],
            n_outputs=n_outputs, score=score, device=device, log=log, stage=f"cv{fold}",
        )  # fmt: skip
        scores = path.run(Cs if fold == 0 else tuple(totals), stop_early=fold == 0)
        for C, value in scores.items():
            totals.setdefault(C, []).append(value)
    means = {C: float(np.mean(v)) for C, v in totals.items()}
    C = max(sorted(means), key=means.get)  # ascending C: ties go to the stronger prior
    model = fit_logistic(train, y_train, n_outputs=n_outputs, C=C, device=device)
    how = (
        f"C chosen by {n_folds}-fold cross-validation inside the subset, refit on it"
        if len(used) > 1
        else f"C chosen on 1 of {n_folds} folds inside the subset, refit on it"
    )
    return SweepResult(model, C, means[C], train.n, 0, _noted(how, model), log)


def _noted(protocol: str, model: LinearModel) -> str:
    """``protocol``, plus a note when the reported model stopped before converging."""
    if model.converged:
        return protocol
    return f"{protocol}; NOT CONVERGED: the final fit stopped after {model.iterations} iterations"


def _step_toward_better_neighbour(
    Cs: tuple[float, ...], scores: dict[float, float], best: float
) -> float:
    """Half a decade from ``best`` toward whichever fitted neighbour scored higher."""
    i = Cs.index(best)
    stronger = scores.get(Cs[i - 1]) if i > 0 else None
    weaker = scores.get(Cs[i + 1]) if i + 1 < len(Cs) else None
    toward_stronger = stronger is not None and (weaker is None or stronger > weaker)
    return best * (10**-0.5 if toward_stronger else 10**0.5)


def _subsample(labels: np.ndarray, rows: int) -> np.ndarray:
    """Sorted indices of a stratified (when possible) subsample, fixed seed."""
    from sklearn.model_selection import train_test_split

    strata = labels if labels.ndim == 1 else labels[:, 0]
    everything = np.arange(len(labels))
    try:
        picked, _ = train_test_split(everything, train_size=rows, stratify=strata, random_state=0)
    except ValueError:  # a class too small to stratify
        picked, _ = train_test_split(everything, train_size=rows, random_state=0)
    return np.sort(picked)
