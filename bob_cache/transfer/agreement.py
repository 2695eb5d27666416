"""Do the estimates predict the battle? Rank agreement of each transferability estimate with
the measured outcomes, per dataset, across backbones.

Input: results-table rows (``ResultsTable.read()``; pass the rows the report ranks, after its
own filtering of stale sources or preferred configurations). Estimates are the rows of stage
``transferability`` (each method's own metric: ``logme``, ``hscore``, ``leep``, ``nce``, and
``top1`` for ``knn-loo``); outcomes are :data:`DEFAULT_OUTCOMES` (the full-setting linear
probe's test top-1, paired on the same feature key; fine-tuning's ranked top-1, paired on
the backbone).

An *entry* is one backbone under one feature key. Rows repeated under one config hash (a
rerun) count once (the newest); rows that differ by seed alone are averaged (seeds); where an
entry has several configurations of one estimate or outcome, the newest is used and the
``note`` column says so (configurations are never averaged).

Per (dataset, estimator, outcome): Spearman's ρ (its p-value exact by permutation up to 8
entries) and the weighted Kendall τ (``scipy.stats.weightedtau``: hyperbolic weights, so
disagreements among the best entries cost most), each with a percentile bootstrap interval
over entries (backbones resampled with replacement; resamples where either side is constant
are left out and counted), the estimate's top pick and where the outcome ranks it, and the
failures said plainly: every pair where the estimate ranks a random-init backbone above a
pretrained one that the outcome puts ahead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

from bob_cache.errors import SpecError

STAGE = "transferability"
MIN_ENTRIES = 3
ALPHA = 0.05  # an interval off 0 says an order only where the permutation p is below this
EXACT_UP_TO = 8  # entries up to which Spearman's p is an exact permutation p (8! = 40,320)
COLUMNS = (
    "dataset", "estimator", "metric", "outcome", "n_backbones", "spearman", "spearman_p",
    "spearman_low", "spearman_high", "weighted_tau", "weighted_tau_low", "weighted_tau_high",
    "resamples", "top_pick", "top_pick_rank", "failures", "verdict", "note",
)  # fmt: skip
POINT_COLUMNS = (
    "dataset", "estimator", "metric", "outcome", "outcome_metric", "backbone", "feature_key",
    "entry", "estimate", "outcome_value", "random_init", "note",
)  # fmt: skip


@dataclass(frozen=True)
class Outcome:
    """A measured outcome: which rows hold it, its metric, and whether it is paired with an
    estimate on the feature key (outcomes of cached features) or on the backbone only."""

    name: str
    matches: Callable[[pd.DataFrame], pd.Series]
    metric: str = "top1"
    by_feature: bool = True


def _text(frame: pd.DataFrame, column: str) -> pd.Series:
    if column not in frame:
        return pd.Series("", index=frame.index, dtype=object)
    return frame[column].astype(object).where(frame[column].notna(), "").astype(str)


def _linear(method: str) -> Callable[[pd.DataFrame], pd.Series]:
    def matches(f: pd.DataFrame) -> pd.Series:
        return (
            (_text(f, "stage") == "probe")
            & (_text(f, "method") == method)
            & (_text(f, "setting") == "full")
        )

    return matches


def _finetune(f: pd.DataFrame) -> pd.Series:
    return _text(f, "task") == "finetune-classification"


DEFAULT_OUTCOMES: tuple[Outcome, ...] = (
    Outcome("linear", _linear("linear")),
    Outcome("linear-bob", _linear("linear-bob")),
    Outcome("finetune", _finetune, by_feature=False),
)


def is_random_init_label(backbone: str) -> bool:
    """Whether a results ``backbone`` label names random init (``resnet18.random-s0``)."""
    return backbone.partition(".")[2].startswith("random")


def agreement_points(
    frame: pd.DataFrame,
    *,
    outcomes: Sequence[Outcome] = DEFAULT_OUTCOMES,
    random_init: Collection[str] | Callable[[str], bool] | None = None,
) -> pd.DataFrame:
    """One row per (dataset, estimator, outcome, entry): the estimate beside the outcome.

    Args:
        frame: results-table rows.
        outcomes: the measured outcomes to compare with.
        random_init: the ``backbone`` labels that are random init (or a test on a label);
            default: labels whose weights tag starts with ``random`` (``arch.random-s0``).

    Returns:
        A DataFrame with :data:`POINT_COLUMNS` (empty when nothing pairs up).
    """
    from bob_cache.transfer.estimators import get_estimator_class, list_estimators

    is_random = _random_test(random_init)
    stage = _text(frame, "stage") == STAGE
    estimates = frame[stage & _text(frame, "method").isin(list_estimators())]
    parts = []
    for method, rows in estimates.groupby("method", sort=False):
        metric = get_estimator_class(str(method)).metric
        values = _collapse(rows[rows["metric"] == metric], ["dataset", "backbone", "feature_key"])
        values = values.rename(columns={"value": "estimate", "note": "estimate_note"})
        for outcome in outcomes:
            measured = frame[outcome.matches(frame).fillna(False).astype(bool)]
            keys = ["dataset", "backbone"] + (["feature_key"] if outcome.by_feature else [])
            found = _collapse(measured[measured["metric"] == outcome.metric], keys)
            if values.empty or found.empty:
                continue
            found = found.rename(columns={"value": "outcome_value"})
            joined = values.merge(found, on=keys)
            joined = joined.assign(
                estimator=str(method), metric=metric, outcome=outcome.name,
                outcome_metric=outcome.metric,
                note=[_join(a, b) for a, b in zip(joined["estimate_note"], joined["note"],
                                                  strict=True)],
            )  # fmt: skip
            parts.append(joined)
    if not parts:
        return pd.DataFrame(columns=list(POINT_COLUMNS))
    points = pd.concat(parts, ignore_index=True)
    points["random_init"] = points["backbone"].map(is_random).astype(bool)
    points["entry"] = _entry_labels(points)
    return points[list(POINT_COLUMNS)].sort_values(
        ["dataset", "estimator", "outcome", "entry"], ignore_index=True
    )


def agreement_table(
    frame: pd.DataFrame,
    *,
    outcomes: Sequence[Outcome] = DEFAULT_OUTCOMES,
    random_init: Collection[str] | Callable[[str], bool] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
    confidence: float = 0.95,
) -> pd.DataFrame:
    """Per (dataset, estimator, outcome): how well the estimate ranks the entries (module doc).

    Args:
        frame: results-table rows (estimates and outcomes).
        outcomes: the measured outcomes to compare with (default: linear probe, BoB-recipe
            linear probe, fine-tuning classification; those without rows are left out).
        random_init: see :func:`agreement_points`.
        n_boot: bootstrap resamples of the entries.
        seed: the bootstrap's random seed.
        confidence: the intervals' coverage.

    Returns:
        A DataFrame with :data:`COLUMNS`; correlations are NaN below :data:`MIN_ENTRIES`
        entries, and ``verdict`` says why.
    """
    if n_boot < 1 or not 0 < confidence < 1:
        raise SpecError(
            f"The agreement bootstrap needs n_boot ≥ 1 and 0 < confidence < 1; got n_boot="
            f"{n_boot}, confidence={confidence}."
        )
    points = agreement_points(frame, outcomes=outcomes, random_init=random_init)
    rows = []
    rng = np.random.default_rng(seed)
    for (dataset, estimator, outcome), group in points.groupby(
        ["dataset", "estimator", "outcome"], sort=True
    ):
        rows.append(
            {"dataset": dataset, "estimator": estimator, "metric": group["metric"].iloc[0],
             "outcome": outcome, **_assess(group, rng, n_boot=n_boot, confidence=confidence)}
        )  # fmt: skip
    return pd.DataFrame(rows, columns=list(COLUMNS))


def correlations(x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
    """``(Spearman ρ, weighted Kendall τ)`` of the estimate ``x`` and the outcome ``y``
    (NaN when either is constant)."""
    if len(x) < 2 or np.ptp(x) == 0 or np.ptp(y) == 0:
        return math.nan, math.nan
    rho = float(stats.spearmanr(x, y).statistic)
    tau = float(stats.weightedtau(x, y).statistic)
    return rho, tau


def spearman_p(x: np.ndarray, y: np.ndarray) -> float:
    """Two-sided p of Spearman's ρ: exact by permutation up to :data:`EXACT_UP_TO` entries."""
    if len(x) > EXACT_UP_TO:
        return float(stats.spearmanr(x, y).pvalue)
    ry = stats.rankdata(y)

    def rho(a: np.ndarray, axis: int = -1) -> np.ndarray:  # Pearson of ranks, row-wise
        ra = stats.rankdata(np.moveaxis(a, axis, -1), axis=-1)
        ra, rb = ra - ra.mean(axis=-1, keepdims=True), ry - ry.mean()
        return (ra @ rb) / np.sqrt((ra * ra).sum(axis=-1) * (rb @ rb))

    result = stats.permutation_test(  # one sample permuted: every pairing of x with y
        (x,), rho, permutation_type="pairings", n_resamples=math.inf, vectorized=True,
        alternative="two-sided",
    )  # fmt: skip
    return float(result.pvalue)


def _assess(group: pd.DataFrame, rng: np.random.Generator, *, n_boot: int,
            confidence: float) -> dict[str, object]:  # fmt: skip
    x = group["estimate"].to_numpy(float)
    y = group["outcome_value"].to_numpy(float)
    n = len(group)
    out: dict[str, object] = {
        "n_backbones": n,
        "note": "; ".join(sorted(set(group["note"]) - {""})),
    }
    broken = ~(np.isfinite(x) & np.isfinite(y))
    if broken.any():
        out["verdict"] = "not assessed: not finite for " + ", ".join(
            group["entry"][broken].astype(str)
        )
        return out
    out["failures"] = _failures(group)
    top = int(np.argmax(x))
    out["top_pick"] = group["entry"].iloc[top]
    out["top_pick_rank"] = int((y > y[top]).sum()) + 1
    if n < MIN_ENTRIES:
        out["verdict"] = (
            f"not assessed: {n} backbone(s); a rank correlation needs at least {MIN_ENTRIES}"
        )
        return out
    rho, tau = correlations(x, y)
    out.update(spearman=rho, weighted_tau=tau, spearman_p=spearman_p(x, y) if rho == rho else None)
    valid = _bootstrap(x, y, rng.integers(0, n, size=(n_boot, n)))
    out["resamples"] = len(valid)
    if len(valid) >= max(2, n_boot // 2):
        tail = (1 - confidence) / 2 * 100
        low, high = np.percentile(valid, [tail, 100 - tail], axis=0)
        out.update(spearman_low=low[0], spearman_high=high[0], weighted_tau_low=low[1],
                   weighted_tau_high=high[1])  # fmt: skip
    out["verdict"] = _verdict(out, n)
    return out


def _bootstrap(x: np.ndarray, y: np.ndarray, draws: np.ndarray) -> np.ndarray:
    """``(ρ, τ)`` of each resample (rows of ``draws``) where neither side is constant."""
    xs, ys = x[draws], y[draws]
    keep = (np.ptp(xs, axis=1) > 0) & (np.ptp(ys, axis=1) > 0)
    xs, ys = xs[keep], ys[keep]
    rx, ry = stats.rankdata(xs, axis=1), stats.rankdata(ys, axis=1)
    rx, ry = rx - rx.mean(axis=1, keepdims=True), ry - ry.mean(axis=1, keepdims=True)
    rho = (rx * ry).sum(axis=1) / np.sqrt((rx * rx).sum(axis=1) * (ry * ry).sum(axis=1))
    tau = [stats.weightedtau(a, b).statistic for a, b in zip(xs, ys, strict=True)]
    return np.column_stack([rho, np.asarray(tau, dtype=float)]).reshape(-1, 2)


def _verdict(out: dict[str, object], n: int) -> str:
    rho, low, high = out.get("spearman"), out.get("spearman_low"), out.get("spearman_high")
    if rho is None or rho != rho:
        return "not assessed: the estimate or the outcome is the same for every backbone"
    words = []
    if out["failures"]:
        words.append("FAILS: " + str(out["failures"]))
    p = out.get("spearman_p")
    significant = p is not None and p < ALPHA
    if low is None:
        words.append(f"ρ = {rho:.2f}; too few distinct resamples for an interval")
    elif low > 0 and significant:
        words.append(f"predicts the order (ρ = {rho:.2f}, interval above 0, p = {p:.3f})")
    elif high < 0 and significant:
        words.append(f"ranks in reverse (ρ = {rho:.2f}, interval below 0, p = {p:.3f})")
    elif low > 0 or high < 0:  # an interval off 0 from resampling very few backbones
        words.append(
            f"no reliable signal (ρ = {rho:.2f}, but the exact permutation p = {p:.2f}: "
            f"{n} backbones cannot show an order)"
        )
    else:
        words.append(
            f"no reliable signal (ρ = {rho:.2f}, interval [{low:.2f}, {high:.2f}] spans 0)"
        )
    if n <= 4:
        words.append(f"only {n} backbones (the smallest exact p possible is {_min_p(n):.2f})")
    return "; ".join(words)


def _min_p(n: int) -> float:
    """The smallest two-sided exact permutation p of Spearman's ρ over ``n`` entries."""
    return min(1.0, 2 / math.factorial(n))


def _failures(group: pd.DataFrame) -> str:
    """Pairs the estimate ranks random-init above pretrained while the outcome disagrees."""
    found = []
    rand, pre = group[group["random_init"]], group[~group["random_init"]]
    for _, r in rand.iterrows():
        for _, p in pre.iterrows():
            if r["estimate"] > p["estimate"] and r["outcome_value"] < p["outcome_value"]:
                found.append(
                    f"ranks random-init {r['entry']} ({r['estimate']:.4g}) above pretrained "
                    f"{p['entry']} ({p['estimate']:.4g}), whose {group['outcome'].iloc[0]} "
                    f"{group['outcome_metric'].iloc[0]} is higher ({p['outcome_value']:.4g} vs "
                    f"{r['outcome_value']:.4g})"
                )
    return "; ".join(found)


def _collapse(rows: pd.DataFrame, keys: list[str]) -> pd.DataFrame:
    """One value per ``keys``: the newest row per (config, seed), the mean over seeds, and
    the newest configuration where there are several (said in ``note``)."""
    columns = [*keys, "value", "note"]
    if rows.empty:
        return pd.DataFrame(columns=columns)
    rows = rows.assign(time=_text(rows, "time"), config_hash=_text(rows, "config_hash"),
                       seed=rows["seed"].fillna(0) if "seed" in rows else 0)  # fmt: skip
    rows = rows.sort_values("time").drop_duplicates([*keys, "config_hash", "seed"], keep="last")
    per_config = rows.groupby([*keys, "config_hash"], sort=False).agg(
        value=("value", "mean"), time=("time", "max")
    )
    per_config = per_config.reset_index().sort_values("time")
    configs = per_config.groupby(keys, sort=False)["config_hash"].transform("nunique")
    chosen = per_config.drop_duplicates(keys, keep="last").copy()
    several = configs.loc[chosen.index] > 1
    chosen["note"] = np.where(several, "several configurations: the newest is used", "")
    return chosen[columns]


def _entry_labels(points: pd.DataFrame) -> pd.Series:
    keys = points.groupby(["dataset", "backbone"])["feature_key"].transform("nunique")
    short = points["feature_key"].astype(str).str[:8]
    return points["backbone"].where(keys <= 1, points["backbone"] + " · " + short)


def _random_test(given: Collection[str] | Callable[[str], bool] | None) -> Callable[[str], bool]:
    if given is None:
        return is_random_init_label
    if callable(given):
        return given
    labels = set(given)
    return lambda backbone: backbone in labels


def _join(*notes: object) -> str:
    return "; ".join(sorted({str(n) for n in notes if isinstance(n, str) and n}))
