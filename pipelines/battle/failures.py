"""The battle's failure log: the full traceback of every job that did not finish, in one text
file beside the results table (``battle-<suite>-<run id>.log``), named by the summary.

The file is rewritten whole as each failure arrives (a local file or one object on an object
store), so an interrupted battle keeps the failures it saw. A battle without failures writes
none.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

from bob_cache.stores.results import ResultsTable

LOG_FILE = "battle-{suite}-{run_id}.log"


def new_run_id() -> str:
    """A run id that sorts by start time: ``YYYYMMDD-HHMMSS-xxxxxx``."""
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"


class FailureLog:
    """Collects failed jobs' tracebacks and writes them beside the results table."""

    def __init__(self, results: str, *, suite: str, run_id: str, command: str = "") -> None:
        self.table = ResultsTable.open(results)
        self.name = LOG_FILE.format(suite=suite, run_id=run_id)
        self.header = f"bob-cache battle {suite}, run {run_id}\n{command}\n".rstrip() + "\n"
        self.entries: list[str] = []

    @property
    def path(self) -> str | None:
        """The log's path or URL once something was written to it, else None."""
        return self.table.path(self.name) if self.entries else None

    def add(self, job: str, status: str, error: str, traceback: str = "") -> None:
        """Record one job that did not finish, and rewrite the file."""
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        body = f"\n{traceback.rstrip()}\n" if traceback.strip() else ""
        self.entries.append(f"== {job}: {status} ({stamp})\n{error}\n{body}")
        text = "\n".join([self.header, *self.entries])
        self.table.write_bytes(self.name, text.encode())

    def add_outcome(self, outcome: Any) -> None:
        """Record an :class:`Outcome` unless it is done."""
        if outcome.status != "done":
            self.add(outcome.job, outcome.status, outcome.error, outcome.traceback)
