"""The query service's Prometheus metrics (``GET /metrics``), with the standard client library.

- ``bob_cache_requests_total{endpoint, status}``: requests answered, by endpoint and status.
- ``bob_cache_request_seconds{endpoint}``: wall time of each request, as the server saw it.
- ``bob_cache_phase_seconds{phase}``: time in each phase of a query: ``parse`` (the JSON body),
  ``read`` (uploads), ``decode`` and ``embed`` (image queries), ``search`` (the index),
  ``records`` (metadata of the hits), ``encode`` (the JSON answer).
- ``bob_cache_queries_total{endpoint}``: queries answered (a batch of 256 counts 256).
- ``bob_cache_index_rows``, ``bob_cache_index_dim``, ``bob_cache_index_pending_shards`` and
  ``bob_cache_index_info{feature_set, index, kind, metric, backbone}``: what is served.

Endpoints are the service's routes (``/thumb/{id}`` is one endpoint, anything unknown is
``other``), so label values stay bounded whatever clients request. Each app has its own
registry, so several services in one process keep separate counts.
"""

from __future__ import annotations

import time
from typing import Any

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)

ENDPOINTS = ("/", "/health", "/metrics", "/query/vector", "/query/id", "/query/image")
THUMB = "/thumb/{id}"
# Seconds: sub-millisecond searches to multi-second image batches.
BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def endpoint_of(path: str) -> str:
    """The endpoint label of a request path (bounded: unknown paths are ``other``)."""
    if path in ENDPOINTS:
        return path
    return THUMB if path.startswith("/thumb/") else "other"


class ServiceMetrics:
    """The metrics of one service (see the module docstring)."""

    def __init__(self, searcher: Any) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "bob_cache_requests", "Requests answered.", ["endpoint", "status"], registry=r
        )
        self.latency = Histogram(
            "bob_cache_request_seconds",
            "Request wall time.",
            ["endpoint"],
            buckets=BUCKETS,
            registry=r,
        )
        self.phases = Histogram(
            "bob_cache_phase_seconds",
            "Time per query phase.",
            ["phase"],
            buckets=BUCKETS,
            registry=r,
        )
        self.queries = Counter("bob_cache_queries", "Queries answered.", ["endpoint"], registry=r)
        Gauge("bob_cache_index_rows", "Rows searched.", registry=r).set(searcher.n_indexed)
        Gauge("bob_cache_index_dim", "Vector dimension.", registry=r).set(searcher.fs.dim)
        pending = Gauge(
            "bob_cache_index_pending_shards", "Committed shards not indexed.", registry=r
        )
        pending.set(len(searcher.pending_shards))
        info = Gauge(
            "bob_cache_index_info", "What is served (always 1).",
            ["feature_set", "index", "kind", "metric", "backbone"], registry=r,
        )  # fmt: skip
        info.labels(
            searcher.fs.path, str(searcher.index_name or "exact"), searcher.index_kind,
            searcher.record.metric, str(searcher.fs.attrs["backbone"].get("slug")),
        ).set(1)  # fmt: skip

    def observe(self, phase: str, seconds: float) -> None:
        """Record ``seconds`` spent in ``phase`` (the searcher calls this)."""
        self.phases.labels(phase).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        """The exposition text and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class MetricsMiddleware:
    """ASGI middleware counting every HTTP request by endpoint and status, with its latency
    (requests refused by an inner middleware, such as an oversized body's 413, included)."""

    def __init__(self, app: Any, *, metrics: ServiceMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        endpoint, status = endpoint_of(scope.get("path", "")), {"code": 500}
        started = time.perf_counter()

        async def sending(message: dict[str, Any]) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            self.metrics.requests.labels(endpoint, str(status["code"])).inc()
            self.metrics.latency.labels(endpoint).observe(time.perf_counter() - started)
