"""Claims beside a store: one holder at a time among racing processes and threads (local and
S3), stale claims (dead pid, lapsed lease) taken over, heartbeats, release on errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from bob_cache.stores.claims import Claim, ClaimBoard, ClaimRecord, release_held, safe_name


def _hold_in_turns(root: str, log: str, barrier: object, rounds: int) -> None:
    board = ClaimBoard(root)
    barrier.wait()  # type: ignore[attr-defined]
    for _ in range(rounds):
        with board.claim("job", poll=0.01):
            with open(log, "a") as f:
                f.write(f"in {os.getpid()}\n")
            time.sleep(0.02)
            with open(log, "a") as f:
                f.write(f"out {os.getpid()}\n")


def assert_one_at_a_time(lines: list[str], holds: int) -> None:
    assert len(lines) == 2 * holds
    for enter, leave in zip(lines[::2], lines[1::2], strict=True):  # never two inside at once
        assert enter.startswith("in ") and leave == enter.replace("in ", "out ", 1)


def test_processes_racing_for_one_claim_hold_it_one_at_a_time(tmp_path: Path) -> None:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(4)
    log = tmp_path / "log"
    procs = [ctx.Process(target=_hold_in_turns, args=(str(tmp_path / "claims"), str(log),
                                                      barrier, 5)) for _ in range(4)]  # fmt: skip
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 4
    assert_one_at_a_time(log.read_text().splitlines(), 20)
    assert not (tmp_path / "claims").exists()  # every claim released, no empty folder left


def test_threads_racing_on_s3_hold_it_one_at_a_time(s3_server: dict) -> None:
    import fsspec

    fs = fsspec.filesystem("s3", **s3_server)
    board = ClaimBoard(f"bob/claims-{uuid.uuid4().hex}", fs=fs)
    lines: list[str] = []
    barrier = threading.Barrier(3)

    def hold(name: str) -> None:
        barrier.wait()
        for _ in range(3):
            with board.claim("job", poll=0.02):
                lines.append(f"in {name}")
                time.sleep(0.02)
                lines.append(f"out {name}")

    threads = [threading.Thread(target=hold, args=(str(k),)) for k in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert_one_at_a_time(lines, 9)
    assert board.records("job") == []


def stored(board: ClaimBoard, **fields: object) -> ClaimRecord:
    now = time.time()
    base = {"name": "job", "token": uuid.uuid4().hex, "host": socket.gethostname(),
            "pid": os.getpid(), "started": now, "heartbeat": now, "lease": 60.0}  # fmt: skip
    record = ClaimRecord(**{**base, **fields})  # type: ignore[arg-type]
    board._write(record)
    return record


def test_a_claim_of_a_dead_process_or_a_lapsed_lease_is_taken_over(tmp_path: Path) -> None:
    board = ClaimBoard(str(tmp_path / "claims"))
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead = stored(board, pid=int(gone.stdout))
    claim = board.try_claim("job")
    assert isinstance(claim, Claim) and claim.record.token != dead.token
    assert [r.token for r in board.records("job")] == [claim.record.token]  # the stale one gone
    claim.release()
    live = stored(board, host="elsewhere", pid=1)  # another host: its lease decides
    assert board.try_claim("job") == live
    stored(board, name="job", token=live.token, host="elsewhere", pid=1,
           heartbeat=time.time() - 61)  # fmt: skip
    assert isinstance(board.try_claim("job"), Claim)


def test_a_heartbeat_keeps_a_long_claim_and_release_happens_on_errors(tmp_path: Path) -> None:
    board = ClaimBoard(str(tmp_path / "claims"))
    with board.claim("long", lease=0.4, heartbeat=True) as claim:
        time.sleep(0.8)  # twice the lease: only the heartbeat keeps it live
        assert board.try_claim("long") == claim.record or board.holders("long")
        assert board.records("long")[0].heartbeat > claim.record.started
    with pytest.raises(RuntimeError), board.claim("failing"):
        raise RuntimeError("the job failed")
    assert board.records("failing") == []
    held = board.claim("interrupted")
    release_held()  # what Ctrl-C does
    assert board.records("interrupted") == [] and not (tmp_path / "claims").exists()
    held.release()  # once only: a later release does nothing


def test_waiting_reports_the_holder_and_ends_when_it_releases(tmp_path: Path) -> None:
    board = ClaimBoard(str(tmp_path / "claims"))
    first = board.claim("job/1 + x")
    seen: list[str] = []
    timer = threading.Timer(0.3, first.release)
    timer.start()
    second = board.claim("job/1 + x", poll=0.05, on_wait=lambda r: seen.append(r.holder))
    assert second.waited and seen and seen[0] == f"{socket.gethostname()}:{os.getpid()}"
    second.release()
    assert safe_name("job/1 + x") == "job_1___x" and not (tmp_path / "claims").exists()


def test_an_unreadable_claim_file_is_ignored(tmp_path: Path) -> None:
    board = ClaimBoard(str(tmp_path / "claims"))
    (tmp_path / "claims").mkdir()
    (tmp_path / "claims" / "job~junk.json").write_text("{not json")
    stale = json.dumps({"name": "job"})  # missing fields: not a claim either
    (tmp_path / "claims" / "job~half.json").write_text(stale)
    with board.claim("job") as claim:
        assert [r.token for r in board.records("job")] == [claim.record.token]
