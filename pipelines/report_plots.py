"""The report's figures, drawn with matplotlib's Agg backend into PNG files.

* ``correlations.png``: heatmap of Spearman rho between tasks (needs two tasks).
* ``task_scatter.png``: task against task, one point per backbone; marker area by parameter
  count, colour by pretraining method (the paper's Figure 1); the first ``MAX_PAIRS`` pairs.
* ``ranking.png``: overall z per entry; error bars = its 95% bootstrap interval (or, without
  a bootstrap, the std of the overall z over seeds); entries tied with the leader hatched.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bob_cache.ranking import Ranking

MAX_PAIRS = 6
DPI = 110


@dataclass
class Plot:
    """One written figure."""

    name: str
    title: str
    path: Path


def draw_plots(ranking: Ranking, out_dir: Path) -> tuple[list[Plot], list[str]]:
    """Draw every figure the ranking supports; returns them and why others were left out."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    plots, notes = [], []
    for name, (title, draw, why_not) in FIGURES.items():
        reason = why_not(ranking)
        if reason:
            notes.append(f"No {title.lower()}: {reason}.")
            (out_dir / f"{name}.png").unlink(missing_ok=True)  # an earlier report's
            continue
        path = out_dir / f"{name}.png"
        _save(draw(ranking), path)
        plots.append(Plot(name, title, path))
    return plots, notes


def correlation_heatmap(ranking: Ranking) -> Any:
    import matplotlib.pyplot as plt

    rho, counts = ranking.correlations, ranking.correlation_counts
    size = max(4.5, 1.1 * len(rho) + 2)
    fig, ax = plt.subplots(figsize=(size, size * 0.85))
    image = ax.imshow(rho.to_numpy(dtype=float), cmap="RdBu_r", vmin=-1, vmax=1)
    ax.set_xticks(range(len(rho)), rho.columns, rotation=30, ha="right")
    ax.set_yticks(range(len(rho)), rho.index)
    for (i, a), (j, b) in itertools.product(enumerate(rho.index), enumerate(rho.columns)):
        value = rho.loc[a, b]
        text = "n/a" if math.isnan(value) else f"{value:.2f}"
        colour = "white" if abs(value) > 0.6 else "black"  # NaN compares False: black
        ax.text(j, i, f"{text}\nn={counts.loc[a, b]}", ha="center", va="center", fontsize=8,
                color=colour)  # fmt: skip
    fig.colorbar(image, ax=ax, label="Spearman rho")
    ax.set_title("Correlation between tasks (backbones' mean z)")
    return fig


def task_scatter(ranking: Ranking) -> Any:
    import matplotlib.pyplot as plt

    wide = ranking.tasks.pivot(index="entry", columns="task", values="z")
    pairs = list(itertools.combinations([t for t in ranking.task_names if t in wide], 2))
    pairs = pairs[:MAX_PAIRS]
    cols = min(3, len(pairs))
    rows = math.ceil(len(pairs) / cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(4.2 * cols + 2, 3.8 * rows), squeeze=False, layout="constrained"
    )
    colours = _method_colours(ranking)
    for ax, (a, b) in zip(axes.flat, pairs, strict=False):
        both = wide[[a, b]].dropna()
        for label, (x, y) in both.iterrows():
            info = ranking.info(label)
            ax.scatter(x, y, s=_marker_area(info.params), color=colours[_method(info.method)],
                       alpha=0.75, edgecolors="black", linewidths=0.5)  # fmt: skip
            ax.annotate(ranking.shown(label), (x, y), fontsize=6, xytext=(3, 3),
                        textcoords="offset points")  # fmt: skip
        ax.set_xlabel(f"{a} (mean z)")
        ax.set_ylabel(f"{b} (mean z)")
        ax.axhline(0, color="grey", lw=0.5)
        ax.axvline(0, color="grey", lw=0.5)
    for ax in list(axes.flat)[len(pairs) :]:
        ax.set_visible(False)
    handles = [plt.Line2D([], [], marker="o", ls="", color=c, label=m) for m, c in colours.items()]
    fig.legend(handles=handles, title="pretraining (size: parameters)", loc="outside right")
    return fig


def ranking_bars(ranking: Ranking) -> Any:
    import matplotlib.pyplot as plt

    overall = ranking.overall.iloc[::-1]
    fig, ax = plt.subplots(figsize=(7, max(3.0, 0.35 * len(overall) + 1.2)))
    names = [ranking.shown(e) for e in overall["entry"]]
    error, what, tied = _error_bars(ranking, overall)
    bars = ax.barh(names, overall["z"], xerr=error, color="tab:blue", alpha=0.8,
                   edgecolor="white", error_kw={"capsize": 3})  # fmt: skip
    for bar, is_tied in zip(bars, tied, strict=True):
        bar.set_hatch("//" if is_tied else "")
    ax.axvline(0, color="black", lw=0.6)
    ax.set_xlabel(f"overall z (mean of task means); bars: {what}")
    ax.set_title("Ranking")
    fig.tight_layout()
    return fig


def _error_bars(ranking: Ranking, overall: Any) -> tuple[np.ndarray, str, list[bool]]:
    """(2, n) distances to the bootstrap interval's ends (or the seed std both ways), what
    they are, and which entries are tied with the leader."""
    boot = ranking.bootstrap
    if boot is None:
        spread = overall["z_seed_std"].fillna(0.0).to_numpy()
        return np.vstack([spread, spread]), "std over seeds", [False] * len(overall)
    b = boot.overall.set_index("entry").loc[list(overall["entry"])]
    z = overall["z"].to_numpy(dtype=float)
    low = np.clip(z - b["z_low"].to_numpy(dtype=float), 0, None)
    high = np.clip(b["z_high"].to_numpy(dtype=float) - z, 0, None)
    what = f"95% bootstrap interval ({boot.resamples} resamples); hatched: tied with #1"
    return np.nan_to_num(np.vstack([low, high])), what, list(b["tied_with_leader"])


def _needs_two_tasks(ranking: Ranking) -> str:
    return "" if len(ranking.correlations) >= 2 else "needs scores on at least two tasks"


def _needs_backbones(ranking: Ranking) -> str:
    return "" if not ranking.overall.empty else "no backbone could be ranked"


FIGURES: dict[str, tuple[str, Callable[[Ranking], Any], Callable[[Ranking], str]]] = {
    "ranking": ("Ranking", ranking_bars, _needs_backbones),
    "correlations": ("Correlation heatmap", correlation_heatmap, _needs_two_tasks),
    "task_scatter": ("Task-vs-task scatter", task_scatter, _needs_two_tasks),
}


def _method(method: str | None) -> str:
    return method or "unknown"


def _method_colours(ranking: Ranking) -> dict[str, Any]:
    import matplotlib

    methods = sorted({_method(i.method) for i in ranking.backbones.values()})
    palette = matplotlib.colormaps["tab10"]
    return {m: palette(i % 10) for i, m in enumerate(methods)}


def _marker_area(params: float | None) -> float:
    """Area grows with the square root of the parameters (25M → ~90, 300M → ~300)."""
    if params is None or (isinstance(params, float) and np.isnan(params)):
        return 40.0
    return float(18 * np.sqrt(params / 1e6))


def _save(fig: Any, path: Path) -> None:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
