"""Dask clusters for the stages that spread work: a running scheduler, or a local cluster.

``scheduler="tcp://HOST:PORT"`` connects to a running cluster (whose workers must reach the
store); ``workers=N`` starts a ``LocalCluster`` of N non-daemonic processes (so extraction
can start its image loaders); neither gives an in-process cluster with one worker thread.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from bob_cache.errors import BobCacheError

CONNECT_TIMEOUT_S = 10


class SchedulerError(BobCacheError, ConnectionError):
    """The Dask scheduler named by --scheduler does not answer, or cannot run the jobs."""


@contextmanager
def dask_client(*, scheduler: str | None, workers: int | None, gpus: int) -> Iterator[Any]:
    """A client on the requested cluster, closed (and a local cluster stopped) afterwards."""
    from distributed import Client, LocalCluster

    if scheduler:
        try:
            client = Client(scheduler, timeout=f"{CONNECT_TIMEOUT_S}s")
        except (OSError, TimeoutError) as exc:
            raise SchedulerError(
                f"No Dask scheduler answers at '{scheduler}' within {CONNECT_TIMEOUT_S} s "
                f"({type(exc).__name__}). Start one (`dask scheduler`, then `dask worker "
                f"{scheduler}`), check the address, or drop --scheduler to run locally."
            ) from exc
        try:
            yield client
        finally:
            client.close()
        return
    import dask

    resources = {"GPU": gpus} if gpus else None
    kwargs: dict[str, Any] = {"dashboard_address": ":0", "resources": resources,
                              "silence_logs": logging.WARNING}  # fmt: skip
    if workers:  # non-daemonic worker processes, so extraction can start its image loaders
        with dask.config.set({"distributed.worker.daemon": False}):
            cluster = LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True, **kwargs
            )
    else:
        cluster = LocalCluster(n_workers=1, threads_per_worker=1, processes=False, **kwargs)
    client = Client(cluster)
    try:
        yield client
    finally:
        client.close()
        cluster.close()
