"""How far to trust a ranking: a bootstrap over the settings behind each task (and seeds).

The protocol (every number can be recomputed with numpy from it):

1. ``rng = numpy.random.default_rng(seed)``. The scored settings of each task, in sorted
   order of (dataset, task, method, setting, metric), are resampled with replacement:
   for each task in report order, ``rng.integers(0, n, size=(resamples, n))`` picks the
   ``n`` settings of each resample (as ``scipy.stats.bootstrap`` draws one sample).
   The same draw serves every entry (a paired bootstrap).
2. Where a cell has several seeds, they are resampled too: after the task draws,
   ``u = rng.random((resamples, settings, most seeds))`` over all scored settings in sorted
   order; a cell with ``k`` seeds (sorted by seed) takes seeds ``floor(u[b, s, j] * k)``
   for ``j < k`` and their mean is its value. Entries with the same number of seeds get
   the same seeds. Each setting's z is then recomputed over its cells (as in
   :mod:`bob_cache.ranking.zscores`; a resample where they are all equal gives none).
3. An entry's task z in a resample is the mean of its z over the drawn settings it has
   (a setting drawn twice counts twice); its overall z the mean over its task z's.
4. Its rank in a resample is 1 + the number of entries with a strictly higher overall z
   (``scipy.stats.rankdata(-z, method="min")``), among entries with an overall z there.
5. 95% intervals: z's are ``numpy.quantile(..., [0.025, 0.975])`` over the resamples where
   the entry has a value (scipy's percentile method); ranks are
   ``numpy.quantile(ranks, 0.025, method="lower")`` to ``(..., 0.975, method="higher")``.
6. ``above[A][B]``: the share of resamples where A's overall z beats B's (ties count
   half), over the resamples where both have one.
7. An entry is *tied with the leader* (rank 1) when its overall-z interval reaches the
   leader's: its upper end ≥ the leader's lower end.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from bob_cache.ranking.identity import RankingOptionError
from bob_cache.ranking.zscores import SETTING_KEYS, to_entries

DEFAULT_RESAMPLES = 1000
MIN_RESAMPLES = 100
LEVEL = 0.95


@dataclass
class Bootstrap:
    """Intervals of each entry's overall and task z and rank, and who beats whom."""

    resamples: int
    seed: int
    entries: list[str]
    settings: list[tuple]  # sorted scored settings (SETTING_KEYS values)
    seeds_resampled: bool
    overall: pd.DataFrame  # entry, z_low, z_high, rank_low, rank_high, tied_with_leader
    tasks: pd.DataFrame  # entry, task, z_low, z_high
    above: pd.DataFrame  # entry × entry: share of resamples where row beats column
    overall_z: np.ndarray  # (resamples, entries)
    task_z: dict[str, np.ndarray]  # task → (resamples, entries)


def check_bootstrap(resamples: int, settings: int) -> None:
    """Refuse a bootstrap that cannot say anything (too few resamples or settings)."""
    if resamples < MIN_RESAMPLES:
        raise RankingOptionError(
            f"--bootstrap {resamples}: a {LEVEL:.0%} interval needs at least "
            f"{MIN_RESAMPLES} resamples; pass --bootstrap {DEFAULT_RESAMPLES} (the default) "
            "or --bootstrap 0 to leave the intervals out."
        )
    if settings < 2:
        raise RankingOptionError(
            f"--bootstrap resamples the settings behind each task, but the results have "
            f"{settings} scored setting(s): every resample would be the same. Evaluate more "
            "settings (datasets, methods, shots), or pass --bootstrap 0."
        )


def bootstrap_ranking(
    rows: pd.DataFrame,
    membership: pd.DataFrame | None,
    *,
    tasks: Sequence[str],
    entries: Sequence[str],
    resamples: int = DEFAULT_RESAMPLES,
    seed: int = 0,
    ddof: int = 0,
) -> Bootstrap:
    """Bootstrap the ranking of ``entries`` (best first) from the ranked ``rows``: primary
    rows of the scored settings, with ``task``, ``cell``, ``seed`` and ``value``.

    Raises:
        RankingOptionError: fewer than ``MIN_RESAMPLES`` resamples, or fewer than two
            settings.
    """
    rows = rows if "cell" in rows else rows.assign(cell=rows["backbone"])
    settings = sorted({tuple(k) for k in rows[SETTING_KEYS].itertuples(index=False)})
    check_bootstrap(resamples, len(settings))
    rng = np.random.default_rng(seed)
    by_task = {t: [i for i, s in enumerate(settings) if s[1] == t] for t in tasks}
    by_task = {t: ix for t, ix in by_task.items() if ix}
    draws = {t: rng.integers(0, len(ix), size=(resamples, len(ix))) for t, ix in by_task.items()}
    seeds = _seed_values(rows, settings)
    most = max((len(v) for v in seeds.values()), default=1)
    u = rng.random((resamples, len(settings), most)) if most > 1 else None
    draw = _Draw(seeds, _entry_cells(rows, membership, settings, list(entries)), u, resamples,
                 len(entries), ddof)  # fmt: skip
    task_z = {}
    for task, ix in by_task.items():
        z = np.stack([draw.setting_z(i) for i in ix], axis=1)  # (resamples, n, entries)
        task_z[task] = _nanmean(np.take_along_axis(z, draws[task][:, :, None], axis=1), 1)
    overall = _nanmean(np.stack(list(task_z.values()), axis=1), 1)
    result = Bootstrap(resamples, seed, list(entries), settings, u is not None,
                       pd.DataFrame(), pd.DataFrame(), pd.DataFrame(), overall, task_z)  # fmt: skip
    result.overall, result.tasks, result.above = _intervals(overall, task_z, list(entries))
    return result


@dataclass
class _Draw:
    """What one setting's resampled z needs."""

    seeds: dict[tuple[int, str], np.ndarray]  # (setting index, cell) → values by seed
    slot: dict[int, list[tuple[int, str]]]  # setting index → (entry position, cell)
    u: np.ndarray | None  # (resamples, settings, most seeds) uniforms, or None
    resamples: int
    n_entries: int
    ddof: int

    def setting_z(self, i: int) -> np.ndarray:
        """(resamples, entries) z of setting ``i`` in every resample (NaN: entry absent)."""
        cells = sorted({c for _, c in self.slot[i]})
        values = np.empty((self.resamples, len(cells)))
        for j, cell in enumerate(cells):
            v = self.seeds[(i, cell)]
            if len(v) == 1 or self.u is None:
                values[:, j] = v.mean()
            else:
                picks = np.floor(self.u[:, i, : len(v)] * len(v)).astype(int)
                values[:, j] = v[picks].mean(axis=1)
        std = values.std(axis=1, ddof=self.ddof, keepdims=True)
        with np.errstate(invalid="ignore", divide="ignore"):
            z = (values - values.mean(axis=1, keepdims=True)) / std
        z[np.isclose(std[:, 0], 0.0, rtol=0.0, atol=1e-12)] = np.nan
        out = np.full((self.resamples, self.n_entries), np.nan)
        for e, cell in self.slot[i]:
            out[:, e] = z[:, cells.index(cell)]
        return out


def _seed_values(rows: pd.DataFrame, settings: list[tuple]) -> dict[tuple[int, str], np.ndarray]:
    """(setting index, cell) → the cell's values, sorted by seed."""
    index = {s: i for i, s in enumerate(settings)}
    ordered = rows.assign(_seed=pd.to_numeric(rows["seed"], errors="coerce"))
    ordered = ordered.sort_values(["_seed"], kind="stable")
    out = {}
    for key, part in ordered.groupby([*SETTING_KEYS, "cell"], sort=False):
        out[(index[tuple(key[:-1])], str(key[-1]))] = part["value"].to_numpy(dtype=float)
    return out


def _entry_cells(
    rows: pd.DataFrame, membership: pd.DataFrame | None, settings: list[tuple], entries: list
) -> dict[int, list[tuple[int, str]]]:
    """Per setting index: (entry position, its cell) for every entry present there."""
    cells = rows[[*SETTING_KEYS, "cell"]].drop_duplicates()
    linked = to_entries(cells, membership)
    index = {s: i for i, s in enumerate(settings)}
    position = {e: j for j, e in enumerate(entries)}
    slot: dict[int, list[tuple[int, str]]] = {i: [] for i in range(len(settings))}
    for r in linked.to_dict(orient="records"):
        if r["entry"] in position:
            key = tuple(r[k] for k in SETTING_KEYS)
            slot[index[key]].append((position[r["entry"]], str(r["cell"])))
    return slot


def _intervals(
    overall: np.ndarray, task_z: dict[str, np.ndarray], entries: list[str]
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Steps 4-7: intervals of overall z and rank, per-task z intervals, and who beats whom."""
    ranks = resample_ranks(overall)
    lo, hi = (1 - LEVEL) / 2, 1 - (1 - LEVEL) / 2
    rows = []
    for j, entry in enumerate(entries):
        z, r = overall[:, j], ranks[:, j]
        z, r = z[np.isfinite(z)], r[np.isfinite(r)]
        rows.append({"entry": entry, "z_low": _q(z, lo), "z_high": _q(z, hi),
                     "rank_low": _q(r, lo, "lower"), "rank_high": _q(r, hi, "higher"),
                     "resamples": len(z)})  # fmt: skip
    table = pd.DataFrame(rows)
    leader_low = table["z_low"].iloc[0] if len(table) else np.nan
    table["tied_with_leader"] = (table["z_high"] >= leader_low) & (table.index > 0)
    per_task = [
        {"entry": entry, "task": task, "z_low": _q(z[np.isfinite(z)], lo),
         "z_high": _q(z[np.isfinite(z)], hi)}
        for task, values in task_z.items()
        for entry, z in zip(entries, values.T, strict=True)
        if np.isfinite(z).any()
    ]  # fmt: skip
    return (
        table,
        pd.DataFrame(per_task, columns=["entry", "task", "z_low", "z_high"]),
        (pairwise_above(overall, entries)),
    )


def resample_ranks(overall: np.ndarray) -> np.ndarray:
    """(resamples, entries) competition ranks (1 = best) of each resample's overall z;
    NaN where an entry has none."""
    finite = np.isfinite(overall)
    filled = np.where(finite, overall, -np.inf)
    better = (filled[:, None, :] > filled[:, :, None]) & finite[:, None, :]
    return np.where(finite, 1 + better.sum(axis=2), np.nan)


def pairwise_above(overall: np.ndarray, entries: list[str]) -> pd.DataFrame:
    """Share of resamples where the row entry's overall z beats the column's (ties: half)."""
    a, b = overall[:, :, None], overall[:, None, :]
    both = np.isfinite(a) & np.isfinite(b)
    wins = np.where(both, (a > b) + 0.5 * (a == b), 0.0).sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = wins / both.sum(axis=0)
    np.fill_diagonal(share, np.nan)
    return pd.DataFrame(share, index=entries, columns=entries)


def _q(values: np.ndarray, q: float, method: str = "linear") -> float:
    return float(np.quantile(values, q, method=method)) if len(values) else float("nan")


def _nanmean(a: np.ndarray, axis: int) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN slices stay NaN
        return np.nanmean(a, axis=axis)
