"""Querying a sharded index: merged once into on-disk inverted lists in the index cache and
searched memory-mapped (the same answers as the parts merged in memory), `--rerank K`
rescoring from a float16 copy of the vectors, over the CLI and the service."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import numpy as np
import pytest

from bob_cache.errors import QueryError
from bob_cache.pipelines.index import build_index
from bob_cache.pipelines.query import QueryConfig, Searcher
from bob_cache.pipelines.serve import create_app
from bob_cache.retrieval import faiss_ops, ondisk
from bob_cache.stores import open_store
from tests.loadtest import serve_in_thread
from tests.pipelines.test_index_sharded import PATH, cfg, load, make_store


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = make_store(tmp_path_factory.mktemp("sharded") / "store")
    build_index(cfg(store, kind="ivfpq", shards=3, params={"nlist": 8, "m": 2}))
    return store


def queries(store: Path, n: int = 40) -> np.ndarray:
    fs = open_store(store).get(PATH)
    rng = np.random.default_rng(0)
    rows = np.sort(rng.choice(np.flatnonzero(fs.array("valid")[:]), n, replace=False))
    x = np.asarray(fs.features[:], np.float32)[rows]
    return x + rng.normal(0, 0.05, x.shape).astype(np.float32)


def exact(store: Path, q: np.ndarray, k: int) -> np.ndarray:
    fs = open_store(store).get(PATH)
    x = faiss_ops.prepare(np.asarray(fs.features[:], np.float32), "cosine")
    valid = np.asarray(fs.array("valid")[:], bool)
    scores = faiss_ops.prepare(q, "cosine") @ x.T
    scores[:, ~valid] = -np.inf
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def recall(found: np.ndarray, truth: np.ndarray) -> float:
    return float(
        np.mean([len(set(f) & set(t)) / len(t) for f, t in zip(found, truth, strict=True)])
    )


def test_a_sharded_index_is_served_from_disk_with_the_in_memory_answers(
    sharded: Path, tmp_path: Path
) -> None:
    config = QueryConfig(str(sharded), "toy", "model", index_cache=str(tmp_path / "cache"))
    searcher = Searcher.open(config)
    assert searcher.on_disk and searcher.n_indexed == 1497
    import faiss

    invlists = faiss.extract_index_ivf(searcher.index).invlists
    assert isinstance(faiss.downcast_InvertedLists(invlists), faiss.OnDiskInvertedLists)
    assert len(list((tmp_path / "cache").rglob(ondisk.MARKER))) == 1
    in_memory = load(sharded)
    faiss_ops.set_search_param(in_memory, searcher_kind(searcher), searcher.record.search_value)
    q = faiss_ops.prepare(queries(sharded), "cosine")
    want = in_memory.search(q, 10)
    got = searcher.search(q, 10)
    np.testing.assert_array_equal(got.rows, want[1])
    np.testing.assert_allclose(got.scores, want[0], rtol=1e-5)
    again = Searcher.open(config)  # the second open finds the merged index and maps it
    np.testing.assert_array_equal(again.search(q, 10).rows, want[1])


def searcher_kind(searcher: Searcher):
    from bob_cache.retrieval.kinds import get_kind

    return get_kind(searcher.record.kind)


def test_rerank_lifts_recall_past_the_codes(sharded: Path, tmp_path: Path) -> None:
    q = queries(sharded)
    truth = exact(sharded, q, 10)
    cache = str(tmp_path / "cache")
    plain = Searcher.open(QueryConfig(str(sharded), "toy", "model", index_cache=cache))
    reranked = Searcher.open(
        QueryConfig(str(sharded), "toy", "model", index_cache=cache, rerank=200)
    )
    r_plain = recall(plain.search(q, 10).rows, truth)
    r_rerank = recall(reranked.search(q, 10).rows, truth)
    assert r_rerank >= 0.95 and r_rerank > r_plain + 0.1, (r_plain, r_rerank)
    everything = Searcher.open(
        QueryConfig(str(sharded), "toy", "model", index_cache=cache, rerank=1500)
    )
    everything.record.search_value = None
    import faiss

    faiss.extract_index_ivf(everything.index).nprobe = 8  # every list: exact over all rows
    assert recall(everything.search(q, 10).rows, truth) == 1.0
    by_id = reranked.search_ids([str(reranked.ids[0])], 5)
    assert len(by_id) == 5 and str(reranked.ids[0]) not in set(by_id["id"].astype(str))
    with pytest.raises(QueryError, match=r"--rerank 200 is smaller than k=300.*--rerank 1200"):
        reranked.search(q, 300)
    with pytest.raises(QueryError, match="--rerank must be at least 1"):
        QueryConfig(str(sharded), "toy", "model", rerank=0)


def test_cli_and_service_use_the_disk_index_and_rerank(cli, sharded: Path, tmp_path: Path) -> None:
    vectors = tmp_path / "q.npy"
    np.save(vectors, queries(sharded, 3))
    cache = tmp_path / "cache"
    args = ("query", "--store", sharded, "--dataset", "toy", "--backbone", "model",
            "--vectors", vectors, "--index-cache", cache)  # fmt: skip
    result = cli(*args, "--rerank", "50", "-k", "5", "--json")
    assert result.exit_code == 0, result.output
    assert len(json.loads(result.stdout)) == 15 and list(cache.rglob("vectors.npy"))
    refused = cli(*args, "--rerank", "3", "-k", "5")
    assert refused.exit_code == 1 and "--rerank 3 is smaller than k=5" in refused.output
    searcher = Searcher.open(
        QueryConfig(str(sharded), "toy", "model", index_cache=str(cache), rerank=50)
    )
    with serve_in_thread(create_app(searcher, load_model=False, health_ttl=0)) as url:
        health = httpx.get(f"{url}/health").json()
        assert health["on_disk"] is True and health["rerank"] == 50 and health["rows"] == 1497
        answer = httpx.post(
            f"{url}/query/vector", json={"vectors": queries(sharded, 1).tolist(), "k": 3}
        )
        assert answer.status_code == 200 and len(answer.json()["results"][0]) == 3
        lists = searcher.index_folder / ondisk.LISTS_FILE
        with open(lists, "r+b") as f:  # the local copy cut short under the running service
            f.truncate(lists.stat().st_size // 2)
        damaged = httpx.get(f"{url}/health")
        assert damaged.status_code == 503 and "truncated or replaced" in damaged.json()["damage"]
