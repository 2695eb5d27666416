"""A bounded load test of the query service: N requests from C concurrent clients over
HTTP, reporting latency percentiles and throughput (used by the tests, as ``tests.loadtest``,
and by ``benchmarks/serve_latency.py``). Not shipped: it needs httpx, a dev dependency.

:func:`serve_in_thread` runs an app under uvicorn on a free loopback port, and
:func:`background_load` keeps other traffic (bad requests, say) going while a load test
measures, so "bad requests do not slow good ones" is a number, not a hope.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
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
    _Run(base_url, send, timeout).go(warmup, 1)
    return _Run(base_url, send, timeout).go(requests, concurrency).report(concurrency)


@dataclass
class Interference:
    """Latency of the same requests alone (``clean``) and beside other traffic (``loaded``),
    and what that traffic was."""

    clean: LoadReport
    loaded: LoadReport
    background: BackgroundLoad

    def to_dict(self) -> dict[str, Any]:
        return {"clean": self.clean.to_dict(), "loaded": self.loaded.to_dict(),
                "background_calls": self.background.calls}  # fmt: skip


def interference_test(
    base_url: str,
    send: Callable[[Any], Any],
    noise: Callable[[], Any],
    *,
    requests: int = 600,
    rounds: int = 4,
    concurrency: int = 1,
    noise_threads: int = 1,
    warmup: int = 20,
    timeout: float = 60.0,
) -> Interference:
    """Latency of ``send`` alone and while ``noise()`` runs back to back in the background.

    The two are measured in alternating rounds (alone, loaded, alone, ...) of
    ``requests / rounds`` each, so whatever else the machine does meanwhile falls on both.
    """
    _Run(base_url, send, timeout).go(warmup, 1)
    clean, loaded = _Run(base_url, send, timeout), _Run(base_url, send, timeout)
    background = BackgroundLoad()
    for i in range(rounds):
        n = requests // rounds + (i < requests % rounds)
        clean.go(n, concurrency)
        with background_load(noise, threads=noise_threads, report=background):
            loaded.go(n, concurrency)
    return Interference(clean.report(concurrency), loaded.report(concurrency), background)


class _Run:
    """Latencies and errors of requests sent in one or more batches."""

    def __init__(self, base_url: str, send: Callable[[Any], Any], timeout: float) -> None:
        self.base_url, self.send, self.timeout = base_url, send, timeout
        self.latencies: list[float] = []
        self.errors = 0
        self.seconds = 0.0

    def go(self, requests: int, concurrency: int) -> _Run:
        shares = [
            requests // concurrency + (i < requests % concurrency) for i in range(concurrency)
        ]
        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            for latencies, errors in pool.map(self._worker, shares):
                self.latencies += latencies
                self.errors += errors
        self.seconds += time.perf_counter() - started
        return self

    def _worker(self, n: int) -> tuple[list[float], int]:
        import httpx

        latencies, errors = [], 0
        with httpx.Client(base_url=self.base_url, timeout=self.timeout) as client:
            for _ in range(n):
                started = time.perf_counter()
                response = self.send(client)
                latencies.append((time.perf_counter() - started) * 1000)
                errors += not response.is_success
        return latencies, errors

    def report(self, concurrency: int) -> LoadReport:
        lat = np.asarray(self.latencies)
        return LoadReport(
            requests=len(lat),
            concurrency=concurrency,
            errors=self.errors,
            p50_ms=float(np.percentile(lat, 50)),
            p90_ms=float(np.percentile(lat, 90)),
            p99_ms=float(np.percentile(lat, 99)),
            max_ms=float(lat.max()),
            requests_per_second=len(lat) / max(self.seconds, 1e-9),
        )


@contextmanager
def serve_in_thread(app: Any, *, start_timeout: float = 30.0) -> Iterator[str]:
    """Serve ``app`` with uvicorn in a daemon thread on a free loopback port; yields its base
    URL (``http://127.0.0.1:PORT``) and stops the server when the block exits."""
    import uvicorn

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + start_timeout
    while not server.started and thread.is_alive() and time.monotonic() < deadline:
        time.sleep(0.02)
    if not server.started:
        server.should_exit = True
        raise RuntimeError(f"uvicorn did not start on port {port} within {start_timeout:g} s")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


@dataclass
class BackgroundLoad:
    """What :func:`background_load` sent: calls made, and the exceptions they raised."""

    calls: int = 0
    failures: list[str] = field(default_factory=list)


@contextmanager
def background_load(
    send: Callable[[], Any], *, threads: int = 1, report: BackgroundLoad | None = None
) -> Iterator[BackgroundLoad]:
    """Call ``send()`` back to back on ``threads`` daemon threads while the block runs.

    An exception from ``send`` is recorded (its repr, in ``failures``) and the loop goes on:
    the caller decides whether failures matter. ``report`` carries counts across blocks.
    """
    stop = threading.Event()
    report = report if report is not None else BackgroundLoad()
    lock = threading.Lock()

    def loop() -> None:
        while not stop.is_set():
            try:
                send()
            except Exception as exc:  # recorded for the caller, who asserts on them
                with lock:
                    report.failures.append(repr(exc))
            with lock:
                report.calls += 1

    workers = [threading.Thread(target=loop, daemon=True) for _ in range(threads)]
    for worker in workers:
        worker.start()
    try:
        yield report
    finally:
        stop.set()
        for worker in workers:
            worker.join(30)
