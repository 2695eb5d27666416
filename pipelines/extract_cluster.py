"""Extraction on a Dask cluster: one feature set's shards spread over the workers.

The shards are split into ``parts`` by the ``--part K/N`` protocol (shard ``s`` belongs to
part ``s mod N``), and each part is one Dask task that extracts and commits its shards into
the same store. A worker that dies mid-part loses only its uncommitted shard: the scheduler
runs the part again elsewhere, and the part resumes from its committed shards. When every
part has ended, one last pass in this process computes any shard still missing (a part that
failed for good) and finalizes the sets, so the result equals a single-process run array by
array. Workers must reach the store (a shared disk, or ``s3://``). On CUDA each part asks for
one ``GPU`` worker resource; give each GPU its own worker (``CUDA_VISIBLE_DEVICES``).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import sys
import time
import uuid
from dataclasses import replace
from typing import Any

from bob_cache.config import ExtractConfig, without_loaders_in_daemon
from bob_cache.pipelines.cluster import SchedulerError, dask_client, task_result

PARTS_PER_WORKER = 1
logger = logging.getLogger(__name__)


def extract_on_cluster(config: ExtractConfig) -> Any:
    """Run ``config`` as parts on the cluster it names; returns the final pass's summary
    with the rows and shards the parts computed added in."""
    from bob_cache.pipelines.extract import extract

    started = time.perf_counter()
    base = replace(config, scheduler=None, local_cluster=None, parts=None, quiet=True)
    gpu = config.device.startswith("cuda") or (config.device == "auto" and _has_cuda())
    with dask_client(scheduler=config.scheduler, workers=config.local_cluster,
                     gpus=1 if gpu else 0) as client:  # fmt: skip
        info = client.scheduler_info().get("workers", {})
        if gpu and not any(w.get("resources", {}).get("GPU") for w in info.values()):
            raise SchedulerError(
                f"Extraction on {config.device} needs Dask workers with the `GPU` resource, but "
                f"none of the {len(info)} worker(s) at the scheduler offers it. Start them with "
                "`dask worker ADDRESS --resources GPU=1` (one per GPU, CUDA_VISIBLE_DEVICES set "
                "per worker), or pass --device cpu."
            )
        workers = max(1, len(info))
        n = config.parts or PARTS_PER_WORKER * workers
        token = uuid.uuid4().hex[:8]
        threads = _torch_threads()
        futures = [
            client.submit(_run_part, replace(base, part=(k, n)), threads,
                          key=f"extract-part-{k}-of-{n}-{token}", pure=False,
                          resources={"GPU": 1} if gpu else None)
            for k in range(n)
        ]  # fmt: skip
        parts = [_result(f, part=(k, n)) for k, f in enumerate(futures)]
    done = [p["summary"] for p in parts if p is not None]
    if len(done) == len(parts) and _refresh_if_complete(config, done):
        summary = dataclasses.replace(done[0])  # every shard committed, sets finalized
        summary.shards_skipped = sum(s.shards_skipped for s in done)
        summary.invalid_rows = max(s.invalid_rows for s in done)  # each counts the whole set
        summary.seconds = max(s.seconds for s in done)
        summary.rows_computed = summary.shards_computed = 0
    else:  # a part failed for good: compute what it left here, then finalize
        summary = extract(replace(base, quiet=config.quiet))
        summary.shards_skipped -= sum(s.shards_computed for s in done)  # not skipped: done now
    summary.rows_computed += sum(s.rows_computed for s in done)
    summary.shards_computed += sum(s.shards_computed for s in done)
    summary.total_seconds = time.perf_counter() - started
    return summary


def _refresh_if_complete(config: ExtractConfig, summaries: list[Any]) -> bool:
    """Whether every set the parts wrote is complete (read back from the store); if so, the
    summaries' listing rows are replaced by fresh ones, as a single run would print them."""
    from bob_cache.stores import open_store

    store = open_store(config.store, storage_options=config.storage_options or None)
    fresh = {}
    for path in {f["group"] for s in summaries for f in s.feature_sets}:
        fs = store.get(path)
        if not fs.complete:
            return False
        fresh[path] = fs.info()
    for s in summaries:
        s.feature_sets = [fresh[f["group"]] for f in s.feature_sets]
    return True


def _run_part(config: ExtractConfig, threads: int) -> dict[str, Any]:
    """One part on a worker (module-level, so Dask can ship it), at ``threads`` torch threads:
    a CPU forward's last bits depend on the thread count (Dask's nanny sets 1), so parts run
    at the caller's count and the set equals what the caller would have computed alone."""
    import torch

    from bob_cache.pipelines.extract import extract

    config = without_loaders_in_daemon(config)
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:  # OpenMP and BLAS pools too: the nanny starts workers with OMP_NUM_THREADS=1
        with threadpool_limits(limits=threads):
            s = extract(config)
    finally:
        torch.set_num_threads(before)
    return {"summary": s}


def _torch_threads() -> int:
    """The intra-op thread count of this process's torch, without importing it when it is not
    loaded (the caller of a cluster run never needs torch): torch's own default rule,
    ``OMP_NUM_THREADS``, else ``MKL_NUM_THREADS``, else the physical cores."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return torch.get_num_threads()
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        value = os.environ.get(name, "").strip()
        if value.isdigit() and int(value) > 0:
            return int(value)
    import psutil

    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def _result(future: Any, *, part: tuple[int, int]) -> dict[str, Any] | None:
    """A part's summary; a user error (bad data, refused resume) ends the run with its message,
    any other failure is logged and leaves the part's shards to the final pass."""
    return task_result(future, lambda reason: logger.warning(
        "Extraction part %d/%d failed on the cluster (%s); its missing shards are computed "
        "in this process after the other parts.", *part, reason,
    ))  # fmt: skip


def _has_cuda() -> bool:
    """Whether ``--device auto`` means GPU parts: torch's answer when it is loaded, else
    whether this machine has an NVIDIA driver (a part still resolves its own device)."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return bool(torch.cuda.is_available())
    return os.path.exists("/proc/driver/nvidia/version")
