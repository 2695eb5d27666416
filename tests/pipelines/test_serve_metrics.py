"""`GET /metrics`: the query service's Prometheus metrics over real HTTP, read back with the
Prometheus client's own parser."""

from __future__ import annotations

import httpx
from prometheus_client.parser import text_string_to_metric_families

from bob_cache.pipelines.serve_metrics import endpoint_of
from tests.pipelines import test_serve

server = test_serve.server  # the service over loopback (its own instance in this module)


def scrape(url: str) -> dict[str, list]:
    response = httpx.get(f"{url}/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    return {f.name: f.samples for f in text_string_to_metric_families(response.text)}


def value(samples: list, name: str, **labels: str) -> float:
    return sum(
        s.value
        for s in samples
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
    )


def test_requests_phases_and_index_are_exposed(server) -> None:
    url, searcher, photos = server
    before = scrape(url)
    vector = searcher.fs.features[0].astype(float).tolist()
    for _ in range(3):
        assert (
            httpx.post(f"{url}/query/vector", json={"vectors": [vector] * 2, "k": 2}).status_code
            == 200
        )
    assert httpx.post(f"{url}/query/id", json={"ids": ["nope"], "k": 2}).status_code == 404
    image = sorted(photos.glob("astronaut/*.png"))[0]
    files = [("files", (image.name, image.read_bytes(), "image/png"))]
    assert httpx.post(f"{url}/query/image", files=files, params={"k": 1}).status_code == 200
    assert httpx.post(f"{url}/query/vector", content=b"x" * 200_000).status_code == 413
    after = scrape(url)

    def grew(metric: str, name: str, **labels: str) -> float:
        return value(after[metric], name, **labels) - value(before.get(metric, []), name, **labels)

    total = "bob_cache_requests_total"
    assert grew("bob_cache_requests", total, endpoint="/query/vector", status="200") == 3
    assert grew("bob_cache_requests", total, endpoint="/query/id", status="404") == 1
    assert grew("bob_cache_requests", total, endpoint="/query/vector", status="413") == 1
    assert grew("bob_cache_queries", "bob_cache_queries_total", endpoint="/query/vector") == 6
    assert grew("bob_cache_queries", "bob_cache_queries_total", endpoint="/query/image") == 1
    count = "bob_cache_phase_seconds_count"
    assert grew("bob_cache_phase_seconds", count, phase="search") == 4  # 3 vector + 1 image
    assert grew("bob_cache_phase_seconds", count, phase="parse") == 4  # the 404 parsed too
    for phase in ("embed", "decode", "read", "records", "encode"):
        assert grew("bob_cache_phase_seconds", count, phase=phase) >= 1, phase
    latency = value(
        after["bob_cache_request_seconds"],
        "bob_cache_request_seconds_count",
        endpoint="/query/vector",
    )
    assert latency >= 4
    assert value(after["bob_cache_index_rows"], "bob_cache_index_rows") == searcher.n_indexed == 15
    assert value(after["bob_cache_index_dim"], "bob_cache_index_dim") == searcher.fs.dim
    (info,) = after["bob_cache_index_info"]
    assert info.labels["kind"] == "flat" and info.labels["feature_set"] == searcher.fs.path


def test_endpoint_labels_stay_bounded() -> None:
    assert endpoint_of("/thumb/a/b.png") == "/thumb/{id}"
    assert endpoint_of("/query/vector") == "/query/vector"
    assert endpoint_of("/../../etc/passwd") == endpoint_of("/anything") == "other"
