"""The query service over real HTTP on a loopback port: answers, batches, 4xx on bad input,
a damaged store reported by /health (503) and by every query, and a bounded load test."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from bob_cache.errors import DamagedDataError
from bob_cache.pipelines.query import QueryConfig, Searcher
from bob_cache.pipelines.serve import create_app
from bob_cache.stores import open_store
from bob_cache.stores.index_store import INDEX_GROUP, list_indexes
from tests.loadtest import load_test, serve_in_thread
from tests.pipelines.test_damage import flip


@pytest.fixture(scope="module")
def server(photo_store: tuple[Path, Path]) -> Iterator[tuple[str, Searcher, Path]]:
    store, photos = photo_store
    searcher = Searcher.open(QueryConfig(str(store), "photos", "test_resnet"))
    app = create_app(searcher, max_upload_mb=0.05, max_batch=4)
    with serve_in_thread(app) as url:
        yield url, searcher, photos


def test_health_and_queries_by_image_id_and_vector(server) -> None:
    url, searcher, photos = server
    health = httpx.get(f"{url}/health").json()
    assert health["status"] == "ok" and health["rows"] == 15 and health["image_queries"]
    assert health["index"] == "flat" and health["kind"] == "flat" and "note" not in health
    image = sorted(photos.glob("astronaut/*.png"))[0]
    files = [("files", (image.name, image.read_bytes(), "image/png"))] * 2
    answer = httpx.post(f"{url}/query/image", files=files, params={"k": 3}).json()
    assert len(answer["results"]) == 2 and len(answer["results"][0]) == 3
    assert answer["results"][0][0]["id"] == f"astronaut/{image.name}"
    assert answer["results"][0][0]["class"] == "astronaut" and answer["took_ms"] > 0
    by_id = httpx.post(f"{url}/query/id", json={"ids": [f"astronaut/{image.name}"], "k": 2})
    assert by_id.status_code == 200
    assert f"astronaut/{image.name}" not in [r["id"] for r in by_id.json()["results"][0]]
    vector = searcher.fs.features[0].astype(float).tolist()
    by_vector = httpx.post(f"{url}/query/vector", json={"vectors": [vector], "k": 1}).json()
    assert by_vector["results"][0][0]["row"] == 0


def test_bad_requests_get_4xx_with_a_message_and_the_server_keeps_running(
    server, tmp_path: Path
) -> None:
    url, searcher, _ = server
    dim = searcher.fs.dim
    cases = [
        (httpx.post(f"{url}/query/image", files=[("files", ("a.jpg", b"not an image"))]), 400,
         "Cannot decode the uploaded file"),
        (httpx.post(f"{url}/query/image", files=[("files", ("big.jpg", b"0" * 100_000))]), 413,
         "over the 0.05 MB limit"),
        (httpx.post(f"{url}/query/id", json={"ids": ["nope"]}), 404, "No row with id 'nope'"),
        (httpx.post(f"{url}/query/vector", json={"vectors": [[1.0] * (dim + 1)]}), 400,
         f"Pass (N, {dim}) vectors"),
        (httpx.post(f"{url}/query/vector", json={"vectors": [[1.0] * dim], "k": 99}), 400,
         "Pass -k 15 or less"),
        (httpx.post(f"{url}/query/vector", json={"vectors": [[1.0] * dim] * 5}), 413,
         "limit of 4"),
        (httpx.post(f"{url}/query/vector", json={"vectors": "x"}), 422, ""),
    ]  # fmt: skip
    for response, status, message in cases:
        assert response.status_code == status, response.text
        assert message in str(response.json()["detail"])
    assert httpx.get(f"{url}/health").status_code == 200


def test_bounded_load_test_reports_latency_percentiles(server) -> None:
    url, searcher, _ = server
    vector = np.ones(searcher.fs.dim).tolist()
    report = load_test(
        url,
        lambda client: client.post("/query/vector", json={"vectors": [vector], "k": 5}),
        requests=40,
        concurrency=4,
    )
    assert report.errors == 0 and report.requests == 40
    assert 0 < report.p50_ms <= report.p99_ms <= report.max_ms
    assert report.requests_per_second > 0


@pytest.fixture
def damageable(photo_store: tuple[Path, Path], tmp_path: Path) -> Iterator[tuple[str, Searcher]]:
    """The service over a copy of the photo store (checked for damage on every call)."""
    store = tmp_path / "store"
    shutil.copytree(photo_store[0], store)
    searcher = Searcher.open(QueryConfig(str(store), "photos", "test_resnet"))
    with serve_in_thread(create_app(searcher, load_model=False, health_ttl=0)) as url:
        yield url, searcher


def query_all(url: str, searcher: Searcher) -> list[httpx.Response]:
    vector = searcher.index.reconstruct(0).astype(float).tolist()  # not read from the store
    by_id = {"ids": [str(searcher.ids[1])], "k": 1}
    return [httpx.post(f"{url}/query/vector", json={"vectors": [vector], "k": 1}),
            httpx.post(f"{url}/query/id", json=by_id)]  # fmt: skip


@pytest.mark.parametrize("damage", ["delete valid", "flip features", "delete index chunk"])
def test_a_damaged_set_or_index_turns_health_and_queries_to_503_naming_the_repair(
    damageable, damage: str
) -> None:
    """The fault injected as tests/pipelines/test_damage.py does, after the service started."""
    url, searcher = damageable
    (fs,) = [f for f in open_store(searcher.fs.location, mode="a").feature_sets()
             if f.path == searcher.fs.path]  # a writable handle  # fmt: skip
    assert httpx.get(f"{url}/health").json()["status"] == "ok"
    assert [r.status_code for r in query_all(url, searcher)] == [200, 200]
    if damage == "delete valid":  # found by /health's listing
        sync(fs.group.store.delete(fs.object_keys(0)["valid"]))
    elif damage == "flip features":  # found by the read of a query by id (crc32c)
        flip(fs, 0, "features")
        by_id = query_all(url, searcher)[1]
        assert by_id.status_code == 503, by_id.text
        assert "Shard 0 (rows 0-14)" in by_id.json()["detail"]
    else:
        data = fs.group[f"{INDEX_GROUP}/{searcher.record.key}/data"]
        sync(fs.group.store.delete(f"{data.path}/c/0"))
    health = httpx.get(f"{url}/health")
    assert health.status_code == 503 and health.json()["status"] == "damaged"
    said = health.json()["damage"]
    if damage == "delete index chunk":
        assert f"Index 'flat' of feature set '{fs.path}'" in said and "chunk(s) 0" in said
        assert "--name flat --force`" in said
    else:
        assert f"Shard 0 (rows 0-14) of feature set '{fs.path}'" in said
        assert f"`bob-cache verify {fs.location} --repair`" in said
    assert "restart the service" in said
    for answer in query_all(url, searcher):  # no query answers from a damaged store
        assert answer.status_code == 503 and answer.json()["detail"] == said, answer.text


def test_a_large_batch_is_searched_in_slices_with_the_same_neighbours(server) -> None:
    """A batch takes turns with other requests on the compute thread, a slice at a time."""
    from bob_cache.pipelines.query import SEARCH_SLICE

    _, searcher, _ = server
    x = np.resize(
        searcher.fs.features[:].astype(np.float32), (2 * SEARCH_SLICE + 5, searcher.fs.dim)
    )
    batch = searcher.search(x, 3)
    alone = [searcher.search(row, 3) for row in x]
    assert batch.rows.shape == (len(x), 3)
    assert batch.rows.tolist() == [hits.rows[0].tolist() for hits in alone]
    np.testing.assert_allclose(batch.scores, np.concatenate([h.scores for h in alone]), rtol=1e-5)


def test_a_damaged_index_at_start_is_named_with_its_rebuild(
    photo_store: tuple[Path, Path], tmp_path: Path, cli
) -> None:
    """A bit flipped in an index chunk: opening the service (or a query) names the index,
    the chunk and the rebuild, which then works (was: exit 3, "hit a bug")."""
    store = tmp_path / "store"
    shutil.copytree(photo_store[0], store)
    (fs,) = open_store(store, mode="a").feature_sets()
    data = fs.group[f"{INDEX_GROUP}/{list_indexes(fs)[0].key}/data"]
    key, proto = f"{data.path}/c/0", default_buffer_prototype()
    raw = bytearray(sync(fs.group.store.get(key, prototype=proto)).to_bytes())
    raw[len(raw) // 2] ^= 0x10
    sync(fs.group.store.set(key, proto.buffer.from_bytes(bytes(raw))))
    with pytest.raises(DamagedDataError) as damaged:
        Searcher.open(QueryConfig(str(store), "photos", "test_resnet"))
    said = str(damaged.value)
    assert f"Index 'flat' of feature set '{fs.path}'" in said and "chunk(s) 0 does not" in said
    rebuild = said.split("`")[1].split()
    assert rebuild[:3] == ["bob-cache", "index", "build"] and rebuild[-1] == "--force"
    assert cli(*rebuild[1:]).exit_code == 0
    assert Searcher.open(QueryConfig(str(store), "photos", "test_resnet")).n_indexed == 15
