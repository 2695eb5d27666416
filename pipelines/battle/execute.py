"""Running a battle's jobs on Dask: each job a task with its dependencies.

The local default is an in-process cluster (one worker thread: jobs run one after another,
each using every core); ``workers=N`` starts a ``LocalCluster`` of N processes sharing the
cores; ``scheduler="tcp://HOST:PORT"`` sends the same jobs to a running cluster, whose
workers must reach the store and the results directory. Extraction jobs on CUDA ask for a
``GPU`` worker resource. A failing job is reported; the jobs that do not need it go on.
"""

from __future__ import annotations

import os
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from bob_cache.errors import BobCacheError
from bob_cache.pipelines.battle.plan import Job, Plan
from bob_cache.pipelines.cluster import SchedulerError


@dataclass
class Outcome:
    """How one job ended."""

    job: str
    status: str  # "done", "failed", "not run"
    seconds: float = 0.0
    error: str = ""
    result: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"job": self.job, "status": self.status, "seconds": round(self.seconds, 2),
                "error": self.error}  # fmt: skip


def run_job(job: Job, threads: int, *deps: dict[str, Any]) -> dict[str, Any]:
    """Execute one job on a worker (module-level so Dask can ship it)."""
    import torch
    from threadpoolctl import threadpool_limits

    before = torch.get_num_threads()  # an in-process worker shares the caller's setting
    if threads:
        torch.set_num_threads(threads)
    started = time.perf_counter()
    try:
        # BLAS and OpenMP (FAISS) pools too: the nanny's OMP_NUM_THREADS=1 would cap them.
        with threadpool_limits(limits=threads or None):
            result = job.run(*deps)
    except BobCacheError:
        raise
    except Exception as exc:  # keep the worker's traceback in the message
        where = traceback.format_exc(limit=-3).strip().splitlines()
        raise RuntimeError(f"{type(exc).__name__}: {exc} [{' | '.join(where[-3:])}]") from exc
    finally:
        torch.set_num_threads(before)
    result["wall_seconds"] = time.perf_counter() - started
    return result


def execute(
    plan: Plan,
    client: Any,
    *,
    threads: int | None = None,
    on_done: Callable[[Job, Outcome], None] = lambda job, outcome: None,
) -> dict[str, Outcome]:
    """Submit every job that is not done (with its dependencies) and wait for all.

    Args:
        threads: torch threads per job (default: the cores shared among the workers of a
            machine). Floating-point sums, and so the last digits of some results, depend on it.
    """
    todo = plan.todo
    _check_gpu(client, todo)
    threads = threads or _threads_per_job(client)
    token = uuid.uuid4().hex[:8]
    futures: dict[str, Any] = {}
    for job in todo:
        deps = [futures[d] if d in futures else {"keys": list(plan.get(d).keys)} for d in job.deps]
        futures[job.id] = client.submit(
            run_job, job, threads, *deps, key=f"{job.id}-{token}", pure=False, retries=0,
            resources={"GPU": 1} if job.gpu else None,
        )  # fmt: skip
    from distributed import as_completed

    outcomes: dict[str, Outcome] = {}
    by_key = {f.key: job_id for job_id, f in futures.items()}
    for future in as_completed(list(futures.values())):
        job = plan.get(by_key[future.key])
        outcomes[job.id] = _outcome(job, future, outcomes, plan)
        on_done(job, outcomes[job.id])
    return outcomes


def _outcome(job: Job, future: Any, outcomes: dict[str, Outcome], plan: Plan) -> Outcome:
    if future.status == "finished":
        result = future.result()
        return Outcome(job.id, "done", result.get("wall_seconds", 0.0), result=result)
    failed = [d for d in job.deps if d in outcomes and outcomes[d].status != "done"]
    if failed:
        return Outcome(job.id, "not run", error=f"needs {failed[0]}, which failed")
    exc = future.exception()
    return Outcome(job.id, "failed", error=str(exc) or type(exc).__name__)


def _check_gpu(client: Any, todo: list[Job]) -> None:
    if not any(j.gpu for j in todo):
        return
    workers = client.scheduler_info().get("workers", {}).values()
    if not any(w.get("resources", {}).get("GPU") for w in workers):
        raise SchedulerError(
            "Extraction and fine-tuning jobs need a GPU, but no Dask worker offers the `GPU` "
            "resource. Start GPU workers with `dask worker ADDRESS --resources GPU=1`, or set "
            "`options: {device: cpu}` in the suite."
        )


def _threads_per_job(client: Any) -> int:
    """Torch threads per job: a machine's cores divided among its workers' threads. Set
    explicitly, because Dask's nanny starts worker processes with OMP_NUM_THREADS=1."""
    workers = client.scheduler_info().get("workers", {}).values()
    hosts: dict[str, int] = {}
    for w in workers:
        host = str(w.get("host", ""))
        hosts[host] = hosts.get(host, 0) + int(w.get("nthreads", 1))
    per_host = max(hosts.values(), default=1)
    return max(1, (os.cpu_count() or 1) // per_host)
