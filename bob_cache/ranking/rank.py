"""From a results frame to BoB's ranking: tasks, z-scores, rankings, correlations, scale."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from bob_cache.ranking.analysis import scale_analysis, task_correlations
from bob_cache.ranking.bootstrap import DEFAULT_RESAMPLES, Bootstrap, bootstrap_ranking
from bob_cache.ranking.identity import Configurations, parse_prefer, resolve_configurations
from bob_cache.ranking.metadata import (
    DEFAULT_SIZE_CLASSES,
    BackboneInfo,
    SizeClasses,
    get_size_class,
    resolve_backbone_info,
)
from bob_cache.ranking.sources import FINGERPRINT, split_sources
from bob_cache.ranking.tasks import assign_tasks, list_tasks, resolve_primary_metrics
from bob_cache.ranking.zscores import (
    SETTING_KEYS,
    latest_runs,
    score_settings,
    seed_spread,
    setting_values,
    to_entries,
)

# Metrics whose chance level is 0.5: a value below it is flagged (the scores point the wrong way).
CHANCE = {"auroc": 0.5, "roc_auc": 0.5}


@dataclass
class Ranking:
    """Everything a report shows; each frame is long or small and ready to print.

    A ranked *entry* is one backbone under one configuration
    (:mod:`bob_cache.ranking.identity`); it is the backbone's label when the backbone ran
    under one configuration per setting.
    """

    rows: pd.DataFrame  # the latest run of every configuration, with its `task`
    primary_rows: pd.DataFrame  # the rows ranked, with their `cell` and `configuration`
    values: pd.DataFrame  # SETTING_KEYS, entry, backbone, cell, value (mean over seeds), std, seeds
    zscores: pd.DataFrame  # SETTING_KEYS, entry, backbone, cell, value, z
    skipped: pd.DataFrame  # settings left out of the z-scores, and why
    tasks: pd.DataFrame  # entry, backbone, task, z (mean over the task's settings), settings
    overall: pd.DataFrame  # rank, entry, backbone, z, z_seed_std, tasks, settings, metadata
    correlations: pd.DataFrame  # task × task Spearman rho
    correlation_counts: pd.DataFrame  # task × task entries behind each rho
    scale: pd.DataFrame  # against, family, backbones, rho, p_value, p_method, excluded
    primary_metrics: dict[tuple[str, str], str]  # (dataset, task) → ranked metric
    backbones: dict[str, BackboneInfo]  # by the results' backbone label
    size_classes: tuple[tuple[str, float], ...]
    unassigned: pd.DataFrame  # rows that no task rule claims
    entries: pd.DataFrame = field(default_factory=pd.DataFrame)  # entry, backbone, configuration
    configurations: Configurations | None = None  # varying keys, --prefer's choices
    correlation_p: pd.DataFrame = field(default_factory=pd.DataFrame)  # task × task p-values
    sources: pd.DataFrame = field(default_factory=pd.DataFrame)  # datasets with several sources
    stale_rows: pd.DataFrame = field(default_factory=pd.DataFrame)  # rows of earlier sources
    not_finite: pd.DataFrame = field(default_factory=pd.DataFrame)  # rows valued NaN/inf
    below_chance: pd.DataFrame = field(default_factory=pd.DataFrame)  # values under CHANCE
    bootstrap: Bootstrap | None = None
    prefer: list[str] = field(default_factory=list)

    @property
    def task_names(self) -> list[str]:
        """Tasks present, registered ones first in registration order."""
        present = list(dict.fromkeys(self.values["task"]))
        return [t for t in list_tasks() if t in present] + [
            t for t in present if t not in list_tasks()
        ]

    def info(self, entry: str) -> BackboneInfo:
        """Metadata of the backbone behind ``entry`` (an entry or a backbone label)."""
        return self.backbones[self._backbone_of().get(entry, entry)]

    def shown(self, entry: str) -> str:
        """How the report names ``entry``: the backbone's display name, then what differs."""
        configuration = self._configuration_of().get(entry, "")
        return " · ".join(p for p in (self.info(entry).shown, configuration) if p)

    def by_size_class(self) -> dict[str, pd.DataFrame]:
        """The overall ranking split by size class (z as in the full field, re-ranked)."""
        order = [name for name, _ in self.size_classes]
        out = {}
        for name, part in self.overall.groupby("size_class", sort=False):
            out[str(name)] = part.assign(rank=range(1, len(part) + 1)).reset_index(drop=True)
        return {k: out[k] for k in [*order, "unknown"] if k in out}

    def _backbone_of(self) -> dict[str, str]:
        return dict(zip(self.entries.get("entry", []), self.entries.get("backbone", []),
                        strict=True))  # fmt: skip

    def _configuration_of(self) -> dict[str, str]:
        return dict(zip(self.entries.get("entry", []), self.entries.get("configuration", []),
                        strict=True))  # fmt: skip


def rank_backbones(
    frame: pd.DataFrame,
    *,
    metadata: Mapping[str, Any] | None = None,
    primary_metrics: Mapping[str, str | Sequence[str]] | None = None,
    size_classes: SizeClasses = DEFAULT_SIZE_CLASSES,
    data_sizes: Mapping[str, float] | None = None,
    ddof: int = 0,
    prefer: Sequence[str] = (),
    bootstrap: int | None = 0,
    seed: int = 0,
) -> Ranking:
    """Rank the entries of a results frame as BoB does (see :mod:`bob_cache.ranking.zscores`).

    Args:
        frame: long-format results rows (``ResultsTable.read()``).
        metadata: backbone label → mapping (or object) with name, family, method, data,
            params; what it leaves out comes from the backbone registry.
        primary_metrics: task → metric(s) replacing a task's ranked metric.
        size_classes: ``(name, upper bound)`` pairs, ascending (the paper's small/base/large).
        data_sizes: extra pretraining-set sizes (name → images) beside ``DATA_SIZES``.
        ddof: delta degrees of freedom of the per-setting std (0: population, as BoB).
        prefer: ``KEY=VALUE`` items picking one configuration where a backbone has several
            (:mod:`bob_cache.ranking.identity`), or a dataset's source
            (``dataset_fingerprint=PREFIX``, :mod:`bob_cache.ranking.sources`).
        bootstrap: resamples of :mod:`bob_cache.ranking.bootstrap`; 0 none; None the default
            number where there are two settings or more.
        seed: the bootstrap's seed.

    Raises:
        RankingOptionError: a ``prefer`` that no row matches; a bootstrap with too few
            resamples or settings.
    """
    wanted = parse_prefer(prefer)
    rows = latest_runs(frame).assign(task=lambda f: assign_tasks(f))
    unassigned = rows[rows["task"] == ""]
    rows, stale, sources = split_sources(
        rows[rows["task"] != ""], prefer=[v for k, v in wanted if k == FINGERPRINT]
    )
    chosen = resolve_primary_metrics(rows, primary_metrics)
    primary = _primary_rows(rows, chosen)
    finite = np.isfinite(pd.to_numeric(primary["value"], errors="coerce").astype(float))
    configs = resolve_configurations(
        primary[finite], SETTING_KEYS, prefer=[(k, v) for k, v in wanted if k != FINGERPRINT]
    )
    cells = setting_values(configs.rows)
    scores = score_settings(cells, configs.membership, ddof=ddof)
    labels = sorted(set(frame["backbone"].dropna().astype(str)))
    infos = {b: resolve_backbone_info(b, (metadata or {}).get(b), data_sizes=data_sizes)
             for b in labels}  # fmt: skip
    overall = _overall_table(scores.overall, scores.tasks, infos, size_classes)
    spread = seed_spread(configs.rows, cells, configs.membership, ddof=ddof)
    overall["z_seed_std"] = overall["entry"].map(spread).astype(float)
    values = to_entries(cells, configs.membership)
    ranking = Ranking(
        rows=rows, primary_rows=configs.rows, values=values, zscores=scores.zscores,
        skipped=scores.skipped, tasks=scores.tasks, overall=overall,
        correlations=pd.DataFrame(), correlation_counts=pd.DataFrame(), scale=pd.DataFrame(),
        primary_metrics=chosen, backbones=infos, size_classes=tuple(size_classes),
        unassigned=unassigned, entries=configs.entries, configurations=configs,
        sources=sources, stale_rows=stale, not_finite=primary[~finite],
        below_chance=_below_chance(values), prefer=[f"{k}={v}" for k, v in wanted],
    )  # fmt: skip
    ranking.correlations, ranking.correlation_counts, ranking.correlation_p = task_correlations(
        scores.tasks, order=ranking.task_names
    )
    ranking.scale = scale_analysis(scores.overall, infos)
    ranking.bootstrap = _bootstrap(ranking, scores.zscores, bootstrap, seed, ddof)
    return ranking


def _bootstrap(
    ranking: Ranking, zscores: pd.DataFrame, resamples: int | None, seed: int, ddof: int
) -> Bootstrap | None:
    """The bootstrap of the scored settings' rows (None: not asked for, or the default
    with fewer than two settings)."""
    scored = zscores[SETTING_KEYS].drop_duplicates()
    if resamples is None:
        resamples = DEFAULT_RESAMPLES if len(scored) >= 2 else 0
    if not resamples:
        return None
    rows = ranking.primary_rows.merge(scored, on=SETTING_KEYS, how="inner")
    return bootstrap_ranking(
        rows, ranking.configurations.membership if ranking.configurations else None,
        tasks=ranking.task_names, entries=list(ranking.overall["entry"]),
        resamples=resamples, seed=seed, ddof=ddof,
    )  # fmt: skip


def _below_chance(values: pd.DataFrame) -> pd.DataFrame:
    chance = values["metric"].map(CHANCE).astype(float)
    below = pd.to_numeric(values["value"], errors="coerce").astype(float) < chance
    return values[chance.notna() & below].reset_index(drop=True)


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
    table = overall.sort_values(["z", "entry"], ascending=[False, True]).reset_index(drop=True)
    table.insert(0, "rank", range(1, len(table) + 1))
    per_task = tasks.pivot(index="entry", columns="task", values="z")
    for task in per_task:
        table[f"z_{task}"] = table["entry"].map(per_task[task])
    for name in ("family", "method", "data", "params"):
        table[name] = [getattr(infos[b], name) for b in table["backbone"]]
    table["size_class"] = [get_size_class(p, size_classes) for p in table["params"]]
    return table
