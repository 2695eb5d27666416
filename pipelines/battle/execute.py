"""Running a battle's jobs on Dask: each job a task with its dependencies.

The local default is an in-process cluster (one worker thread: jobs run one after another,
each using every core); ``workers=N`` starts a ``LocalCluster`` of N processes sharing the
cores; ``scheduler="tcp://HOST:PORT"`` sends the same jobs to a running cluster, whose
workers must reach the store and the results directory. Extraction jobs on CUDA ask for a
``GPU`` worker resource. A failing job is reported; the jobs that do not need it go on.

Progress travels as Dask events: a job logs ``{"job", "stage"}`` when it starts and
``{"job", "desc", "n", "total"}`` as its progress bars advance (``Worker.log_event`` on the
run's topic), and the client, subscribed to that topic, hands them to ``on_progress``.
A failed job's worker traceback rides on its exception (``worker_traceback``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
import traceback
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bob_cache.errors import BobCacheError
from bob_cache.pipelines.battle.plan import Job, Plan
from bob_cache.pipelines.cluster import SchedulerError
from bob_cache.progress import reporting_progress

logger = logging.getLogger(__name__)
ProgressHandler = Callable[[str, dict[str, Any]], None]  # (job id, event)
_STOPPED: set[str] = set()  # interrupted runs (set on every worker): their jobs stop


class JobInterrupted(Exception):
    """The battle was interrupted: a running job stops at its next progress report."""


@dataclass
class Outcome:
    """How one job ended."""

    job: str
    status: str  # "done", "failed", "not run"
    seconds: float = 0.0
    error: str = ""  # one line
    result: dict[str, Any] | None = None
    traceback: str = field(default="", repr=False)  # the worker's, for the log file

    @property
    def joined(self) -> bool:
        """Done by another battle sharing the results table (this one waited for it)."""
        return bool(self.result and self.result.get("joined"))

    def to_dict(self) -> dict[str, Any]:
        return {"job": self.job, "status": self.status, "seconds": round(self.seconds, 2),
                "error": self.error, "joined": self.joined}  # fmt: skip


@dataclass(frozen=True)
class RunContext:
    """What every job of one run shares (picklable for Dask)."""

    threads: int
    token: str
    report: bool = False  # log progress events for the client
    results: str = ""  # the results table whose claims the jobs take ("": none)

    @property
    def topic(self) -> str:
        return f"bob-cache-battle-{self.token}"


def run_job(job: Job, run: RunContext, *deps: dict[str, Any]) -> dict[str, Any]:
    """Execute one job on a worker (module-level so Dask can ship it)."""
    import torch
    from threadpoolctl import threadpool_limits

    reporter = _Reporter(job.id, run)
    reporter.send({"stage": stage_of(job)})
    before = torch.get_num_threads()  # an in-process worker shares the caller's setting
    torch.set_num_threads(run.threads)
    started = time.perf_counter()
    try:
        # BLAS and OpenMP (FAISS) pools too: the nanny's OMP_NUM_THREADS=1 would cap them.
        with threadpool_limits(limits=run.threads), reporting_progress(reporter):
            result = _run_claimed(job, run, reporter, deps)
    except (BobCacheError, JobInterrupted) as exc:
        exc.worker_traceback = traceback.format_exc()  # type: ignore[attr-defined]
        raise
    except Exception as exc:  # a bug: the worker's whole traceback goes to the log file
        wrapped = RuntimeError(f"{type(exc).__name__}: {exc}")
        wrapped.worker_traceback = traceback.format_exc()  # type: ignore[attr-defined]
        raise wrapped from None
    finally:
        torch.set_num_threads(before)
    result["wall_seconds"] = time.perf_counter() - started
    return result


def _run_claimed(
    job: Job, run: RunContext, reporter: _Reporter, deps: tuple[dict[str, Any], ...]
) -> dict[str, Any]:
    """The job under its claim beside the results (another battle's run of it is waited for
    and joined), or plainly where the run names no results table."""
    from bob_cache.pipelines.battle.claims import run_claimed

    if not run.results:
        return job.run(*deps)

    def waiting(text: str) -> None:
        logger.info("%s", text)
        reporter(text, 0, None)  # stops the wait once the battle is interrupted

    return run_claimed(job, run.results, deps, on_wait=waiting)


def stage_of(job: Job) -> str:
    """The stage a job runs (its kind's, e.g. ``probe`` for ``linear``)."""
    from bob_cache.pipelines.battle.tasks import get_task

    return "extract" if job.kind == "extract" else get_task(job.kind).stage


@dataclass
class _Reporter:
    """A job's progress sink: logs its bars' counts as events, and stops the job once its run
    is interrupted (:func:`_stop` marks the run in every worker's ``_STOPPED``)."""

    job: str
    run: RunContext

    def __call__(self, desc: str, n: int, total: int | None) -> None:
        if self.run.token in _STOPPED:
            raise JobInterrupted(f"{self.job}: the battle was interrupted")
        self.send({"desc": desc, "n": int(n), "total": None if total is None else int(total)})

    def send(self, event: dict[str, Any]) -> None:
        if not self.run.report:
            return
        from distributed import get_worker

        try:
            get_worker().log_event(self.run.topic, {"job": self.job, **event})
        except Exception as exc:  # no worker (a direct call) or a closing one: progress only
            logger.debug("progress of %s not sent: %s", self.job, exc)


def execute(
    plan: Plan,
    client: Any,
    *,
    threads: int | None = None,
    on_done: Callable[[Job, Outcome], None] = lambda job, outcome: None,
    on_progress: ProgressHandler | None = None,
) -> dict[str, Outcome]:
    """Submit every job that is not done (with its dependencies) and wait for all.

    Args:
        threads: torch threads per job (default: the cores shared among the workers of a
            machine). Floating-point sums, and so the last digits of some results, depend on it.
        on_done: called in this thread as each job ends, in the order they end.
        on_progress: called with each job's progress events (from the client's event loop).

    Raises:
        KeyboardInterrupt: after cancelling the jobs (in-process ones stop at their next
            progress report; finished ones are kept).
    """
    todo = plan.todo
    _check_gpu(client, todo)
    run = RunContext(threads or _threads_per_job(client), uuid.uuid4().hex[:8],
                     report=on_progress is not None, results=plan.results)  # fmt: skip
    if on_progress is not None:
        client.subscribe_topic(run.topic, lambda event: on_progress(event[1]["job"], event[1]))
    futures = _submit(plan, client, run)
    try:
        return _gather(plan, futures, on_done)
    except KeyboardInterrupt:
        _stop(client, run, futures)
        raise
    finally:
        if on_progress is not None:
            with contextlib.suppress(Exception):  # a client already gone has no subscription
                client.unsubscribe_topic(run.topic)


def _submit(plan: Plan, client: Any, run: RunContext) -> dict[str, Any]:
    """One Dask future per job to do, each given its dependencies' futures (or their keys)."""
    futures: dict[str, Any] = {}
    for job in plan.todo:
        deps = [futures[d] if d in futures else {"keys": list(plan.get(d).keys)} for d in job.deps]
        futures[job.id] = client.submit(
            run_job, job, run, *deps, key=f"{job.id}-{run.token}", pure=False, retries=0,
            resources={"GPU": 1} if job.gpu else None,
        )  # fmt: skip
    return futures


def _stop(client: Any, run: RunContext, futures: dict[str, Any]) -> None:
    """Stop the run's jobs: each running one at its next progress report (the flag is set in
    this process and in every worker's), the others never start."""
    mark_stopped(run.token)
    try:
        client.run(mark_stopped, run.token, on_error="ignore")
    except Exception as exc:  # a scheduler already gone: its jobs are gone too
        logger.debug("could not stop the jobs of run %s: %s", run.token, exc)
    client.cancel(list(futures.values()))


def mark_stopped(token: str) -> None:
    """Stop the jobs of run ``token`` in this process (run on every worker by reference)."""
    _STOPPED.add(token)


def _gather(
    plan: Plan, futures: dict[str, Any], on_done: Callable[[Job, Outcome], None]
) -> dict[str, Outcome]:
    from distributed import as_completed

    outcomes: dict[str, Outcome] = {}
    by_key = {f.key: job_id for job_id, f in futures.items()}
    for future in as_completed(list(futures.values())):
        job = plan.get(by_key[future.key])
        outcomes[job.id] = _outcome(job, future, outcomes)
        on_done(job, outcomes[job.id])
    return outcomes


def _outcome(job: Job, future: Any, outcomes: dict[str, Outcome]) -> Outcome:
    if future.status == "finished":
        result = future.result()
        return Outcome(job.id, "done", result.get("wall_seconds", 0.0), result=result)
    failed = [d for d in job.deps if d in outcomes and outcomes[d].status != "done"]
    if failed:
        return Outcome(job.id, "not run", error=f"needs {failed[0]}, which failed")
    exc = future.exception()
    text = getattr(exc, "worker_traceback", None) or "".join(
        traceback.format_exception(type(exc), exc, future.traceback())
    )  # a failure of Dask's own (a worker that died): the client's view of it
    message = " ".join((str(exc) or type(exc).__name__).split())
    return Outcome(job.id, "failed", error=message, traceback=text)


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
