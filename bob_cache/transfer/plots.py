"""The agreement scatter: each estimate against the measured outcome, one point per backbone."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from bob_cache.transfer.agreement import (
    DEFAULT_OUTCOMES,
    Outcome,
    agreement_points,
    correlations,
)

DPI = 110


def plot_agreement(
    frame: pd.DataFrame,
    path: str | Path,
    *,
    dataset: str,
    outcome: str = "linear",
    table: pd.DataFrame | None = None,
    outcomes: Sequence[Outcome] = DEFAULT_OUTCOMES,
    random_init: Collection[str] | Callable[[str], bool] | None = None,
) -> Path | None:
    """Draw one panel per estimator (estimate on x, ``outcome`` on y) for ``dataset`` into a
    PNG at ``path``; random-init backbones are hollow squares, pretrained ones filled dots.

    Args:
        frame: results-table rows (as for :func:`agreement_table`).
        path: the PNG to write (its folder must exist).
        dataset: the dataset whose entries are drawn.
        outcome: the outcome on the y axis (``linear``, ``linear-bob`` or ``finetune``).
        table: :func:`agreement_table`'s result, for the intervals in the panel titles
            (default: point estimates of ρ and τ only).
        outcomes, random_init: as for :func:`agreement_points`.

    Returns:
        ``path``, or None (nothing written) when ``dataset`` has no estimate paired with
        ``outcome``.
    """
    from bob_cache.extras import require

    require("report", "The transferability scatter plot")
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    points = agreement_points(frame, outcomes=outcomes, random_init=random_init)
    points = points[(points["dataset"] == dataset) & (points["outcome"] == outcome)]
    if points.empty:
        return None
    estimators = list(dict.fromkeys(points["estimator"]))
    cols = min(3, len(estimators))
    rows = math.ceil(len(estimators) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.6 * rows), squeeze=False)
    for ax, estimator in zip(axes.flat, estimators, strict=False):
        _panel(ax, points[points["estimator"] == estimator], table, dataset, outcome)
    for ax in list(axes.flat)[len(estimators) :]:
        ax.set_visible(False)
    fig.suptitle(f"{dataset}: transferability estimates against {outcome} {_metric(points)}")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _panel(ax: object, group: pd.DataFrame, table: pd.DataFrame | None, dataset: str,
           outcome: str) -> None:  # fmt: skip
    estimator = group["estimator"].iloc[0]
    for random_init, marker in ((False, "o"), (True, "s")):
        part = group[group["random_init"] == random_init]
        if not part.empty:
            ax.scatter(part["estimate"], part["outcome_value"], marker=marker, s=42,
                       facecolors="none" if random_init else "C0", edgecolors="C3" if random_init
                       else "C0", label="random init" if random_init else "pretrained")  # fmt: skip
    for _, row in group.iterrows():
        ax.annotate(str(row["entry"]), (row["estimate"], row["outcome_value"]), fontsize=7,
                    xytext=(3, 3), textcoords="offset points")  # fmt: skip
    ax.set_xlabel(f"{estimator} ({group['metric'].iloc[0]})")
    ax.set_ylabel(f"{outcome} {group['outcome_metric'].iloc[0]}")
    ax.set_title(_title(group, table, dataset, outcome), fontsize=9)
    ax.legend(fontsize=7, loc="best")


def _title(group: pd.DataFrame, table: pd.DataFrame | None, dataset: str, outcome: str) -> str:
    estimator = group["estimator"].iloc[0]
    n = len(group)
    if table is not None:
        hit = table[(table["dataset"] == dataset) & (table["estimator"] == estimator)
                    & (table["outcome"] == outcome)]  # fmt: skip
        if not hit.empty and pd.notna(hit["spearman"].iloc[0]):
            r = hit.iloc[0]
            interval = (
                f" [{r['spearman_low']:.2f}, {r['spearman_high']:.2f}]"
                if pd.notna(r["spearman_low"])
                else ""
            )
            rho, tau = r["spearman"], r["weighted_tau"]
            return f"{estimator}: ρ = {rho:.2f}{interval}, τw = {tau:.2f}, n = {n}"
    rho, tau = correlations(
        group["estimate"].to_numpy(float), group["outcome_value"].to_numpy(float)
    )
    if np.isnan(rho):
        return f"{estimator}: n = {n}"
    return f"{estimator}: ρ = {rho:.2f}, τw = {tau:.2f}, n = {n}"


def _metric(points: pd.DataFrame) -> str:
    return str(points["outcome_metric"].iloc[0])
