"""Retrieval metrics over full rankings, under named metric definitions.

``classes`` protocol (BoB on class-folder datasets): a database row is relevant to a query
when it shares the query's class. ``gnd`` protocol (Revisited Oxford/Paris, Radenović et al.
2018): each query lists easy, hard and junk database images; Easy counts easy as positive (hard
and junk ignored), Medium counts easy+hard (junk ignored), Hard counts hard (easy and junk
ignored). Ignored images are removed from the ranking before scoring, as revisitop's
``compute_map`` does.

Both protocols score a ranking (best first, ignored rows removed) under one **metrics
definition** from :data:`METRICS_DEFINITIONS`; the definitions differ in AP and precision@k:

- ``sklearn``: AP is the mean precision at the rank of each relevant row (scikit-learn's
  ``average_precision_score``; tied scores are ranked by database order), precision@k is the
  relevant rows among the top k divided by k.
- ``revisitop``: revisitop's ``compute_map``, which BoB's retrieval code uses for every dataset,
  class folders included. AP is the trapezoidal rule over the ranked positives: the positive
  with 0-based index j among positives at 0-based rank r adds ``(p0 + p1) / 2 / n_positive``
  with ``p0 = 1 if r == 0 else j / r`` and ``p1 = (j + 1) / (r + 1)``; precision@k caps k at
  the 1-based rank of the last positive: ``k' = min(k, last)``, value ``(positives in the
  top k') / k'``.

Recall@k (relevant rows among the top k divided by the number relevant) and the reciprocal
rank of the first relevant row are the same under every definition.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from bob_cache.errors import SpecError, did_you_mean

KS = (1, 5, 10)

# (hits (B, N) booleans in ranked order, found = cumsum(hits), n_rel (B,)) → AP per query
APFunction = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
# (hits, found, k) → precision@k per query
PrecisionFunction = Callable[[np.ndarray, np.ndarray, int], np.ndarray]


@dataclass(frozen=True)
class MetricsDefinition:
    """How AP and precision@k are computed from a ranking.

    Attributes:
        name: the ``--metrics-definition`` value.
        description: what it computes, written into every result row.
        average_precision: AP per query from a block of rankings.
        precision_at: precision@k per query from a block of rankings.
    """

    name: str
    description: str
    average_precision: APFunction
    precision_at: PrecisionFunction


def _ranks(n: int) -> np.ndarray:
    return np.arange(1, n + 1)


def _sklearn_ap(hits: np.ndarray, found: np.ndarray, n_rel: np.ndarray) -> np.ndarray:
    return (found / _ranks(hits.shape[1]) * hits).sum(1) / n_rel


def _sklearn_precision(hits: np.ndarray, found: np.ndarray, k: int) -> np.ndarray:
    return found[:, min(k, hits.shape[1]) - 1] / k


def _trapezoidal_ap(hits: np.ndarray, found: np.ndarray, n_rel: np.ndarray) -> np.ndarray:
    rank = np.arange(hits.shape[1])  # 0-based rank r; at a positive, found - 1 = its index j
    before = np.where(rank == 0, 1.0, (found - 1) / np.maximum(rank, 1))
    at = found / (rank + 1)
    return ((before + at) / 2 * hits).sum(1) / n_rel


def _capped_precision(hits: np.ndarray, found: np.ndarray, k: int) -> np.ndarray:
    n = hits.shape[1]
    last = n - hits[:, ::-1].argmax(1)  # 1-based rank of the last positive (n when none)
    capped = np.minimum(last, k)
    return found[np.arange(len(found)), capped - 1] / capped


METRICS_DEFINITIONS: dict[str, MetricsDefinition] = {
    d.name: d
    for d in (
        MetricsDefinition(
            "sklearn",
            "metrics sklearn: AP = mean precision at each relevant rank (scikit-learn "
            "average_precision_score), P@k = relevant in top k / k",
            _sklearn_ap,
            _sklearn_precision,
        ),
        MetricsDefinition(
            "revisitop",
            "metrics revisitop (compute_map, as BoB): AP = trapezoidal rule over the ranked "
            "positives, P@k with k capped at the last positive's rank",
            _trapezoidal_ap,
            _capped_precision,
        ),
    )
}


def get_metrics_definition(name: str) -> MetricsDefinition:
    """The definition registered as ``name``.

    Raises:
        SpecError: no such definition (the message lists them).
    """
    if name not in METRICS_DEFINITIONS:
        raise SpecError(
            f"Unknown --metrics-definition '{name}'.{did_you_mean(name, METRICS_DEFINITIONS)} "
            f"Expected one of {', '.join(METRICS_DEFINITIONS)} (revisitop reproduces BoB's "
            "published retrieval numbers)."
        )
    return METRICS_DEFINITIONS[name]


def list_metrics_definitions() -> list[str]:
    """Names of the registered metrics definitions."""
    return list(METRICS_DEFINITIONS)


def ranked_metrics(
    hits: np.ndarray, n_rel: np.ndarray, definition: str, ks: Sequence[int] = KS
) -> dict[str, np.ndarray]:
    """Per-query metrics of rankings ``hits`` ``(B, N)`` (booleans, best first, ignored rows
    removed) with ``n_rel`` ``(B,)`` relevant rows per query, under ``definition``."""
    d = get_metrics_definition(definition)
    found = np.cumsum(hits, axis=1)
    out = {"map": d.average_precision(hits, found, n_rel)}
    for k in ks:
        out[f"precision@{k}"] = d.precision_at(hits, found, k)
        out[f"recall@{k}"] = found[:, min(k, hits.shape[1]) - 1] / n_rel
    first = hits.argmax(1)
    out["mrr"] = np.where(hits[np.arange(len(hits)), first], 1.0 / (first + 1), 0.0)
    return out


def classes_block_metrics(
    scores: np.ndarray,
    relevant: np.ndarray,
    ks: Sequence[int] = KS,
    *,
    definition: str = "sklearn",
) -> dict[str, np.ndarray]:
    """Per-query metrics of a block of queries: ``scores`` ``(B, N)`` over the database
    (higher is closer) and ``relevant`` ``(B, N)`` booleans, each row with a True.

    Computed for the whole block at once (a per-query call costs milliseconds, a block one
    sort); ties are ranked by database order.
    """
    order = np.argsort(-scores, axis=1, kind="stable")
    hits = np.take_along_axis(relevant, order, axis=1)
    return ranked_metrics(hits, hits.sum(1), definition, ks)


def gnd_query_metrics(
    ranking: np.ndarray,
    positive: np.ndarray,
    ignore: np.ndarray,
    ks: Sequence[int] = KS,
    *,
    definition: str = "revisitop",
) -> dict[str, float]:
    """Metrics of one query from its full ranking (database indices, best first); the
    ``ignore`` rows are removed from the ranking first."""
    kept = ranking[~np.isin(ranking, ignore)]
    hits = np.isin(kept, positive)[None, :] if len(kept) else np.zeros((1, 1), bool)
    n_pos = np.array([len(np.unique(positive))])
    return {m: float(v[0]) for m, v in ranked_metrics(hits, n_pos, definition, ks).items()}


def mean_metrics(per_query: Sequence[dict[str, float]]) -> dict[str, float]:
    """Mean of each metric over queries."""
    if not per_query:
        return {}
    return {m: float(np.mean([q[m] for q in per_query])) for m in per_query[0]}


def mean_block_metrics(blocks: Sequence[dict[str, np.ndarray]]) -> dict[str, float]:
    """Mean of each metric over the queries of every block."""
    if not blocks:
        return {}
    return {m: float(np.concatenate([b[m] for b in blocks]).mean()) for m in blocks[0]}
