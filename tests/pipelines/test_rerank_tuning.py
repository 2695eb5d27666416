"""The search parameter tuned per re-ranking depth: an index build records, for each `--rerank
K`, the smallest nprobe whose top K candidates hold the target share of the true top k, and a
searcher with `--rerank K` searches at that nprobe (the k-level value stops where the codes
cap recall, which is too narrow a search for re-ranking)."""

from __future__ import annotations

from pathlib import Path

import faiss
import httpx
import numpy as np
import pytest

from bob_cache.pipelines.index import build_index
from bob_cache.pipelines.query import QueryConfig, Searcher
from bob_cache.pipelines.serve import create_app
from bob_cache.retrieval import faiss_ops
from bob_cache.retrieval.kinds import get_kind
from bob_cache.stores import open_store
from bob_cache.stores.index_store import get_record
from tests.conftest import write_feature_sets
from tests.loadtest import serve_in_thread
from tests.pipelines.test_index_sharded import PATH, cfg, load
from tests.pipelines.test_query_sharded import exact, queries, recall


def test_candidate_recall_is_the_share_of_the_true_top_k_among_the_candidates() -> None:
    rng = np.random.default_rng(0)
    truth = np.stack([rng.permutation(500)[:10] for _ in range(30)])
    found = np.stack([rng.permutation(500)[:200] for _ in range(30)])
    found[:5, :10] = truth[:5]  # some queries find all of theirs at once
    for depth in (10, 50, 200):
        want = np.mean([np.isin(t, f[:depth]).mean() for f, t in zip(found, truth, strict=True)])
        assert faiss_ops.candidate_recall(found, truth, 10, depth) == pytest.approx(want)
    assert faiss_ops.candidate_recall(found, truth, 10, 10) == faiss_ops.recall_at_k(
        found, truth, 10
    )
    padded = np.full((1, 50), -1)
    padded[0, :3] = truth[0, :3]
    assert faiss_ops.candidate_recall(padded, truth[:1], 10, 50) == pytest.approx(0.3)


def test_each_depth_takes_the_smallest_value_that_reaches_the_target() -> None:
    rows = [
        {"value": 1, "recall": 0.3, "candidates": {"20": 0.50, "100": 0.80}},
        {"value": 2, "recall": 0.4, "candidates": {"20": 0.70, "100": 0.96}},
        {"value": 4, "recall": 0.4, "candidates": {"20": 0.90, "100": 0.99}},
    ]
    picked = faiss_ops.pick_rerank(rows, 0.95)
    assert picked["100"] == {"value": 2, "recall": 0.96, "reached": True}
    assert picked["20"] == {"value": 4, "recall": 0.90, "reached": False}  # the best, said so
    plateau = [
        {"value": 2, "recall": 0.3, "candidates": {"100": 0.70}},
        {"value": 4, "recall": 0.3, "candidates": {"100": 0.848}},
        {"value": 8, "recall": 0.3, "candidates": {"100": 0.850}},  # 0.002 more, twice the lists
        {"value": 16, "recall": 0.3, "candidates": {"100": 0.849}},
    ]
    assert faiss_ops.pick_rerank(plateau, 0.95)["100"] == {
        "value": 4,
        "recall": 0.848,
        "reached": False,
    }  # the cheapest value of the plateau
    assert faiss_ops.pick_rerank([{"value": 8, "recall": 1.0}], 0.95) == {}
    assert faiss_ops.rerank_value(picked, 100) == picked["100"]
    assert faiss_ops.rerank_value(picked, 150) == picked["100"]  # the deepest tuned ≤ K
    assert faiss_ops.rerank_value(picked, 60) == picked["20"]
    assert faiss_ops.rerank_value(picked, 15) is None  # below every depth: the k-level value


def test_depths_are_tuned_for_nprobe_kinds_only() -> None:
    assert faiss_ops.rerank_depths(get_kind("ivfpq"), 10, 1497) == [
        20,
        50,
        100,
        200,
        300,
        500,
        1000,
    ]
    assert faiss_ops.rerank_depths(get_kind("ivfpq"), 10, 120) == [20, 50, 100]
    assert faiss_ops.rerank_depths(get_kind("ivfpq"), 100, 10**6) == [200, 300, 500, 1000]
    assert faiss_ops.rerank_depths(get_kind("hnsw"), 10, 10**6) == []  # it widens itself to K


N_ROWS = 3000


@pytest.fixture(scope="module")
def capped(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """4-byte PQ codes of 16-dim Gaussian vectors: recall@10 of the codes alone stays near 0.6,
    so the k-level value is the best of a poor lot, and re-ranking needs its own."""
    store = tmp_path_factory.mktemp("capped") / "s"
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N_ROWS, 16)).astype(np.float32)
    write_feature_sets(store, {"train": (x, rng.integers(0, 4, N_ROWS))}, shard_rows=128)
    params = {"nlist": 32, "m": 4}
    build_index(cfg(store, name="one", kind="ivfpq", target_recall=0.95, params=params))
    build_index(cfg(store, name="parts", kind="ivfpq", target_recall=0.95, params=params, shards=3))
    return store


def test_the_build_records_a_value_per_depth_and_parts_agree(capped: Path) -> None:
    fs = open_store(capped).get(PATH)
    one, parts = get_record(fs, "one"), get_record(fs, "parts")
    assert one.recall < 0.8  # the codes cap recall@10: the k-level value is the best of a poor lot
    assert set(one.rerank) == {"20", "50", "100", "200", "300", "500", "1000"}
    assert one.rerank == parts.rerank  # the same lists, the same held-out rows, the same sweep
    assert one.rerank["100"]["reached"] and one.rerank["100"]["recall"] >= 0.95
    assert one.rerank["100"]["value"] < one.search_value  # fewer lists suffice with re-ranking
    assert not one.rerank["20"]["reached"]  # 20 candidates cannot hold enough: said so
    reached = [one.rerank[d]["value"] for d in one.rerank if one.rerank[d]["reached"]]
    assert reached == sorted(reached, reverse=True)  # deeper candidates need no more lists


def test_rerank_searches_at_its_depths_value_and_reaches_the_target(
    capped: Path, tmp_path: Path
) -> None:
    fs = open_store(capped).get(PATH)
    record = get_record(fs, "one")
    tuned = record.rerank["100"]
    config = QueryConfig(str(capped), "toy", "model", index="one", rerank=100)
    searcher = Searcher.open(config)
    assert searcher.search_value == tuned["value"] and searcher.expected_recall == tuned["recall"]
    assert faiss.extract_index_ivf(searcher.index).nprobe == tuned["value"]
    q = queries(capped, n=60)  # fresh queries, not the tuning ones
    truth = exact(capped, q, 10)
    reranked = recall(searcher.search(q, 10).rows, truth)
    assert reranked >= 0.9, reranked
    plain_width = Searcher.open(QueryConfig(str(capped), "toy", "model", index="one"))
    assert plain_width.search_value == record.search_value != tuned["value"]
    # recomputed outside the searcher: the in-memory index's top 100 at that nprobe
    index = load(capped, "one")
    faiss.extract_index_ivf(index).nprobe = tuned["value"]
    found = index.search(faiss_ops.prepare(q, "cosine"), 100)[1]
    share = np.mean([np.isin(t, f).mean() for f, t in zip(found, truth, strict=True)])
    assert share == pytest.approx(reranked, abs=0.02)  # rescoring finds what the top 100 hold
    at_k_level = Searcher.open(QueryConfig(str(capped), "toy", "model", index="one", rerank=15))
    assert at_k_level.search_value == record.search_value  # below every tuned depth
    deeper = Searcher.open(QueryConfig(str(capped), "toy", "model", index="one", rerank=150))
    assert deeper.search_value == tuned["value"]  # the deepest tuned depth ≤ 150


def test_health_reports_the_value_searched_and_its_recall(capped: Path) -> None:
    searcher = Searcher.open(QueryConfig(str(capped), "toy", "model", index="one", rerank=100))
    with serve_in_thread(create_app(searcher, load_model=False, health_ttl=0)) as url:
        health = httpx.get(f"{url}/health", timeout=30).json()
    assert health["rerank"] == 100 and health["search_param"] == "nprobe"
    assert health["search_value"] == searcher.search_value
    assert health["recall"] == searcher.expected_recall >= 0.95
    assert health["rows"] == N_ROWS


def test_the_build_prints_the_value_per_depth(cli, capped: Path) -> None:
    sel = ("--store", capped, "--dataset", "toy", "--backbone", "model")
    built = cli("index", "build", *sel, "--kind", "ivfpq", "--nlist", "32", "--pq-bytes", "4",
                "--name", "printed")  # fmt: skip
    assert built.exit_code == 0, built.output
    record = get_record(open_store(capped).get(PATH), "printed")
    tuned = record.rerank["100"]
    assert f"100: nprobe={tuned['value']} ({tuned['recall']:.3f})" in built.output
    assert "20: nprobe=" in built.output and "below target" in built.output


def test_a_depth_short_of_the_target_names_the_depth_that_reached_it(capped: Path) -> None:
    record = get_record(open_store(capped).get(PATH), "one")
    short = record.rerank["20"]
    assert not short["reached"]
    reached = min(int(d) for d, t in record.rerank.items() if t["reached"])
    searcher = Searcher.open(QueryConfig(str(capped), "toy", "model", index="one", rerank=20))
    assert searcher.note is not None
    assert f"held {short['recall']:.3f} of the true top 10" in searcher.note
    assert (
        f"--rerank {reached} reached {record.rerank[str(reached)]['recall']:.3f}" in searcher.note
    )
    fine = Searcher.open(QueryConfig(str(capped), "toy", "model", index="one", rerank=100))
    assert fine.note is None
    with serve_in_thread(create_app(searcher, load_model=False, health_ttl=0)) as url:
        answer = httpx.post(f"{url}/query/vector", json={"vectors": [[0.1] * 16], "k": 5})
    assert answer.status_code == 200 and answer.json()["note"] == searcher.note


@pytest.mark.parametrize("index", ["flat", None])  # a flat index; no index (exact search)
def test_rerank_on_an_exact_index_is_ignored_with_a_note(tmp_path: Path, index: str | None) -> None:
    rng = np.random.default_rng(3)
    x = rng.standard_normal((300, 16)).astype(np.float32)
    store = tmp_path / "s"
    write_feature_sets(store, {"train": (x, rng.integers(0, 3, 300))})
    if index:
        build_index(cfg(store, kind=index, name=index))
    cache = tmp_path / "cache"
    config = QueryConfig(str(store), "toy", "model", index=index, rerank=5, index_cache=str(cache))
    searcher = Searcher.open(config)  # --rerank 5 < k=10 is no error either: it does nothing
    assert searcher.reranker is None and searcher.rerank_depth is None
    assert "--rerank 5 is ignored: the index is exact" in (searcher.note or "")
    plain = Searcher.open(QueryConfig(str(store), "toy", "model", index=index))
    q = queries(store, n=20)
    assert np.array_equal(searcher.search(q, 10).rows, plain.search(q, 10).rows)
    assert not cache.exists() or not any(cache.rglob("*"))  # no float16 copy of the set written
    with serve_in_thread(create_app(searcher, load_model=False, health_ttl=0)) as url:
        assert httpx.get(f"{url}/health", timeout=30).json()["rerank"] is None
