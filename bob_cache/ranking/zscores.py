"""Per-setting z-scores of ranked entries, and their means per task and overall (BoB's ranking).

The protocol, step by step:

1. Rows: the latest run of each configuration (as :func:`~bob_cache.stores.results.summarize`
   keeps them), restricted to the primary metric of each (dataset, task).
2. A *setting* is (dataset, task, method, setting, metric). A *cell* is one backbone under
   one configuration in a setting (:mod:`bob_cache.ranking.identity`); its value is the
   mean of its rows, which differ by seed alone.
3. Within each setting, ``z = (value - mean) / std`` over the cells present there, with
   the population std (``ddof=0``, as ``scipy.stats.zscore``). A setting with fewer than two
   cells, or with all cells equal, is skipped and listed.
4. An *entry* (a backbone under one configuration) takes the z of its cell in each setting.
   Its task score is the mean of its z over every setting of the task (all datasets,
   methods and settings alike); overall is the mean of its task scores (each task weighs
   the same, as in BoB). Both carry the number of settings behind them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

SETTING_KEYS = ["dataset", "task", "method", "setting", "metric"]
RUN_KEYS = ["config_hash", "backbone", "method", "setting", "metric", "seed", "split"]
CELL = [*SETTING_KEYS, "backbone", "cell"]


@dataclass
class Scores:
    """z-scores per setting, the settings skipped, and the task and overall means."""

    zscores: pd.DataFrame  # SETTING_KEYS, entry, backbone, cell, value, z
    skipped: pd.DataFrame  # SETTING_KEYS, backbones, reason
    tasks: pd.DataFrame  # entry, backbone, task, z, settings
    overall: pd.DataFrame  # entry, backbone, z, tasks, settings


def latest_runs(frame: pd.DataFrame) -> pd.DataFrame:
    """One row per (configuration, metric, seed, split): the latest run's."""
    ordered = frame.sort_values("time", kind="stable") if "time" in frame else frame
    return ordered.drop_duplicates([k for k in RUN_KEYS if k in frame], keep="last")


def setting_values(rows: pd.DataFrame) -> pd.DataFrame:
    """Each cell's value per setting: mean, sample std and count over seeds. Without a
    ``cell`` column every backbone is one cell."""
    rows = rows if "cell" in rows else rows.assign(cell=rows["backbone"])
    grouped = rows.groupby(CELL, sort=True)["value"]
    return grouped.agg(value="mean", std="std", seeds="count").reset_index()


def to_entries(frame: pd.DataFrame, membership: pd.DataFrame | None) -> pd.DataFrame:
    """Cell-level ``frame`` (with SETTING_KEYS and ``cell``) as one line per (setting,
    entry): an entry with two cells in a setting takes the most specific, then the first."""
    if membership is None or membership.empty:
        return frame.assign(entry=frame["cell"])
    linked = frame.merge(membership, on="cell", how="inner")
    linked = linked.sort_values(["specificity", "cell"], ascending=[False, True], kind="stable")
    keys = [k for k in SETTING_KEYS if k in linked] + ["entry"]
    return linked.drop_duplicates(keys).drop(columns="specificity").reset_index(drop=True)


def score_settings(
    values: pd.DataFrame, membership: pd.DataFrame | None = None, *, ddof: int = 0
) -> Scores:
    """Standardize ``values`` (from :func:`setting_values`) within each setting over its
    cells, give each entry its cells' z, and average."""
    values = values if "cell" in values else values.assign(cell=values["backbone"])
    groups = values.groupby(SETTING_KEYS, sort=False)["value"]
    count = groups.transform("count")
    mean = groups.transform("mean")
    std = groups.transform("std", ddof=ddof)
    flat = np.isclose(std.fillna(0.0), 0.0, rtol=0.0, atol=1e-12)
    usable = (count >= 2) & ~flat
    scored = values.loc[usable, [*CELL, "value"]].copy()
    scored["z"] = (values["value"] - mean)[usable] / std[usable]
    zscores = to_entries(scored, membership)
    return Scores(zscores, _skipped(values, count, usable), *_means(zscores))


def seed_spread(
    rows: pd.DataFrame,
    values: pd.DataFrame,
    membership: pd.DataFrame | None = None,
    *,
    ddof: int = 0,
) -> pd.Series:
    """Std (over seeds, ``ddof=1``) of each entry's overall z when every seed is scored alone.

    Seed ``s`` uses each cell's seed-``s`` value where it has one, else its mean over seeds
    (deterministic settings, run once, count the same for every seed). Empty when the rows
    have fewer than two seeds.
    """
    seeds = sorted(pd.to_numeric(rows["seed"], errors="coerce").dropna().unique())
    if len(seeds) < 2:
        return pd.Series(dtype=float)
    rows = rows if "cell" in rows else rows.assign(cell=rows["backbone"])
    base = values.set_index(CELL)["value"]
    seed_of = pd.to_numeric(rows["seed"], errors="coerce")
    overall = {}
    for seed in seeds:
        own = rows[seed_of == seed].groupby(CELL)["value"].mean()
        combined = own.reindex(base.index).fillna(base).rename("value").reset_index()
        scores = score_settings(combined, membership, ddof=ddof)
        overall[seed] = scores.overall.set_index("entry")["z"]
    return pd.DataFrame(overall).std(axis=1, ddof=1)


def _skipped(values: pd.DataFrame, count: pd.Series, usable: pd.Series) -> pd.DataFrame:
    dropped = values[~usable].assign(n=count[~usable])
    rows = []
    for key, group in dropped.groupby(SETTING_KEYS, sort=True):
        n = int(group["n"].iloc[0])
        reason = f"only {n} backbone" if n < 2 else "every backbone scored the same (std 0)"
        names = ", ".join(sorted(group["cell"]))
        rows.append({**dict(zip(SETTING_KEYS, key, strict=True)), "backbones": names,
                     "reason": reason})  # fmt: skip
    return pd.DataFrame(rows, columns=[*SETTING_KEYS, "backbones", "reason"])


def _means(scored: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    tasks = (
        scored.groupby(["entry", "backbone", "task"], sort=True)["z"]
        .agg(z="mean", settings="count")
        .reset_index()
    )
    overall = (
        tasks.groupby(["entry", "backbone"], sort=True)
        .agg(z=("z", "mean"), tasks=("task", "count"), settings=("settings", "sum"))
        .reset_index()
    )
    return tasks, overall
