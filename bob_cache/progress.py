"""Progress for long work: tqdm bars with items/s and ETA on stderr (hidden when quiet or not a
TTY), a hook that hands every bar's count to a sink (a battle job's worker sends it to the
client), and a rich live view of several running jobs at once.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    SpinnerColumn,
    Task,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Column
from rich.text import Text
from tqdm.auto import tqdm

# Called with (description, count, total) as a bar advances: at its start, at most every
# REPORT_EVERY_S seconds, and at its close. It may raise to stop the work (an interrupt).
ProgressSink = Callable[[str, int, int | None], None]
REPORT_EVERY_S = 0.5
_SINK: ContextVar[ProgressSink | None] = ContextVar("bob_cache_progress_sink", default=None)


def progress_bar(total: int, *, desc: str, unit: str = "img", quiet: bool = False) -> tqdm:
    """A tqdm bar; ``disable=None`` lets tqdm hide it when stderr is not a terminal. Inside
    :func:`reporting_progress`, the bar also reports its count, even when hidden."""
    options = {"total": total, "desc": desc, "unit": unit, "disable": True if quiet else None,
               "file": sys.stderr, "dynamic_ncols": True, "smoothing": 0.1}  # fmt: skip
    sink = _SINK.get()
    return tqdm(**options) if sink is None else _ReportedBar(sink=sink, **options)


@contextmanager
def reporting_progress(sink: ProgressSink) -> Iterator[None]:
    """Hand the count of every bar made in this context (this thread) to ``sink``."""
    token = _SINK.set(sink)
    try:
        yield
    finally:
        _SINK.reset(token)


class _ReportedBar(tqdm):  # type: ignore[misc]
    """A tqdm bar that also reports to a sink (tqdm's own update does nothing when hidden)."""

    def __init__(self, *, sink: ProgressSink, **options: Any) -> None:
        self._sink: ProgressSink | None = sink
        self._label, self._of = str(options["desc"]), options["total"]
        self._count, self._sent = 0, time.monotonic()
        super().__init__(**options)
        sink(self._label, 0, self._of)

    def update(self, n: float | None = 1) -> bool | None:
        self._count += int(n or 0)
        if self._sink is not None and time.monotonic() - self._sent >= REPORT_EVERY_S:
            self._sent = time.monotonic()
            self._sink(self._label, self._count, self._of)
        return super().update(n)

    def close(self) -> None:
        sink, self._sink = self._sink, None
        try:
            if sink is not None:
                sink(self._label, self._count, self._of)
        finally:
            super().close()


class JobsView:
    """A live view of running jobs on a terminal (rich): per job a bar with its count, items/s
    and ETA while it reports one, else its stage and elapsed time.

    Thread-safe: updates may come from another thread (a Dask client's event loop).
    """

    def __init__(self, console: Any, *, unit: str = "img") -> None:
        # the label gives way first on a narrow terminal: counts, rate and ETA stay whole
        label = Column(ratio=1, no_wrap=True, overflow="ellipsis", min_width=12)
        self._progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}", table_column=label),
            BarColumn(bar_width=12), _CountColumn(unit), TimeRemainingColumn(),
            TimeElapsedColumn(), console=console, transient=True, expand=True,
        )  # fmt: skip
        self._tasks: dict[str, Any] = {}  # job id -> rich task id
        self._bars: dict[str, str] = {}  # job id -> the description of its current bar
        self._ended: set[str] = set()
        self._lock = threading.Lock()

    def __enter__(self) -> JobsView:
        self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._progress.stop()

    def started(self, job: str, label: str, stage: str) -> None:
        """Show ``job`` as running ``stage`` (no count yet)."""
        with self._lock:
            if job not in self._ended and job not in self._tasks:
                self._tasks[job] = self._progress.add_task(_title(label, stage), total=None)
                self._bars[job] = ""

    def advance(self, job: str, label: str, desc: str, n: int, total: int | None) -> None:
        """Show ``job``'s current bar ``desc`` at ``n`` of ``total``."""
        self.started(job, label, desc)
        with self._lock:
            if job in self._ended:
                return
            task = self._tasks[job]
            if self._bars[job] != desc:  # a new bar in the job: its own rate and ETA
                self._bars[job] = desc
                self._progress.reset(task, total=total, description=_title(label, desc))
            self._progress.update(task, completed=n, total=total)

    def ended(self, job: str) -> None:
        """Remove ``job`` (later reports for it are ignored)."""
        with self._lock:
            self._ended.add(job)
            task = self._tasks.pop(job, None)
            if task is not None:
                self._progress.remove_task(task)


def _title(label: str, part: str) -> str:
    """``label · part``, or ``label`` alone when it already says ``part``."""
    return label if part in label else f"{label} · {part}"


class _CountColumn(ProgressColumn):
    """``n/total  rate unit/s`` for a task with a total; nothing for a stage."""

    def __init__(self, unit: str) -> None:
        super().__init__()
        self.unit = unit

    def render(self, task: Task) -> Text:
        if task.total is None:
            return Text("")
        speed = task.finished_speed or task.speed
        rate = f"  {speed:.1f} {self.unit}/s" if speed else ""
        return Text(f"{int(task.completed)}/{int(task.total)}{rate}", style="progress.download")
