"""Rank correlations: between tasks, and of the overall score with model and data scale.

All correlations are Spearman's rho over ranked entries, each computed on the entries that
have both quantities; fewer than ``MIN_BACKBONES`` of them, or a constant side, gives NaN.
The p-value is a two-sided permutation test (``scipy.stats.permutation_test``, pairings):
exact over all ``n!`` orders up to ``EXACT_MAX`` entries, else ``PERMUTATIONS`` random
orders from ``numpy.random.default_rng(PERMUTATION_SEED)``. (``scipy.stats.spearmanr``'s own
p is an asymptotic t approximation: 0.000 for three points in perfect order, where no order
of three points can be rarer than 2 in 6, p = 0.33.) With fewer than ``FEW`` entries no
order is significant at 0.05: such correlations are flagged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from bob_cache.ranking.metadata import BackboneInfo

MIN_BACKBONES = 3
FEW = 5  # below: the smallest exact two-sided p is 2/n! ≥ 2/24 > 0.05
EXACT_MAX = 8  # 8! = 40,320 orders
PERMUTATIONS = 9999
PERMUTATION_SEED = 0
SCALES = {"params": "parameters", "data_images": "pretraining images"}


def spearman(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Spearman's rho and its permutation p-value (see the module doc); NaN for fewer than
    ``MIN_BACKBONES`` points or constant input."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < MIN_BACKBONES or np.ptp(x) == 0 or np.ptp(y) == 0:
        return float("nan"), float("nan")
    rx, ry = stats.rankdata(x), stats.rankdata(y)
    yc = ry - ry.mean()

    def rho(r: np.ndarray, axis: int = -1) -> np.ndarray:
        rc = r - r.mean(axis=axis, keepdims=True)
        return (rc * yc).sum(axis=axis) / np.sqrt((rc**2).sum(axis=axis) * (yc**2).sum())

    exact = len(x) <= EXACT_MAX
    result = stats.permutation_test(
        (rx,), rho, permutation_type="pairings", vectorized=True,
        n_resamples=np.inf if exact else PERMUTATIONS,
        rng=None if exact else np.random.default_rng(PERMUTATION_SEED),
    )  # fmt: skip
    return float(result.statistic), float(min(1.0, result.pvalue))


def p_value_method(n: int) -> str:
    """How :func:`spearman` computes the p-value for ``n`` points, in words."""
    if n <= EXACT_MAX:
        return "exact permutation"
    return f"permutation, {PERMUTATIONS} random orders (seed {PERMUTATION_SEED})"


def task_correlations(
    tasks: pd.DataFrame, *, order: Sequence[str] | None = None
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Spearman matrix between tasks over the entries' task scores, the entries behind each
    pair, and the p-values. ``tasks`` has columns entry (or backbone), task, z."""
    key = "entry" if "entry" in tasks else "backbone"
    wide = tasks.pivot(index=key, columns="task", values="z")
    names = [t for t in (order or []) if t in wide] + [t for t in wide if t not in (order or [])]
    rho = pd.DataFrame(np.nan, index=names, columns=names)
    p = pd.DataFrame(np.nan, index=names, columns=names)
    counts = pd.DataFrame(0, index=names, columns=names)
    for i, a in enumerate(names):
        for b in names[i:]:
            both = wide[[a, b]].dropna()
            counts.loc[a, b] = counts.loc[b, a] = len(both)
            r, pv = spearman(both[a], both[b]) if a != b else (1.0, float("nan"))
            rho.loc[a, b] = rho.loc[b, a] = r
            p.loc[a, b] = p.loc[b, a] = pv
    return rho, counts, p


def scale_analysis(overall: pd.DataFrame, infos: Mapping[str, BackboneInfo]) -> pd.DataFrame:
    """Spearman of overall z against parameters and pretraining images, over all entries
    and per architecture family. Entries without the quantity are excluded and named."""
    key = "entry" if "entry" in overall else "backbone"
    frame = overall.set_index(key)[["z"]].copy()
    backbones = overall.set_index(key)["backbone"]
    for field in SCALES:
        frame[field] = [getattr(infos[backbones[e]], field) for e in frame.index]
    frame["family"] = [infos[backbones[e]].family or "unknown" for e in frame.index]
    rows = []
    for field, label in SCALES.items():
        groups = [("all", frame), *frame.groupby("family", sort=True)]
        for group, part in groups:
            known = part[part[field].notna()]
            rho, p = spearman(known["z"], known[field].astype(float))
            excluded = sorted(part.index[part[field].isna()])
            how = p_value_method(len(known)) if np.isfinite(p) else ""
            rows.append({"against": label, "family": group, "backbones": len(known),
                         "rho": rho, "p_value": p, "p_method": how,
                         "excluded": ", ".join(excluded)})  # fmt: skip
    return pd.DataFrame(rows)
