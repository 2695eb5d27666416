"""Metric definitions for retrieval: hand-worked rankings, revisitop's compute_map, sklearn."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from bob_cache.errors import SpecError
from bob_cache.retrieval.metrics import (
    classes_block_metrics,
    get_metrics_definition,
    gnd_query_metrics,
    list_metrics_definitions,
)

KS = (1, 5, 10)


# A port of revisitop's python/evaluate.py (filipradenovic/revisitop), loop for loop, as the
# reference: numpy only, no shared code with bob_cache.


def revisitop_compute_ap(ranks: np.ndarray, nres: int) -> float:
    """compute_ap: ``ranks`` are the 0-based ranks of the positives, ``nres`` how many."""
    ap = 0.0
    recall_step = 1.0 / nres
    for j in np.arange(len(ranks)):
        rank = ranks[j]
        precision_0 = 1.0 if rank == 0 else float(j) / rank
        precision_1 = float(j + 1) / (rank + 1)
        ap += (precision_0 + precision_1) * recall_step / 2.0
    return ap


def revisitop_compute_map(
    ranks: np.ndarray, gnd: list[dict[str, np.ndarray]], kappas: tuple[int, ...]
) -> tuple[np.ndarray, np.ndarray]:
    """compute_map's per-query ``aps`` and ``prs``: ``ranks`` is db_size × queries (database
    indices, best first), ``gnd[i]`` holds ``ok`` and ``junk`` database indices."""
    nq = len(gnd)
    aps = np.zeros(nq)
    prs = np.zeros((nq, len(kappas)))
    for i in np.arange(nq):
        qgnd = gnd[i]["ok"]
        if qgnd.shape[0] == 0:
            aps[i] = float("nan")
            prs[i, :] = float("nan")
            continue
        qgndj = gnd[i].get("junk", np.empty(0))
        pos = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgnd)]
        junk = np.arange(ranks.shape[0])[np.isin(ranks[:, i], qgndj)]
        k = 0
        ij = 0
        if len(junk):
            # move each positive up by the number of junk images ranked before it
            ip = 0
            while ip < len(pos):
                while ij < len(junk) and pos[ip] > junk[ij]:
                    k += 1
                    ij += 1
                pos[ip] = pos[ip] - k
                ip += 1
        aps[i] = revisitop_compute_ap(pos, len(qgnd))
        pos += 1  # 1-based
        for j in np.arange(len(kappas)):
            kq = min(max(pos), kappas[j])
            prs[i, j] = (pos <= kq).sum() / kq
    return aps, prs


def block(hits: list[int], ks: tuple[int, ...] = KS, definition: str = "sklearn") -> dict:
    """Metrics of one ranking given as 0/1 hits, best first (scores n, n-1, ..., 1)."""
    relevant = np.array([hits], dtype=bool)
    scores = np.arange(len(hits), 0, -1, dtype=float)[None, :]
    m = classes_block_metrics(scores, relevant, ks, definition=definition)
    return {name: float(v[0]) for name, v in m.items()}


def test_registry_lists_both_definitions_and_names_the_fix() -> None:
    assert list_metrics_definitions() == ["sklearn", "revisitop"]
    assert "trapezoidal" in get_metrics_definition("revisitop").description
    with pytest.raises(SpecError, match="Did you mean 'revisitop'.*sklearn, revisitop"):
        get_metrics_definition("revistop")


def test_positives_at_ranks_1_and_3_of_5_worked_by_hand() -> None:
    hits = [1, 0, 1, 0, 0]  # 2 positives, at 1-based ranks 1 and 3
    sk = block(hits, definition="sklearn")
    rv = block(hits, definition="revisitop")
    # sklearn AP: mean precision at each positive = (1/1 + 2/3) / 2 = 5/6
    assert sk["map"] == pytest.approx(5 / 6)
    # trapezoidal AP, recall step 1/2; positive j=0 at 0-based rank 0: p0 = 1, p1 = 1/1
    # → (1 + 1)/2 · 1/2 = 1/2; j=1 at rank 2: p0 = 1/2, p1 = 2/3 → (1/2 + 2/3)/2 · 1/2 = 7/24
    # → AP = 12/24 + 7/24 = 19/24 (< 5/6 = 20/24)
    assert rv["map"] == pytest.approx(19 / 24)
    # P@5: plain = 2 hits / 5; capped: last positive at rank 3, k' = min(5, 3) = 3 → 2/3
    assert sk["precision@5"] == pytest.approx(2 / 5)
    assert rv["precision@5"] == pytest.approx(2 / 3)
    # P@10 past the end of a 5-long ranking: plain 2/10; capped k' = min(10, 3) = 3 → 2/3
    assert sk["precision@10"] == pytest.approx(2 / 10)
    assert rv["precision@10"] == pytest.approx(2 / 3)
    # P@1 = 1 both ways (k' = min(1, 3) = 1); recall and MRR do not depend on the definition
    for m in (sk, rv):
        assert (m["precision@1"], m["recall@1"], m["recall@5"], m["mrr"]) == (1.0, 0.5, 1.0, 1.0)


def test_first_positive_late_worked_by_hand() -> None:
    hits = [0, 1, 0, 0, 1]  # positives at 1-based ranks 2 and 5
    sk = block(hits, definition="sklearn")
    rv = block(hits, definition="revisitop")
    assert sk["map"] == pytest.approx((1 / 2 + 2 / 5) / 2)  # 0.45
    # j=0 at rank 1: p0 = 0/1, p1 = 1/2 → (0 + 1/2)/2 · 1/2 = 1/8
    # j=1 at rank 4: p0 = 1/4, p1 = 2/5 → (1/4 + 2/5)/2 · 1/2 = 13/80 → AP = 23/80
    assert rv["map"] == pytest.approx(1 / 8 + 13 / 80)
    # last positive at rank 5, so k' = min(5, 5) = 5: both P@5 = 2/5; P@1 = 0 both
    assert sk["precision@5"] == rv["precision@5"] == pytest.approx(2 / 5)
    assert sk["precision@1"] == rv["precision@1"] == 0.0
    assert sk["mrr"] == rv["mrr"] == pytest.approx(1 / 2)


def test_gnd_junk_is_removed_before_either_definition_scores() -> None:
    ranking = np.array([7, 3, 9, 5, 1])  # database indices, best first
    positive, junk = np.array([9, 5]), np.array([3])
    # 3 is junk: the ranking scored is [7, 9, 5, 1], positives at 0-based ranks 1 and 2
    rv = gnd_query_metrics(ranking, positive, junk, definition="revisitop")
    sk = gnd_query_metrics(ranking, positive, junk, definition="sklearn")
    # trapezoidal: (0/1 + 1/2)/2 · 1/2 = 1/8; (1/2 + 2/3)/2 · 1/2 = 7/24 → 10/24 = 5/12
    assert rv["map"] == pytest.approx(5 / 12)
    assert sk["map"] == pytest.approx((1 / 2 + 2 / 3) / 2)  # 7/12
    # P@5: capped at the last positive's rank 3 → 2/3; plain 2/5 (junk no longer fills a slot)
    assert rv["precision@5"] == pytest.approx(2 / 3) and sk["precision@5"] == pytest.approx(0.4)
    assert rv["mrr"] == sk["mrr"] == pytest.approx(1 / 2)
    # kept as a miss, junk pushes the positives to ranks 2 and 3:
    # (0/2 + 1/3)/4 + (1/3 + 2/4)/4 = 1/12 + 5/24 = 7/24 < 5/12
    no_junk = gnd_query_metrics(ranking, positive, np.array([], int), definition="revisitop")
    assert no_junk["map"] == pytest.approx(7 / 24)
    # the gnd default is revisitop's
    assert gnd_query_metrics(ranking, positive, junk) == rv


def random_queries(seed: int, nq: int = 40, n_db: int = 60) -> tuple[np.ndarray, list[dict]]:
    """Scores (nq × n_db, untied) and per query 1–8 positives and 0–6 junk (disjoint); the
    positives' scores are raised by up to 4, so some queries rank all of them early."""
    rng = np.random.default_rng(seed)
    scores = rng.normal(size=(nq, n_db))
    gnd = []
    for i in range(nq):
        picked = rng.permutation(n_db)
        n_ok, n_junk = rng.integers(1, 9), rng.integers(0, 7)
        gnd.append({"ok": picked[:n_ok], "junk": picked[n_ok : n_ok + n_junk]})
        scores[i, picked[:n_ok]] += rng.uniform(0, 4)
    return scores, gnd


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_revisitop_definition_equals_ported_compute_map(seed: int) -> None:
    scores, gnd = random_queries(seed)
    ranks = np.argsort(-scores.T, axis=0)  # revisitop's layout: db_size × queries
    aps, prs = revisitop_compute_map(ranks, gnd, KS)
    capped = 0
    for i, g in enumerate(gnd):
        m = gnd_query_metrics(ranks[:, i], g["ok"], g["junk"], definition="revisitop")
        assert m["map"] == pytest.approx(aps[i], abs=1e-12)
        got = [m[f"precision@{k}"] for k in KS]
        np.testing.assert_allclose(got, prs[i], atol=1e-12)
        capped += int(not np.isclose(prs[i, 2], m["recall@10"] * len(g["ok"]) / 10))
    assert capped > 0  # some queries have every positive in their top 10: the cap mattered
    # classes: no junk; a whole block at once
    relevant = np.zeros(scores.shape, bool)
    for i, g in enumerate(gnd):
        relevant[i, g["ok"]] = True
    aps, prs = revisitop_compute_map(ranks, [{"ok": g["ok"]} for g in gnd], KS)
    m = classes_block_metrics(scores, relevant, definition="revisitop")
    np.testing.assert_allclose(m["map"], aps, atol=1e-12)
    for j, k in enumerate(KS):
        np.testing.assert_allclose(m[f"precision@{k}"], prs[:, j], atol=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_sklearn_definition_equals_average_precision_score(seed: int) -> None:
    scores, gnd = random_queries(seed)
    relevant = np.zeros(scores.shape, bool)
    for i, g in enumerate(gnd):
        relevant[i, g["ok"]] = True
    m = classes_block_metrics(scores, relevant, definition="sklearn")
    order = np.argsort(-scores, axis=1)
    for i in range(len(scores)):
        assert m["map"][i] == pytest.approx(average_precision_score(relevant[i], scores[i]))
        for k in KS:
            assert m[f"precision@{k}"][i] == relevant[i, order[i, :k]].sum() / k
    # gnd under sklearn: average_precision_score over the database without the junk rows
    for i, g in enumerate(gnd):
        keep = ~np.isin(np.arange(scores.shape[1]), g["junk"])
        want = average_precision_score(relevant[i, keep], scores[i, keep])
        got = gnd_query_metrics(order[i], g["ok"], g["junk"], definition="sklearn")["map"]
        assert got == pytest.approx(want)
    assert classes_block_metrics(scores, relevant)["map"].tolist() == m["map"].tolist()
