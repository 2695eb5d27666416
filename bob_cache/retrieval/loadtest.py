"""A bounded load test of the query service: N requests from C concurrent clients over
HTTP, reporting latency percentiles and throughput (used by the benchmark and the tests)."""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np


@dataclass
class LoadReport:
    """Latency percentiles (ms) and throughput of one load test."""

    requests: int
    concurrency: int
    errors: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    requests_per_second: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_test(
    base_url: str,
    send: Callable[[Any], Any],
    *,
    requests: int = 200,
    concurrency: int = 1,
    warmup: int = 5,
    timeout: float = 60.0,
) -> LoadReport:
    """Send ``requests`` requests, ``send(client) → httpx.Response``, from ``concurrency``
    threads each with its own keep-alive connection; non-2xx answers count as errors."""
    import httpx

    def worker(n: int) -> tuple[list[float], int]:
        latencies, errors = [], 0
        with httpx.Client(base_url=base_url, timeout=timeout) as client:
            for _ in range(n):
                started = time.perf_counter()
                response = send(client)
                latencies.append((time.perf_counter() - started) * 1000)
                errors += not response.is_success
        return latencies, errors

    worker(warmup)
    shares = [requests // concurrency + (i < requests % concurrency) for i in range(concurrency)]
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        done = list(pool.map(worker, shares))
    seconds = time.perf_counter() - started
    lat = np.concatenate([np.asarray(d[0]) for d in done])
    return LoadReport(
        requests=len(lat),
        concurrency=concurrency,
        errors=sum(d[1] for d in done),
        p50_ms=float(np.percentile(lat, 50)),
        p90_ms=float(np.percentile(lat, 90)),
        p99_ms=float(np.percentile(lat, 99)),
        max_ms=float(lat.max()),
        requests_per_second=len(lat) / seconds,
    )
