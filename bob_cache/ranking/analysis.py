"""Rank correlations: between tasks, and of the overall score with model and data scale.

All correlations are Spearman's (``scipy.stats.spearmanr``) over backbones, each computed on
the backbones that have both quantities; fewer than ``MIN_BACKBONES`` of them gives NaN.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
from scipy import stats

from bob_cache.ranking.metadata import BackboneInfo

MIN_BACKBONES = 3
SCALES = {"params": "parameters", "data_images": "pretraining images"}


def spearman(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Spearman's rho and its p-value; NaN for fewer than ``MIN_BACKBONES`` or constant input."""
    if len(x) < MIN_BACKBONES:
        return float("nan"), float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", stats.ConstantInputWarning)
        result = stats.spearmanr(x, y)
    return float(result.statistic), float(result.pvalue)


def task_correlations(
    tasks: pd.DataFrame, *, order: Sequence[str] | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Spearman matrix between tasks over backbones' task scores, and the backbones behind
    each pair. ``tasks`` has columns backbone, task, z (from ``score_settings``)."""
    wide = tasks.pivot(index="backbone", columns="task", values="z")
    names = [t for t in (order or []) if t in wide] + [t for t in wide if t not in (order or [])]
    rho = pd.DataFrame(np.nan, index=names, columns=names)
    counts = pd.DataFrame(0, index=names, columns=names)
    for a in names:
        for b in names:
            both = wide[[a, b]].dropna()
            counts.loc[a, b] = len(both)
            rho.loc[a, b] = spearman(both[a], both[b])[0] if a != b else 1.0
    return rho, counts


def scale_analysis(overall: pd.DataFrame, infos: Mapping[str, BackboneInfo]) -> pd.DataFrame:
    """Spearman of overall z against parameters and pretraining images, over all backbones
    and per architecture family. Backbones without the quantity are excluded and named."""
    frame = overall.set_index("backbone")[["z"]].copy()
    for field in SCALES:
        frame[field] = [getattr(infos[b], field) for b in frame.index]
    frame["family"] = [infos[b].family or "unknown" for b in frame.index]
    rows = []
    for field, label in SCALES.items():
        groups = [("all", frame), *frame.groupby("family", sort=True)]
        for group, part in groups:
            known = part[part[field].notna()]
            rho, p = spearman(known["z"], known[field].astype(float))
            excluded = sorted(part.index[part[field].isna()])
            rows.append({"against": label, "family": group, "backbones": len(known),
                         "rho": rho, "p_value": p, "excluded": ", ".join(excluded)})  # fmt: skip
    return pd.DataFrame(rows)
