"""Battles sharing a store and a results table: each job is claimed beside the results
(:mod:`bob_cache.stores.claims`) before it runs, so a second battle started with the same
jobs waits for the first's (``waiting for <job> (claimed by host:pid)`` in its live view) and
then finds them done instead of computing them again.

A task job checks the results table once it holds its claim (another battle may have
finished it since the plan) and runs only when something is missing; an extraction run again
finds its committed shards and sets and skips them. The claim is released when the job ends,
fails or is interrupted; a battle that dies leaves a claim the next one takes over (pid gone
on the same host, or no heartbeat for :data:`~bob_cache.stores.claims.LEASE_SECONDS`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace
from typing import Any

from bob_cache.stores.claims import Claim, ClaimRecord
from bob_cache.stores.location import translate_remote_errors
from bob_cache.stores.results import ResultsTable

JOB_CLAIMS = "job-"  # the prefix of every job's claim name
POLL_SECONDS = 1.0  # how often a waiting job looks at the claim again
Waiting = Callable[[str], None]  # shown while a job waits: "waiting for ... (claimed by ...)"


def claim_name(job: Any) -> str:
    """The job's claim: its id and a digest of what it runs (two suites that name a job alike
    but run it differently never wait for each other). How it was started is left out."""
    run = job.run
    if hasattr(run, "config"):  # an extraction
        run = replace(run, config=replace(run.config, command=""))
    elif hasattr(run, "configs"):  # several backbones decoded together
        run = replace(run, configs=tuple(replace(c, command="") for c in run.configs))
    digest = hashlib.sha256(f"{job.kind}|{run!r}".encode()).hexdigest()[:12]
    return f"{JOB_CLAIMS}{job.id}-{digest}"


@contextmanager
def claimed(job: Any, results: str, *, on_wait: Waiting) -> Iterator[Claim]:
    """Hold ``job``'s claim in the results table's folder while the body runs."""
    board = ResultsTable.open(results).claims

    def waiting(holder: ClaimRecord) -> None:
        on_wait(f"waiting for {job.id} (claimed by {holder.holder})")

    with translate_remote_errors(results):
        claim = board.claim(claim_name(job), owner=job.id, heartbeat=True, poll=POLL_SECONDS,
                            on_wait=waiting)  # fmt: skip
    with claim:
        yield claim


def run_claimed(job: Any, results: str, deps: tuple[dict[str, Any], ...], *,
                on_wait: Waiting) -> dict[str, Any]:  # fmt: skip
    """Run ``job`` under its claim; a task another battle finished meanwhile is not run again
    (its result says ``joined``)."""
    with claimed(job, results, on_wait=on_wait):
        finished = getattr(job.run, "finished", None)
        result = finished(*deps) if finished is not None else None
        return result if result is not None else job.run(*deps)
