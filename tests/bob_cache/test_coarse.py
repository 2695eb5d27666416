"""The HNSW graph over an IVF index's centroids swapped in for its coarse search: the same
lists and answers as the flat quantizer, only for indexes with many lists, through an IDMap
wrapper, memory owned once (searching and freeing after the swap), and used by a Searcher."""

from __future__ import annotations

import gc
from pathlib import Path

import faiss
import numpy as np
import pytest

from bob_cache.pipelines.query import QueryConfig, Searcher
from bob_cache.retrieval import coarse
from tests.pipelines.test_query_sharded import queries, sharded  # noqa: F401

D, NLIST = 32, 256


@pytest.fixture(scope="module")
def data() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    centers = rng.standard_normal((300, D)).astype(np.float32) * 2
    x = centers[rng.integers(0, 300, 30_000)] + rng.standard_normal((30_000, D)).astype("f4")
    q = centers[rng.integers(0, 300, 300)] + rng.standard_normal((300, D)).astype("f4")
    return x, q


def built(x: np.ndarray, spec: str = f"IVF{NLIST},PQ8") -> faiss.Index:
    index = faiss.index_factory(D, spec, faiss.METRIC_INNER_PRODUCT)
    index.train(x)
    index.add(x)
    faiss.extract_index_ivf(index).nprobe = 8
    return index


def test_the_graph_finds_the_flat_quantizers_lists_and_answers(data) -> None:
    x, q = data
    flat, graphed = built(x), built(x)
    assert coarse.use_graph(graphed, min_lists=64)
    ivf = faiss.extract_index_ivf(graphed)
    graph = faiss.downcast_index(ivf.quantizer)
    assert isinstance(graph, faiss.IndexHNSWFlat) and graph.hnsw.efSearch == coarse.EF_MIN
    assert not ivf.own_fields  # the graph is the Python proxy's, kept by the index
    assert any(type(o) is faiss.IndexHNSWFlat for o in graphed.referenced_objects)
    want = faiss.extract_index_ivf(flat).quantizer.search(q, 8)[1]
    got = ivf.quantizer.search(q, 8)[1]
    same_lists = np.mean([set(a) == set(b) for a, b in zip(want, got, strict=True)])
    assert same_lists >= 0.99, same_lists
    i_flat = flat.search(q, 10)[1]
    i_graph = graphed.search(q, 10)[1]
    assert np.mean(np.all(i_flat == i_graph, axis=1)) >= 0.99
    del flat, ivf
    gc.collect()  # the swapped-out quantizer and the graph are freed once, with the index
    np.testing.assert_array_equal(graphed.search(q, 10)[1], i_graph)
    del graphed
    gc.collect()


def test_few_lists_other_kinds_and_an_idmap_wrapper(data) -> None:
    x, q = data
    small = built(x)
    assert not coarse.use_graph(small)  # 256 lists < MIN_LISTS: the flat scan is as cheap
    assert isinstance(
        faiss.downcast_index(faiss.extract_index_ivf(small).quantizer), faiss.IndexFlat
    )
    hnsw = faiss.IndexHNSWFlat(D, 16)
    hnsw.add(x[:1000])
    assert not coarse.use_graph(hnsw, min_lists=1)
    wrapped = faiss.IndexIDMap(faiss.index_factory(D, f"IVF{NLIST},Flat"))
    wrapped.train(x)
    wrapped.add_with_ids(x, np.arange(len(x), dtype=np.int64) * 7)
    faiss.extract_index_ivf(wrapped).nprobe = 200
    before = wrapped.search(q, 5)[1]
    assert coarse.use_graph(wrapped, min_lists=64)
    assert faiss.downcast_index(faiss.extract_index_ivf(wrapped).quantizer).hnsw.efSearch == 400
    assert np.mean(np.all(wrapped.search(q, 5)[1] == before, axis=1)) >= 0.99


def test_a_searcher_over_many_lists_uses_the_graph_with_the_same_answers(
    sharded: Path,  # noqa: F811
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    config = QueryConfig(str(sharded), "toy", "model", index_cache=str(tmp_path / "cache"))
    plain = Searcher.open(config)
    assert not plain.coarse_graph  # 8 lists
    monkeypatch.setattr(coarse, "MIN_LISTS", 4)
    graphed = Searcher.open(config)
    assert graphed.coarse_graph
    q = queries(sharded)
    np.testing.assert_array_equal(graphed.search(q, 10).rows, plain.search(q, 10).rows)


def test_an_index_read_from_bytes_swaps_once_and_efsearch_follows_nprobe(data) -> None:
    from bob_cache.retrieval import faiss_ops
    from bob_cache.retrieval.kinds import get_kind

    x, q = data
    index = faiss.deserialize_index(faiss.serialize_index(built(x)))  # owned by C++ inside
    want = index.search(q, 10)[1]
    assert coarse.use_graph(index, min_lists=64)
    gc.collect()  # the flat quantizer, handed to Python, is freed here: nothing points at it
    faiss_ops.set_search_param(index, get_kind("ivfpq"), 200)
    ivf = faiss.extract_index_ivf(index)
    assert ivf.nprobe == 200 and faiss.downcast_index(ivf.quantizer).hnsw.efSearch == 400
    faiss_ops.set_search_param(index, get_kind("ivfpq"), 8)
    assert faiss.downcast_index(ivf.quantizer).hnsw.efSearch == coarse.EF_MIN
    assert np.mean(np.all(index.search(q, 10)[1] == want, axis=1)) >= 0.99
    del index, ivf
    gc.collect()
