"""From a results frame to BoB's ranking: tasks, z-scores, rankings, correlations, scale."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from bob_cache.ranking.analysis import scale_analysis, task_correlations
from bob_cache.ranking.metadata import (
    DEFAULT_SIZE_CLASSES,
    BackboneInfo,
    SizeClasses,
    get_size_class,
    resolve_backbone_info,
)
from bob_cache.ranking.tasks import assign_tasks, list_tasks, resolve_primary_metrics
from bob_cache.ranking.zscores import (
    latest_runs,
    score_settings,
    seed_spread,
    setting_values,
)


@dataclass
class Ranking:
    """Everything a report shows; each frame is long or small and ready to print."""

    rows: pd.DataFrame  # the latest run of every configuration, with its `task`
    primary_rows: pd.DataFrame  # the rows ranked: primary metric of each (dataset, task)
    values: pd.DataFrame  # SETTING_KEYS, backbone, value (mean over seeds), std, seeds
    zscores: pd.DataFrame  # SETTING_KEYS, backbone, value, z
    skipped: pd.DataFrame  # settings left out of the z-scores, and why
    tasks: pd.DataFrame  # backbone, task, z (mean over the task's settings), settings
    overall: pd.DataFrame  # rank, backbone, z, z_seed_std, tasks, settings, metadata columns
    correlations: pd.DataFrame  # task × task Spearman rho
    correlation_counts: pd.DataFrame  # task × task backbones behind each rho
    scale: pd.DataFrame  # against, family, backbones, rho, p_value, excluded
    primary_metrics: dict[tuple[str, str], str]  # (dataset, task) → ranked metric
    backbones: dict[str, BackboneInfo]
    size_classes: tuple[tuple[str, float], ...]
    unassigned: pd.DataFrame  # rows that no task rule claims

    @property
    def task_names(self) -> list[str]:
        """Tasks present, registered ones first in registration order."""
        present = list(dict.fromkeys(self.values["task"]))
        return [t for t in list_tasks() if t in present] + [
            t for t in present if t not in list_tasks()
        ]

    def by_size_class(self) -> dict[str, pd.DataFrame]:
        """The overall ranking split by size class (z as in the full field, re-ranked)."""
        order = [name for name, _ in self.size_classes]
        out = {}
        for name, part in self.overall.groupby("size_class", sort=False):
            out[str(name)] = part.assign(rank=range(1, len(part) + 1)).reset_index(drop=True)
        return {k: out[k] for k in [*order, "unknown"] if k in out}


def rank_backbones(
    frame: pd.DataFrame,
    *,
    metadata: Mapping[str, Any] | None = None,
    primary_metrics: Mapping[str, str | Sequence[str]] | None = None,
    size_classes: SizeClasses = DEFAULT_SIZE_CLASSES,
    data_sizes: Mapping[str, float] | None = None,
    ddof: int = 0,
) -> Ranking:
    """Rank the backbones of a results frame as BoB does (see :mod:`bob_cache.ranking.zscores`).

    Args:
        frame: long-format results rows (``ResultsTable.read()``).
        metadata: backbone label → mapping (or object) with name, family, method, data,
            params; what it leaves out comes from the backbone registry.
        primary_metrics: task → metric(s) replacing a task's ranked metric.
        size_classes: ``(name, upper bound)`` pairs, ascending (the paper's small/base/large).
        data_sizes: extra pretraining-set sizes (name → images) beside ``DATA_SIZES``.
        ddof: delta degrees of freedom of the per-setting std (0: population, as BoB).
    """
    rows = latest_runs(frame).assign(task=lambda f: assign_tasks(f))
    unassigned = rows[rows["task"] == ""]
    rows = rows[rows["task"] != ""]
    chosen = resolve_primary_metrics(rows, primary_metrics)
    primary = _primary_rows(rows, chosen)
    values = setting_values(primary)
    scores = score_settings(values, ddof=ddof)
    labels = sorted(set(frame["backbone"].dropna().astype(str)))
    infos = {b: resolve_backbone_info(b, (metadata or {}).get(b), data_sizes=data_sizes)
             for b in labels}  # fmt: skip
    overall = _overall_table(scores.overall, scores.tasks, infos, size_classes)
    spread = seed_spread(primary, values, ddof=ddof)
    overall["z_seed_std"] = overall["backbone"].map(spread).astype(float)
    ranking = Ranking(
        rows=rows, primary_rows=primary, values=values, zscores=scores.zscores,
        skipped=scores.skipped, tasks=scores.tasks, overall=overall,
        correlations=pd.DataFrame(), correlation_counts=pd.DataFrame(), scale=pd.DataFrame(),
        primary_metrics=chosen, backbones=infos, size_classes=tuple(size_classes),
        unassigned=unassigned,
    )  # fmt: skip
    ranking.correlations, ranking.correlation_counts = task_correlations(
        scores.tasks, order=ranking.task_names
    )
    ranking.scale = scale_analysis(scores.overall, infos)
    return ranking


def _primary_rows(rows: pd.DataFrame, chosen: Mapping[tuple[str, str], str]) -> pd.DataFrame:
    pairs = zip(rows["dataset"].astype(str), rows["task"], strict=True)
    wanted = pd.Series([chosen.get(pair) for pair in pairs], index=rows.index, dtype=object)
    return rows[rows["metric"].astype(object) == wanted]


def _overall_table(
    overall: pd.DataFrame,
    tasks: pd.DataFrame,
    infos: Mapping[str, BackboneInfo],
    size_classes: SizeClasses,
) -> pd.DataFrame:
    table = overall.sort_values(["z", "backbone"], ascending=[False, True]).reset_index(drop=True)
    table.insert(0, "rank", range(1, len(table) + 1))
    per_task = tasks.pivot(index="backbone", columns="task", values="z")
    for task in per_task:
        table[f"z_{task}"] = table["backbone"].map(per_task[task])
    for field in ("family", "method", "data", "params"):
        table[field] = [getattr(infos[b], field) for b in table["backbone"]]
    table["size_class"] = [get_size_class(p, size_classes) for p in table["params"]]
    return table
