"""Retrieval metrics over full rankings.

``classes`` protocol (BoB on class-folder datasets): a database row is relevant to a query
when it shares the query's class. AP is the mean precision at the rank of each relevant row (what
scikit-learn's ``average_precision_score`` computes for untied scores); precision@k,
recall@k and reciprocal rank come from the same ranking.

``gnd`` protocol (Revisited Oxford/Paris, Radenović et al. 2018): each query lists easy,
hard and junk database images; Easy counts easy as positive (hard and junk ignored), Medium
counts easy+hard (junk ignored), Hard counts hard (easy and junk ignored). Ignored images are
removed from the ranking before scoring, and AP is the protocol's own trapezoidal average
precision (``compute_ap`` of the revisitop code), so the numbers compare with published ones.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

KS = (1, 5, 10)


def classes_block_metrics(
    scores: np.ndarray, relevant: np.ndarray, ks: Sequence[int] = KS
) -> dict[str, np.ndarray]:
    """Per-query metrics of a block of queries: ``scores`` ``(B, N)`` over the database
    (higher is closer) and ``relevant`` ``(B, N)`` booleans, each row with a True.

    AP is the mean precision at each relevant row's rank, i.e. scikit-learn's
    ``average_precision_score`` (the tests check they agree), computed for the whole block
    at once: a per-query call costs milliseconds, a block costs one sort.
    """
    order = np.argsort(-scores, axis=1, kind="stable")
    hits = np.take_along_axis(relevant, order, axis=1)
    n_rel = hits.sum(1)
    found = np.cumsum(hits, axis=1)
    precision = found / np.arange(1, hits.shape[1] + 1)
    out = {"map": (precision * hits).sum(1) / n_rel}
    for k in ks:
        out[f"precision@{k}"] = found[:, min(k, hits.shape[1]) - 1] / k
        out[f"recall@{k}"] = found[:, min(k, hits.shape[1]) - 1] / n_rel
    out["mrr"] = 1.0 / (hits.argmax(1) + 1)
    return out


def revisited_ap(ranks: np.ndarray, n_positive: int) -> float:
    """Revisited Oxford/Paris AP: ``ranks`` are the 0-based positions of the positives in
    the ranking with ignored images removed (sorted ascending)."""
    ap = 0.0
    step = 1.0 / n_positive
    for j, rank in enumerate(np.sort(ranks)):
        precision_before = 1.0 if rank == 0 else j / rank
        precision_at = (j + 1) / (rank + 1)
        ap += (precision_before + precision_at) * step / 2
    return ap


def gnd_query_metrics(
    ranking: np.ndarray, positive: np.ndarray, ignore: np.ndarray, ks: Sequence[int] = KS
) -> dict[str, float]:
    """Metrics of one query from its full ranking (database indices, best first)."""
    kept = ranking[~np.isin(ranking, ignore)]
    hits = np.isin(kept, positive)
    ranks = np.flatnonzero(hits)
    n_pos = len(np.unique(positive))
    out = {"map": revisited_ap(ranks, n_pos)}
    for k in ks:
        top = int(hits[:k].sum())
        out[f"precision@{k}"] = top / k
        out[f"recall@{k}"] = top / n_pos
    out["mrr"] = 1.0 / (int(ranks[0]) + 1) if len(ranks) else 0.0
    return out


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
