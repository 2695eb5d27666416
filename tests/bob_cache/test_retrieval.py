"""Retrieval building blocks: index kinds, auto choice, exact search, tuning, metrics, gnd."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score

from bob_cache.errors import DataNotFoundError, GroundTruthError, SpecError
from bob_cache.retrieval import faiss_ops
from bob_cache.retrieval.auto import parse_memory, resolve_kind
from bob_cache.retrieval.gnd import load_ground_truth, match_names
from bob_cache.retrieval.kinds import default_nlist, get_kind, pq_subquantizers
from bob_cache.retrieval.metrics import classes_block_metrics, gnd_query_metrics


def clustered(n: int, dim: int = 32, clusters: int = 40, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.normal(size=(clusters, dim))
    return (centers[rng.integers(0, clusters, n)] + 0.6 * rng.normal(size=(n, dim))).astype(
        np.float32
    )


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_exact_search_agrees_with_numpy_brute_force(metric: str) -> None:
    x = faiss_ops.prepare(clustered(3000), metric)
    q = faiss_ops.prepare(clustered(25, seed=1), metric)
    chunks = [(x[a : a + 700], np.arange(a, min(a + 700, len(x)))) for a in range(0, 3000, 700)]
    _, found = faiss_ops.exact_neighbours(q, chunks, 10, metric)
    if metric == "cosine":
        expected = np.argsort(-(q @ x.T), axis=1)[:, :10]
    else:
        expected = np.argsort(((q[:, None, :] - x[None]) ** 2).sum(-1), axis=1)[:, :10]
    np.testing.assert_array_equal(found, expected)
    index = faiss_ops.create_index(get_kind("flat"), x.shape[1], metric, {})
    index.add_with_ids(x, np.arange(len(x)))
    np.testing.assert_array_equal(index.search(q, 10)[1], expected)


@pytest.mark.parametrize("metric", ["cosine", "l2"])
def test_a_few_exact_queries_scanned_by_blas_find_faiss_neighbours(
    metric: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(faiss_ops, "BLAS_SCAN_MIN_ROWS", 0)
    x = faiss_ops.prepare(clustered(1001), metric)
    index = faiss_ops.create_index(get_kind("flat"), x.shape[1], metric, {})
    index.add_with_ids(x, np.arange(len(x)) * 5 + 3)  # ids are not positions
    for q in (x[[17]] + 0.01, x[[17, 900, 3]]):
        scores, found = faiss_ops.search(index, q, 10)
        want_scores, want = index.search(q, 10)
        np.testing.assert_array_equal(found, want)
        np.testing.assert_allclose(scores, want_scores, rtol=1e-4, atol=1e-4)
    assert faiss_ops.search(index, x[[17]], 1)[1].tolist() == [[17 * 5 + 3]]
    small = faiss_ops.create_index(get_kind("flat"), x.shape[1], metric, {})
    small.add_with_ids(x[:5], np.arange(5))
    scores, found = faiss_ops.search(small, x[[2]], 8)  # k above the rows: padded like faiss
    np.testing.assert_array_equal(found, small.search(x[[2]], 8)[1])
    assert found[0, 5:].tolist() == [-1, -1, -1] and np.isinf(scores[0, 5:]).all()


@pytest.mark.parametrize("kind", ["flat", "hnsw", "ivf"])
def test_wrapped_indexes_are_searched_through_their_id_map_without_faiss_wrapper(
    kind: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``IndexIDMap2.search`` wakes every OpenMP thread per call (40× slower batch-1 on a
    shared machine): bob searches the inner index and maps ids itself, with equal answers."""
    import faiss

    x = faiss_ops.prepare(clustered(3000), "cosine")
    spec = get_kind(kind)
    index = faiss_ops.create_index(spec, x.shape[1], "cosine", spec.defaults(len(x), 32))
    index.train(x)
    index.add_with_ids(x, np.arange(len(x)) * 7 + 11)
    faiss_ops.set_search_param(index, spec, 8 if kind != "flat" else None)
    q = x[[5, 2999, 40]] + 0.01
    want = index.search(q, 12)
    monkeypatch.setattr(faiss.IndexIDMap2, "search", _refuse_wrapper_search)
    for rows in (q, q[:1]):
        scores, found = faiss_ops.search(index, rows, 12)
        np.testing.assert_array_equal(found, want[1][: len(rows)])
        np.testing.assert_allclose(scores, want[0][: len(rows)], rtol=1e-5, atol=1e-5)
    empty = faiss_ops.create_index(get_kind("flat"), x.shape[1], "cosine", {})
    assert (faiss_ops.search(empty, q, 3)[1] == -1).all()


def _refuse_wrapper_search(*args: object, **kwargs: object) -> None:
    raise AssertionError("IndexIDMap2.search was called: the OpenMP id mapping is back")


@pytest.mark.parametrize("kind", ["hnsw", "ivf"])
def test_tuned_index_reaches_the_recall_it_reports_on_fresh_queries(kind: str) -> None:
    x = faiss_ops.prepare(clustered(20000), "cosine")
    spec = get_kind(kind)
    index = faiss_ops.create_index(spec, 32, "cosine", spec.defaults(len(x), 32))
    index.train(x)
    index.add_with_ids(x, np.arange(len(x)))
    tune_q = faiss_ops.prepare(clustered(300, seed=2), "cosine")
    _, truth = faiss_ops.exact_neighbours(tune_q, [(x, np.arange(len(x)))], 10, "cosine")
    tuning = faiss_ops.tune(index, spec, tune_q, truth, k=10, target=0.9)
    assert tuning.reached and tuning.recall >= 0.9
    assert tuning.value == min(r["value"] for r in tuning.sweep if r["recall"] >= 0.9)
    fresh = faiss_ops.prepare(clustered(300, seed=3), "cosine")
    _, truth = faiss_ops.exact_neighbours(fresh, [(x, np.arange(len(x)))], 10, "cosine")
    assert faiss_ops.recall_at_k(index.search(fresh, 10)[1], truth, 10) >= 0.85


def test_auto_picks_by_size_budget_and_target_recall() -> None:
    def auto(budget: str | None, target: float = 0.95) -> tuple[str, dict]:
        memory = parse_memory(budget)
        choice = resolve_kind(
            "auto", 1_000_000, 768, max_memory=memory, params={}, target_recall=target
        )
        assert memory is None or choice.bytes <= memory
        return choice.kind.name, choice.params

    assert resolve_kind("auto", 10_000, 768, max_memory=None, params={}).kind.name == "flat"
    assert auto("8GB")[0] == "hnsw"
    assert auto("8GB", target=0.99)[0] == "ivf"  # beyond what the graph reaches cheaply
    assert auto("3.1GB")[0] == "ivf"
    assert auto("1GB") == ("ivfsq", {"nlist": 4096, "bits": 8})
    assert auto("500MB") == ("ivfsq", {"nlist": 4096, "bits": 4})
    kind, params = auto("200MB")
    assert kind == "ivfpq" and 768 % params["m"] == 0 and params["m"] > 96
    with pytest.raises(SpecError, match="Raise --max-memory"):
        resolve_kind("auto", 1_000_000, 768, max_memory=parse_memory("10MB"), params={})
    with pytest.raises(SpecError, match="use --kind auto"):
        resolve_kind("hnsw", 1_000_000, 768, max_memory=parse_memory("1GB"), params={})


def test_bad_code_sizes_are_refused_with_the_valid_choices() -> None:
    with pytest.raises(SpecError, match="--pq-bytes 5 must split the dimension 768"):
        resolve_kind("ivfpq", 10_000, 768, max_memory=None, params={"m": 5})
    with pytest.raises(SpecError, match="--sq-bits 5 is not one of 8, 6, 4"):
        resolve_kind("ivfsq", 10_000, 768, max_memory=None, params={"bits": 5})


@pytest.mark.parametrize("kind", ["ivfsq", "ivfpq"])
def test_compressed_kinds_build_and_reach_a_recall(kind: str) -> None:
    x = faiss_ops.prepare(clustered(10_000), "cosine")
    spec = get_kind(kind)
    params = {**spec.defaults(len(x), 32), **({"m": 16} if kind == "ivfpq" else {})}
    index = faiss_ops.create_index(spec, 32, "cosine", params)
    assert not getattr(index, "do_polysemous_training", False)  # "np": minutes saved
    index.train(x)
    index.add_with_ids(x, np.arange(len(x)))
    q = faiss_ops.prepare(clustered(200, seed=5), "cosine")
    _, truth = faiss_ops.exact_neighbours(q, [(x, np.arange(len(x)))], 10, "cosine")
    tuning = faiss_ops.tune(index, spec, q, truth, k=10, target=0.8)
    assert tuning.reached and 0.8 <= tuning.recall <= 1.0


def test_kind_helpers_and_bad_names() -> None:
    assert default_nlist(1_000_000) == 4096 and default_nlist(100) == 2
    assert pq_subquantizers(768, 100) == 96 and pq_subquantizers(768, 0.5) is None
    assert pq_subquantizers(768, 1000) == 384  # at least 2 dimensions per sub-quantizer
    assert parse_memory("512MiB") == 512 * 2**20 and parse_memory("2e9") == 2_000_000_000
    with pytest.raises(SpecError, match="Did you mean 'hnsw'"):
        get_kind("hnws")
    with pytest.raises(SpecError, match="Examples: 4GB"):
        parse_memory("lots")


def test_classes_metrics_agree_with_sklearn_and_hand_values() -> None:
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(20, 50))
    relevant = rng.random((20, 50)) < 0.2
    relevant[:, 0] = True
    got = classes_block_metrics(scores, relevant)
    for i in range(20):
        assert got["map"][i] == pytest.approx(average_precision_score(relevant[i], scores[i]))
    # hand-made: ranking r r n r n ... (3 relevant of 6)
    s = np.array([[6.0, 5, 4, 3, 2, 1]])
    rel = np.array([[True, True, False, True, False, False]])
    m = classes_block_metrics(s, rel, ks=(1, 5))
    assert m["map"][0] == pytest.approx((1 + 1 + 3 / 4) / 3)
    assert (m["precision@1"][0], m["precision@5"][0], m["recall@5"][0]) == (1.0, 0.6, 1.0)
    assert m["mrr"][0] == 1.0
    m = classes_block_metrics(np.array([[3.0, 2, 1]]), np.array([[False, False, True]]))
    assert m["mrr"][0] == pytest.approx(1 / 3)


def test_gnd_junk_handling_matches_hand_computation() -> None:
    ranking = np.array([7, 3, 9, 5, 1])  # database indices, best first
    # 3 is junk: removed, so positives 9 and 5 sit at ranks 1 and 2 of [7, 9, 5, 1]
    m = gnd_query_metrics(ranking, positive=np.array([9, 5]), ignore=np.array([3]), ks=(1, 5))
    expected = ((0 / 1 + 1 / 2) / 2 + (1 / 2 + 2 / 3) / 2) / 2
    assert m["map"] == pytest.approx(expected)
    assert m["precision@1"] == 0.0 and m["recall@5"] == 1.0 and m["mrr"] == pytest.approx(1 / 2)
    # without the junk rule 3 would count as a miss and lower AP
    plain = gnd_query_metrics(ranking, positive=np.array([9, 5]), ignore=np.array([], int))
    assert plain["map"] < m["map"]


def test_ground_truth_file_is_validated(tmp_path: Path) -> None:
    good = {"imlist": ["a", "b", "c"], "qimlist": ["q"], "gnd": [{"easy": [0], "hard": [2]}]}
    path = tmp_path / "gnd.json"
    path.write_text(json.dumps(good))
    truth = load_ground_truth(path)
    pos, ign = truth.split(0, "medium")
    assert sorted(pos.tolist()) == [0, 2] and ign.tolist() == []
    assert truth.split(0, "hard")[1].tolist() == [0]  # easy ignored under Hard
    cases = {
        "missing-keys": ({"imlist": []}, "needs keys imlist, qimlist and gnd"),
        "count": ({**good, "gnd": []}, "1 queries in qimlist but 0 gnd"),
        "range": ({**good, "gnd": [{"easy": [5]}]}, r"positions in \[0, 3\)"),
    }
    for name, (raw, message) in cases.items():
        bad = tmp_path / f"{name}.json"
        bad.write_text(json.dumps(raw))
        with pytest.raises(GroundTruthError, match=message):
            load_ground_truth(bad)
    (tmp_path / "broken.json").write_text("{not json")
    with pytest.raises(GroundTruthError, match="Cannot read ground truth"):
        load_ground_truth(tmp_path / "broken.json")
    with pytest.raises(DataNotFoundError, match="Check --gnd"):
        load_ground_truth(tmp_path / "absent.json")


REVISITOP_LIKE = {  # the structure of revisitop's gnd_roxford5k.pkl, in miniature
    "imlist": ["all_souls_000013", "all_souls_000026", "oxford_003410"],
    "qimlist": ["all_souls_000013"],
    "gnd": [{"bbx": [136.5, 34.1, 648.5, 955.4], "easy": [1], "hard": [2], "junk": [0]}],
}


@pytest.mark.parametrize("protocol", [2, 4, pickle.HIGHEST_PROTOCOL])
def test_revisitop_style_pickles_load(tmp_path: Path, protocol: int) -> None:
    raw = {**REVISITOP_LIKE, "extra": ({1, 2}, frozenset({3}), (True, None, 1.5))}
    path = tmp_path / "gnd_test.pkl"
    path.write_bytes(pickle.dumps(raw, protocol=protocol))
    truth = load_ground_truth(path)
    assert truth.imlist == REVISITOP_LIKE["imlist"] and truth.qimlist == ["all_souls_000013"]
    pos, ign = truth.split(0, "medium")
    assert pos.tolist() == [1, 2] and ign.tolist() == [0]


class _RunsCode:
    """What a malicious pickle looks like: unpickling it calls a function of its choosing."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple:
        return (os.system, (f"touch {self.marker}",))


def test_a_pickle_that_would_run_code_is_refused_and_runs_nothing(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "gnd_evil.pkl"
    evil.write_bytes(pickle.dumps({**REVISITOP_LIKE, "gnd": [_RunsCode(marker)]}))
    with pytest.raises(GroundTruthError, match=r"Refusing to unpickle (posix|os)\.system from"):
        load_ground_truth(evil)
    assert not marker.exists()
    pickle.loads(evil.read_bytes())  # the control: plain pickle would have run it
    assert marker.exists()
    marker.unlink()
    nested = tmp_path / "gnd_nested.pkl"  # a harmless-looking class is refused just the same
    nested.write_bytes(pickle.dumps({**REVISITOP_LIKE, "imlist": np.array(["a", "b", "c"])}))
    with pytest.raises(GroundTruthError, match=r"hold only dicts, lists.*ground truth as JSON"):
        load_ground_truth(nested)
    assert not marker.exists()


def test_names_match_ids_exactly_or_by_stem() -> None:
    ids = np.array(["jpg/all_souls_000013.jpg", "jpg/x.png", "y"])
    rows = match_names(["all_souls_000013", "jpg/x.png", "y", "zzz"], ids)
    assert rows.tolist() == [0, 1, 2, -1]
