"""Claims: which process is doing a piece of work, recorded beside the data (a local folder or
any fsspec URL), so that another process, on any host, waits for it instead of repeating it.

A claim is one small JSON object per claimant, ``<folder>/<name>~<token>.json``, holding its
host, pid, start time, lease and last heartbeat. Taking one is *write, then list*: a process
writes its own object and then lists the name's claims; if another live claim is there it
withdraws (deletes its own) and waits. Of two racers at least one sees the other (each lists
after its own write), so at most one holds a name at a time; a racer that withdrew tries again
after a random pause. This needs no conditional writes (``If-None-Match`` is not offered by
every S3-compatible server, nor by every fsspec backend), only a listing that shows what was
written before it, as S3 and local directories do.

A claim is stale, and ignored (then deleted) by the others, when its process is gone (same
host, pid not running) or its heartbeat is older than its lease (another host, or a process
stopped; hosts' clocks must agree to well within the lease). Holders of long work renew the
heartbeat from a thread. Every claim a process holds is released on exit (``atexit``) and by
:func:`release_held`, so a Ctrl-C frees them at once; a SIGKILL leaves them for the next
claimant to find stale. A local folder left empty is removed.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import random
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

LEASE_SECONDS = 60.0  # a claim whose heartbeat is older than this is stale
SUFFIX = ".json"
_HELD: dict[str, Claim] = {}  # token -> every claim this process holds
_HELD_LOCK = threading.Lock()


@dataclass(frozen=True)
class ClaimRecord:
    """One claimant of a name, as stored."""

    name: str
    token: str
    host: str
    pid: int
    started: float  # time.time() when taken
    heartbeat: float  # time.time() when last renewed
    lease: float
    owner: str = ""  # what holds it, in words (e.g. the job)

    @property
    def holder(self) -> str:
        """``host:pid``."""
        return f"{self.host}:{self.pid}"

    def is_stale(self, now: float | None = None) -> bool:
        """Whether its process is gone (same host) or its lease ran out."""
        if self.host == socket.gethostname() and not _pid_alive(self.pid):
            return True
        return (time.time() if now is None else now) - self.heartbeat > self.lease


class ClaimBoard:
    """A folder of claims, local (``fs`` None) or on an fsspec filesystem."""

    def __init__(self, root: str, *, fs: Any = None) -> None:
        self.root = root.rstrip("/")
        self.fs = fs

    def records(self, name: str) -> list[ClaimRecord]:
        """Every readable claim of ``name`` (live or stale)."""
        prefix = f"{safe_name(name)}~"
        found = []
        for file in self._list():
            if file.startswith(prefix) and file.endswith(SUFFIX):
                record = self._read(file)
                if record is not None:
                    found.append(record)
        return found

    def holders(self, name: str, *, besides: str = "") -> list[ClaimRecord]:
        """The live claims of ``name`` other than token ``besides``; stale ones are deleted."""
        live = []
        now = time.time()
        for record in self.records(name):
            if record.token == besides:
                continue
            if record.is_stale(now):
                logger.info("claim %s of %s is stale: taken over", record.name, record.holder)
                self._delete(_file(record.name, record.token))
            else:
                live.append(record)
        return live

    def try_claim(
        self, name: str, *, owner: str = "", lease: float = LEASE_SECONDS, heartbeat: bool = False
    ) -> Claim | ClaimRecord:
        """Take ``name`` if no live claimant holds it: the :class:`Claim`, else the holder."""
        others = self.holders(name)
        if others:
            return others[0]
        now = time.time()
        record = ClaimRecord(name, uuid.uuid4().hex, socket.gethostname(), os.getpid(), now, now,
                             lease, owner)  # fmt: skip
        self._write(record)
        others = self.holders(name, besides=record.token)
        if others:  # a racer wrote too: withdraw, and let the caller try again
            self._delete(_file(name, record.token))
            return others[0]
        return Claim(self, record, heartbeat=heartbeat)

    def claim(
        self,
        name: str,
        *,
        owner: str = "",
        lease: float = LEASE_SECONDS,
        heartbeat: bool = False,
        poll: float = 1.0,
        on_wait: Callable[[ClaimRecord], None] | None = None,
    ) -> Claim:
        """Take ``name``, waiting (polling every ``poll`` seconds, jittered) while another
        live claimant holds it; ``on_wait`` is called with the holder before each pause and
        may raise to stop waiting. The claim's ``waited`` says whether it had to wait."""
        waited = False
        while True:
            got = self.try_claim(name, owner=owner, lease=lease, heartbeat=heartbeat)
            if isinstance(got, Claim):
                got.waited = waited
                return got
            waited = True
            if on_wait is not None:
                on_wait(got)
            time.sleep(poll * random.uniform(0.5, 1.5))

    def remove(self, record: ClaimRecord) -> None:
        """Delete one claim (its holder's release, or clearing one by hand)."""
        self._delete(_file(record.name, record.token))

    # storage: local files written whole (temporary + rename), else the fsspec filesystem

    def _list(self) -> list[str]:
        if self.fs is None:
            try:
                return os.listdir(self.root)
            except FileNotFoundError:
                return []
        try:
            paths = self.fs.ls(self.root, detail=False, refresh=True)
        except FileNotFoundError:
            return []
        return [str(p).rstrip("/").rsplit("/", 1)[-1] for p in paths]

    def _read(self, file: str) -> ClaimRecord | None:
        try:
            if self.fs is None:
                data = Path(self.root, file).read_bytes()
            else:
                data = self.fs.cat_file(f"{self.root}/{file}")
            return ClaimRecord(**json.loads(data))
        except FileNotFoundError:  # released since the listing
            return None
        except (ValueError, TypeError) as exc:  # not a claim: left alone, never taken as one
            logger.warning("ignoring unreadable claim %s/%s: %s", self.root, file, exc)
            return None

    def _write(self, record: ClaimRecord) -> None:
        data = json.dumps(asdict(record)).encode()
        file = _file(record.name, record.token)
        if self.fs is None:
            for attempt in range(5):  # another process may remove the empty folder meanwhile
                try:
                    Path(self.root).mkdir(parents=True, exist_ok=True)
                    tmp = Path(self.root, f".{file}.{uuid.uuid4().hex[:8]}.tmp")
                    tmp.write_bytes(data)
                    os.replace(tmp, Path(self.root, file))
                    return
                except FileNotFoundError:
                    if attempt == 4:
                        raise
        else:
            self.fs.pipe_file(f"{self.root}/{file}", data)

    def _delete(self, file: str) -> None:
        try:
            if self.fs is None:
                Path(self.root, file).unlink()
            else:
                self.fs.rm_file(f"{self.root}/{file}")
        except FileNotFoundError:
            pass
        if self.fs is None:  # no empty folder left behind (one still in use stays)
            with contextlib.suppress(OSError):
                os.rmdir(self.root)


class Claim:
    """A held claim: a context manager that releases it on exit (also on errors)."""

    def __init__(self, board: ClaimBoard, record: ClaimRecord, *, heartbeat: bool) -> None:
        self.board, self.record = board, record
        self.waited = False
        self._stop = threading.Event()
        self._lock = threading.Lock()  # a renewal never lands after the release
        self._beat: threading.Thread | None = None
        with _HELD_LOCK:
            _HELD[record.token] = self
        if heartbeat:
            self._beat = threading.Thread(target=self._renew, daemon=True,
                                          name=f"claim-{record.token[:8]}")  # fmt: skip
            self._beat.start()

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def release(self) -> None:
        """Delete the claim (once; later calls do nothing)."""
        with _HELD_LOCK:
            if _HELD.pop(self.record.token, None) is None:
                return
        with self._lock:
            self._stop.set()
            try:
                self.board._delete(_file(self.record.name, self.record.token))
            except Exception as exc:  # unreachable store: the claim goes stale by its lease
                logger.warning("could not release claim %s: %s", self.record.name, exc)

    def _renew(self) -> None:
        interval = self.record.lease / 4
        while not self._stop.wait(interval):
            try:
                records = self.board.records(self.record.name)
            except Exception as exc:  # a store hiccup: the next beat tries again
                logger.warning("could not renew claim %s: %s", self.record.name, exc)
                continue
            if not any(r.token == self.record.token for r in records):
                logger.warning("claim %s was taken over (its heartbeat was late): another "
                               "process may repeat this work", self.record.name)  # fmt: skip
                return
            with self._lock:
                if self._stop.is_set():
                    return
                self.record = ClaimRecord(**{**asdict(self.record), "heartbeat": time.time()})
                try:
                    self.board._write(self.record)
                except Exception as exc:  # a store hiccup: the next beat tries again
                    logger.warning("could not renew claim %s: %s", self.record.name, exc)


def release_held(prefix: str = "") -> None:
    """Release every claim this process holds whose name starts with ``prefix`` (Ctrl-C,
    exit)."""
    with _HELD_LOCK:
        held = [c for c in _HELD.values() if c.record.name.startswith(prefix)]
    for claim in held:
        claim.release()


atexit.register(release_held)


def safe_name(name: str) -> str:
    """``name`` as a file name: characters other than letters, digits, ``.``, ``_``, ``-``
    become ``_`` (no ``~``, which separates the name from the token)."""
    return re.sub(r"[^A-Za-z0-9._-]", "_", name)


def _file(name: str, token: str) -> str:
    return f"{safe_name(name)}~{token}{SUFFIX}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: it exists
        return True
    return True
