"""The report's transferability section: did the cheap estimates predict the battle?

Estimates are the results rows of stage ``transferability`` (never ranked); outcomes are the
measured rows the ranking uses (:data:`bob_cache.transfer.DEFAULT_OUTCOMES`: the full-setting
linear probe's test top-1 on the same feature key, fine-tuning's top-1 on the backbone). Both
sides are the ranking's rows: a dataset's earlier sources are left out of the estimates as
they are of the outcomes. Per dataset, estimator and outcome the section gives Spearman's ρ
(exact permutation p up to 8 backbones) and the weighted Kendall τ with percentile bootstrap
intervals over backbones (:func:`bob_cache.transfer.agreement_table`), each estimate beside
its outcome, and one scatter figure per dataset against the linear probe.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from bob_cache.pipelines.report_plots import Plot
from bob_cache.pipelines.report_sections import Section
from bob_cache.pipelines.report_tables import Table, format_number, frame_table
from bob_cache.ranking import Ranking
from bob_cache.ranking.sources import FINGERPRINT
from bob_cache.transfer import agreement_points, agreement_table, plot_agreement
from bob_cache.transfer.agreement import STAGE, is_random_init_label

RANDOM_METHOD = "random init"
SCATTER_OUTCOME = "linear"
PLOT_PREFIX = "transferability-"


@dataclass
class TransferReport:
    """The section, its figures, and the agreement table (``None`` without estimates)."""

    section: Section
    plots: list[Plot] = field(default_factory=list)
    table: pd.DataFrame | None = None


def transferability_rows(ranking: Ranking) -> pd.DataFrame:
    """The ranking's measured rows and the estimates of the same dataset sources."""
    unassigned = ranking.unassigned
    if unassigned.empty or "stage" not in unassigned:
        return ranking.rows.iloc[:0]
    estimates = unassigned[unassigned["stage"].astype(str) == STAGE]
    if estimates.empty:
        return ranking.rows.iloc[:0]
    estimates = estimates[_current_source(estimates, ranking.rows)]
    return pd.concat([ranking.rows, estimates], ignore_index=True)


def transferability_report(
    ranking: Ranking, out_dir: Path, *, resamples: int = 1000, seed: int = 0
) -> TransferReport:
    """The section (and its scatter PNGs in ``out_dir``) for ``ranking``'s results."""
    section = Section("Transferability estimates", "transferability")
    stale = sorted(out_dir.glob(f"{PLOT_PREFIX}*.png"))  # an earlier report's
    frame = transferability_rows(ranking)
    if frame.empty:
        for path in stale:
            path.unlink(missing_ok=True)
        section.paragraphs.append(
            "No transferability estimates in the results. Add `- kind: transferability` to "
            "the suite's tasks, or run `bob-cache probe ... --method logme,hscore,knn-loo`, "
            "to see whether seconds of LogME or H-score would have predicted this ranking."
        )
        return TransferReport(section)
    is_random = _random_test(ranking)
    table = agreement_table(frame, random_init=is_random, n_boot=resamples, seed=seed)
    points = agreement_points(frame, random_init=is_random)
    section.paragraphs += _paragraphs(table, resamples, seed)
    plots = []
    for dataset in sorted(set(points["dataset"])):
        path = out_dir / f"{PLOT_PREFIX}{_slug(dataset)}.png"
        if plot_agreement(frame, path, dataset=dataset, outcome=SCATTER_OUTCOME, table=table,
                          random_init=is_random) is not None:  # fmt: skip
            plots.append(Plot(path.stem, f"Transferability estimates on {dataset}", path))
    for path in stale:
        if path not in {p.path for p in plots}:
            path.unlink(missing_ok=True)
    section.tables = [_agreement_table(table, ranking), _points_table(points, ranking)]
    return TransferReport(section, plots, table)


def _paragraphs(table: pd.DataFrame, resamples: int, seed: int) -> list[str]:
    lines = [
        "Estimates computed from the cached training features in seconds, set against the "
        "measured outcomes across backbones (they are never ranked themselves). ρ is "
        "Spearman's rank correlation (its p exact by permutation up to 8 backbones), τw the "
        "weighted Kendall τ (disagreements among the best backbones cost most); intervals "
        f"are 95% percentile bootstrap intervals over backbones ({resamples} resamples, seed "
        f"{seed}; resamples where one side is constant are left out). 'top pick' is the "
        "estimate's best backbone and the rank the outcome gives it.",
    ]
    if table.empty:
        lines.append(
            "No estimate pairs with a measured outcome yet: the linear probe (full setting) "
            "or fine-tuning must have run on the same datasets and feature keys."
        )
        return lines
    failing = table[table["failures"].astype(str) != ""]
    if not failing.empty:
        names = sorted({f"{r.estimator} on {r.dataset}" for r in failing.itertuples()})
        lines.append(
            "Where an estimate fails: it ranks a random-init backbone above a pretrained one "
            f"that the measured outcome puts ahead ({', '.join(names)}); see the verdicts."
        )
    few = table[table["n_backbones"] < 5]
    if not few.empty:
        low, high = int(few["n_backbones"].min()), int(few["n_backbones"].max())
        lines.append(
            f"With {low if low == high else f'{low} to {high}'} backbones behind a correlation, "
            "even a perfect ρ is weak evidence (with 3, the exact two-sided p of ρ = 1 is "
            "0.33); read the p-values and verdicts, not the points."
        )
    return lines


def _agreement_table(table: pd.DataFrame, ranking: Ranking) -> Table:
    shown = pd.DataFrame(
        {
            "dataset": table["dataset"],
            "estimate": table["estimator"],
            "outcome": table["outcome"],
            "backbones": table["n_backbones"],
            "ρ [95%]": [
                _interval(r.spearman, r.spearman_low, r.spearman_high) for r in table.itertuples()
            ],
            "p": [format_number(p, 2) for p in table["spearman_p"]],
            "τw [95%]": [
                _interval(r.weighted_tau, r.weighted_tau_low, r.weighted_tau_high)
                for r in table.itertuples()
            ],
            "top pick (outcome rank)": [
                f"{_shown(ranking, str(r.top_pick))} ({r.top_pick_rank})"
                for r in table.itertuples()
            ],
            "verdict": table["verdict"].fillna(""),
        }
    )
    return frame_table(shown, "Agreement of each estimate with the measured outcomes")


def _points_table(points: pd.DataFrame, ranking: Ranking) -> Table:
    wide = points.assign(entry=[_shown(ranking, e) for e in points["entry"]])
    wide = wide.pivot_table(
        index=["dataset", "outcome", "entry", "outcome_value"], columns="estimator",
        values="estimate", aggfunc="first",
    ).reset_index()  # fmt: skip
    wide = wide.sort_values(["dataset", "outcome", "outcome_value"], ascending=[True, True, False])
    wide = wide.rename(columns={"outcome_value": "outcome top-1"})
    for column in wide.columns[4:]:
        wide[column] = [format_number(v, 4) for v in wide[column]]
    wide["outcome top-1"] = [format_number(v, 4) for v in wide["outcome top-1"]]
    return frame_table(wide, "Each backbone's estimates beside its measured outcome")


def _current_source(estimates: pd.DataFrame, measured: pd.DataFrame) -> pd.Series:
    """Estimate rows of the dataset source the ranking uses (or any, where it uses none)."""
    if FINGERPRINT not in estimates or FINGERPRINT not in measured:
        return pd.Series(True, index=estimates.index)
    used = (
        measured.assign(fp=measured[FINGERPRINT].fillna("").astype(str))
        .query("fp != ''")
        .groupby("dataset")["fp"]
        .agg(set)
    )
    fingerprint = estimates[FINGERPRINT].fillna("").astype(str)
    keep = [
        fp == "" or dataset not in used.index or fp in used[dataset]
        for dataset, fp in zip(estimates["dataset"], fingerprint, strict=True)
    ]
    return pd.Series(keep, index=estimates.index)


def _random_test(ranking: Ranking) -> Callable[[str], bool]:
    def is_random(label: str) -> bool:
        info = ranking.backbones.get(label)
        if info is not None and info.method:
            return info.method.strip().lower() == RANDOM_METHOD
        return is_random_init_label(label)

    return is_random


def _shown(ranking: Ranking, entry: str) -> str:
    backbone, sep, rest = entry.partition(" · ")
    info = ranking.backbones.get(backbone)
    return (info.shown if info is not None else backbone) + (sep + rest if sep else "")


def _interval(value: float, low: float, high: float) -> str:
    if pd.isna(value):
        return "—"
    return f"{value:.2f}" + ("" if pd.isna(low) else f" [{low:.2f}, {high:.2f}]")


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "-" for c in name)
