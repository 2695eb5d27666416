"""The report's sections that explain a ranking: its uncertainty, the configurations and
sources it chose between, the cells it lacks, and its method in words."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import pandas as pd

from bob_cache.pipelines.report_tables import Table, frame_table, pairwise_table
from bob_cache.ranking import Ranking
from bob_cache.ranking.analysis import EXACT_MAX, FEW, PERMUTATION_SEED, PERMUTATIONS
from bob_cache.ranking.bootstrap import LEVEL

if TYPE_CHECKING:
    from bob_cache.pipelines.report import ReportSummary


@dataclass
class Section:
    """One heading of the report."""

    title: str
    anchor: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[dict[str, str]] = field(default_factory=list)
    collapsed: bool = False


def uncertainty_section(ranking: Ranking) -> Section:
    """The bootstrap: how it resampled, and how often each entry ranks above another."""
    section = Section("Uncertainty", "uncertainty")
    boot = ranking.bootstrap
    if boot is None:
        section.paragraphs.append(
            "No bootstrap: it needs two scored settings or more (or was turned off with "
            "--bootstrap 0). Without it, neighbouring ranks may not survive another seed or "
            "dataset."
        )
        return section
    single = [t for t in ranking.task_names
              if sum(1 for s in boot.settings if s[1] == t) == 1]  # fmt: skip
    section.paragraphs += [
        f"{boot.resamples} bootstrap resamples (seed {boot.seed}). Each resample draws, per "
        "task, as many of its settings as it has, with replacement, the same draw for every "
        "entry"
        + (", and each cell's seeds with replacement (z recomputed per setting)"
           if boot.seeds_resampled else "")
        + f". Intervals are the {LEVEL:.0%} percentile intervals of each entry's task and "
        "overall z and of its rank over the resamples; an entry whose overall-z interval "
        "reaches the leader's lower end is marked tied with it.",
    ]  # fmt: skip
    if single:
        section.paragraphs.append(
            f"Task(s) with a single setting, fixed in every resample"
            f"{' unless seeds vary' if boot.seeds_resampled else ''}: {', '.join(single)}."
        )
    section.tables.append(pairwise_table(ranking, boot))
    return section


def configuration_section(ranking: Ranking) -> Section:
    """Backbones ranked under several configurations, what --prefer picked, and the
    dataset sources and rows left out."""
    section = Section("Configurations and sources", "configurations")
    configs = ranking.configurations
    varying = configs.varying if configs else {}
    if not varying:
        section.paragraphs.append(
            "Every backbone ran under one configuration per setting: each is one entry, and "
            "its ± is over seeds alone."
        )
    for backbone, keys in sorted(varying.items()):
        mine = ranking.entries[ranking.entries["backbone"] == backbone]
        section.paragraphs.append(
            f"{ranking.info(backbone).shown} ran under several configurations in one setting "
            f"(they differ in {', '.join(keys)}); each is ranked as its own entry, never "
            f"averaged: {', '.join(ranking.shown(e) for e in mine['entry'])}. Pick one with "
            "`bob-cache report --prefer KEY=VALUE`."
        )
    if configs and configs.chosen:
        chosen = pd.DataFrame(configs.chosen)
        section.tables.append(frame_table(chosen, "Configurations chosen by --prefer"))
    if not ranking.sources.empty:
        section.paragraphs.append(
            "Some dataset names hold rows of more than one source (another dataset "
            "fingerprint: a re-extracted or changed copy). Only the current source's rows "
            "are used (the newest, unless --prefer dataset_fingerprint=PREFIX names one)."
        )
        section.tables.append(frame_table(ranking.sources, "Dataset sources used"))
    if not ranking.not_finite.empty:
        section.paragraphs.append(
            f"{len(ranking.not_finite)} row(s) hold no finite value (not applicable) and are "
            "not ranked."
        )
    return section


def missing_section(ranking: Ranking, summary: ReportSummary) -> Section:
    """Cells without rows: those to run, and those the suite leaves out on purpose."""
    section = Section("Missing results", "missing")
    gaps = pd.DataFrame(summary.missing_cells, columns=["backbone", "task", "dataset"])
    excluded = pd.DataFrame(summary.excluded_cells, columns=["backbone", "task", "dataset"])
    if gaps.empty:
        section.paragraphs.append(
            "Every entry has rows for every task and dataset present"
            + (" that its suite runs for it." if len(excluded) else ".")
        )
    else:
        section.paragraphs.append(
            f"{len(gaps)} entry × task × dataset cell(s) have no rows, so those entries' task "
            "means rest on fewer settings. "
            + ("Run the missing evaluations to fill them."
               if summary.suite_checked else
               "Run the missing evaluations to fill them, unless a suite leaves them out on "
               "purpose (pass --suite to tell).")
        )  # fmt: skip
        section.tables.append(frame_table(gaps, "Cells without rows", anchor="missing-cells"))
    if len(excluded):
        section.paragraphs.append(
            f"{len(excluded)} cell(s) are left out on purpose by the suite (a task's backbones "
            "list): not missing, and not to be run."
        )
        section.tables.append(frame_table(excluded, "Cells the suite excludes"))
    if not ranking.unassigned.empty:
        kinds = ranking.unassigned.groupby(["stage", "method", "setting"]).size()
        section.paragraphs.append(
            f"{len(ranking.unassigned)} row(s) belong to no task and are not ranked: "
            + "; ".join(f"{s}/{m}/{t} ({n})" for (s, m, t), n in kinds.items())
        )
    return section


def protocol(ranking: Ranking) -> list[str]:
    """The ranking's method, in words."""
    metrics = sorted({f"{t}: {m}" for (_, t), m in ranking.primary_metrics.items()})
    bounds = "".join(f"{name} < {bound / 1e6:g}M ≤ " for name, bound in ranking.size_classes[:-1])
    return [
        "Tasks: linear = probe, method linear, setting full; few-shot = probe settings K-shot "
        "or F-fraction (any method); knn = method knn@k, setting full; retrieval = stage "
        "retrieval. A row's own task wins. The latest run of each configuration counts.",
        f"Ranked metric per task: {', '.join(metrics) or 'none'}.",
        "A ranked entry is one backbone under one configuration: rows of one backbone that "
        "differ in anything but their seed (feature spec, method options, split, source; the "
        "feature key for rows written before configurations were recorded) are never "
        "averaged. Where a backbone ran under several configurations in one setting, each "
        "is an entry named by what differs; rows without a key (a linear probe has no kNN "
        "temperature) serve every entry that agrees on the rest.",
        "A setting is (dataset, task, method, setting, metric). An entry's value there is "
        "the mean over its seeds; its z-score is (value − mean) / std over the entries' "
        "distinct cells present in that setting, with the population std (ddof 0, as BoB and "
        "scipy.stats.zscore). Settings with fewer than two cells or zero std are left "
        f"out ({len(ranking.skipped)} here).",
        "An entry's task score is the mean z over the task's settings (all datasets, methods "
        "and settings alike); its overall score is the mean of its task scores, so every "
        "task weighs the same. ± on the overall z is its std (ddof 1) when each seed is "
        "scored alone (settings run once count the same for every seed).",
        f"Size classes by parameters: {bounds}{ranking.size_classes[-1][0]}. Correlations "
        "are Spearman's over the entries that have both values (n/a below 3), with a "
        f"two-sided permutation p-value (scipy.stats.permutation_test): exact up to "
        f"{EXACT_MAX} entries, else {PERMUTATIONS} random orders (seed {PERMUTATION_SEED}); "
        f"below {FEW} entries none can reach p < 0.05 and they are flagged ⚠.",
    ]
