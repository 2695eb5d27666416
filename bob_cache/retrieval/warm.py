"""Warming a served index: its memory-mapped files paged in, in the background, when they fit.

An index served from disk (:mod:`bob_cache.retrieval.ondisk`) and the float16 copy that
``--rerank`` reads (:mod:`bob_cache.retrieval.rerank`) are memory-mapped, so a fresh service
reads each page from the disk, and faults it into its page tables, the first time a query
touches it: at 10M rows a query with ``--rerank 500`` touches about 1,000 pages of a 15 GB
file, and the first queries' p99 is the disk's. :class:`Warmer` pages the mappings in ahead
of the queries with ``madvise(MADV_POPULATE_READ)`` (Linux ≥ 5.14; ``MADV_WILLNEED``
read-ahead elsewhere), a chunk at a time on a background thread (the call releases the GIL),
while the service already answers. It does so only when the mapped bytes fit in
:data:`FIT` of the memory available at start; a larger index is served from disk as before,
and the status says why.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import mmap
import os
import threading
import time
from dataclasses import dataclass
from typing import Any

import psutil

from bob_cache.units import size_text

MADV_WILLNEED = 3
MADV_POPULATE_READ = 22  # Linux 5.14
CHUNK = 64 << 20  # bytes paged in per call (the stop flag is checked between calls)
FIT = 0.8  # share of the available memory the mapped files may take to be warmed
HOW = {MADV_POPULATE_READ: "page tables", MADV_WILLNEED: "read-ahead"}


@dataclass(frozen=True)
class Region:
    """A memory-mapped span to page in; ``owner`` keeps the mapping alive meanwhile."""

    name: str
    address: int
    size: int
    owner: Any = None


class Warmer:
    """Pages ``regions`` in on a background thread; :meth:`status` says how far it got.

    States: ``idle`` (not started), ``warming``, ``warm``, ``skipped`` (does not fit, or
    nothing is mapped; ``reason`` says which), ``off``, ``stopped``, ``failed`` (``reason``).
    """

    def __init__(self, regions: list[Region], *, available: int | None = None) -> None:
        self.regions = [r for r in regions if r.size > 0]
        self.total = sum(r.size for r in self.regions)
        self.available = psutil.virtual_memory().available if available is None else available
        self.done, self.state, self.reason = 0, "idle", ""
        self.advice = MADV_POPULATE_READ
        self.seconds = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._started: float | None = None

    def plan(self) -> str | None:
        """Why :meth:`start` would not page anything in (None: it would)."""
        if not self.regions:
            return "nothing is memory-mapped (an in-memory index)"
        if self.total > FIT * self.available:
            return (
                f"the mapped files ({size_text(self.total)}) exceed {FIT:.0%} of the memory "
                f"available at start ({size_text(self.available)}): served from disk, so the "
                "first queries read their pages. Free memory or add it, then restart, to keep "
                "them in memory."
            )
        return None

    def start(self) -> Warmer:
        """Begin paging in (or record why not: see :meth:`plan`); returns ``self``. Only the
        first call acts."""
        if self.state != "idle":
            return self
        reason = self.plan()
        if reason is not None:
            self.state, self.reason = "skipped", reason
            return self
        self.state = "warming"
        self._thread = threading.Thread(target=self._run, name="bob-cache-warm", daemon=True)
        self._thread.start()
        return self

    def off(self, reason: str) -> Warmer:
        """Record that warming was turned off (``reason`` shown in the status)."""
        self.state, self.reason = "off", reason
        return self

    def stop(self, timeout: float | None = 5.0) -> None:
        """Stop after the chunk in progress."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the thread; whether the mappings are now warm."""
        if self._thread is not None:
            self._thread.join(timeout)
        return self.state == "warm"

    def status(self) -> dict[str, Any]:
        """What ``/health`` shows: state, bytes paged in of the total, seconds, reason."""
        out = {"state": self.state, "bytes": self.total, "done_bytes": self.done}
        running = self.state == "warming" and self._started is not None
        out["seconds"] = round(time.monotonic() - self._started if running else self.seconds, 1)
        if self.state not in ("idle", "skipped", "off"):
            out["how"] = HOW[self.advice]
        return {**out, "reason": self.reason} if self.reason else out

    def _run(self) -> None:
        started = self._started = time.monotonic()
        try:
            for region in self.regions:
                self._page_in(region)
                if self._stop.is_set():
                    self.state = "stopped"
                    return
            self.state = "warm"
        except Exception as exc:  # any failure: the service goes on serving from disk
            self.state = "failed"
            self.reason = (
                f"paging in failed ({exc}): served from disk, pages read as queries touch them. "
                "Check the files named, or pass --no-warm."
            )
        finally:
            self.seconds = time.monotonic() - started

    def _page_in(self, region: Region) -> None:
        """``madvise`` ``region`` chunk by chunk (page-aligned), until done or stopped."""
        start = region.address - region.address % mmap.PAGESIZE
        end = region.address + region.size
        for at in range(start, end, CHUNK):
            if self._stop.is_set():
                return
            length = min(CHUNK, end - at)
            code = _madvise(at, length, self.advice)
            if code == errno.EINVAL and self.advice == MADV_POPULATE_READ:
                self.advice = MADV_WILLNEED  # an older kernel: read-ahead into the page cache
                code = _madvise(at, length, self.advice)
            _checked(code, region)
            self.done += at + length - max(at, region.address)


@functools.cache
def _libc_madvise() -> Any:
    madvise = ctypes.CDLL(None, use_errno=True).madvise
    madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return madvise


def _madvise(address: int, length: int, advice: int) -> int:
    """``madvise``; 0 or the errno it failed with (ctypes releases the GIL meanwhile)."""
    if _libc_madvise()(address, length, advice) == 0:
        return 0
    return ctypes.get_errno()


def _checked(code: int, region: Region) -> None:
    if code:
        raise OSError(code, f"madvise on {region.name}: {os.strerror(code)}")
