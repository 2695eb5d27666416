"""Appends to the results table under kills and a full disk: a part file appears whole or not
at all, so later reads never meet a truncated part, and ``results import`` reruns to the rows
of an uninterrupted import."""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bob_cache.stores.results import ResultsTable
from bob_cache.stores.results_import import import_results

from .test_results import GOOD, write_csv

APPENDER = """
import sys
from bob_cache.stores.results import COLUMNS, ResultsTable
table = ResultsTable.open(sys.argv[1])
print("ready", flush=True)
for i in range(100_000):
    rows = [{**{c: "" for c in COLUMNS}, "stage": "probe", "metric": "top1", "value": 0.5,
             "seed": 0, "config_hash": f"h{i}-{j}", "run_id": str(i), "versions": {},
             "train_rows": 1, "val_rows": 0} for j in range(500)]
    table.append(rows)
"""


def rows_of(directory: Path) -> list[tuple]:
    frame = ResultsTable.open(directory).read().drop(columns=["run_id", "time"])
    return sorted(map(tuple, frame.astype(str).to_numpy()))


def test_an_appender_killed_at_random_moments_never_leaves_a_part_that_breaks_reads(
    tmp_path: Path,
) -> None:
    table = tmp_path / "res"
    for delay in (0.05, 0.3, 0.5, 0.7, 0.9):
        proc = subprocess.Popen(
            [sys.executable, "-c", APPENDER, str(table)], stdout=subprocess.PIPE, text=True
        )
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    frame = ResultsTable.open(table).read()  # every visible part reads whole
    assert len(frame) > 0 and len(frame) % 500 == 0 and frame.groupby("run_id").size().eq(500).all()


def test_an_import_stopped_by_a_full_disk_adds_nothing_and_reruns_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    csv = write_csv(tmp_path / "x.csv", GOOD)
    import_results(csv, results=tmp_path / "clean", source="paper")
    write_bytes = Path.write_bytes

    def full_disk(self: Path, data: bytes) -> int:
        write_bytes(self, data[: len(data) // 2])  # half the part, then the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as mp, pytest.raises(OSError, match="space"):
        mp.setattr(Path, "write_bytes", full_disk)
        import_results(csv, results=tmp_path / "r", source="paper")
    assert ResultsTable.open(tmp_path / "r").files("part-*.parquet") == []
    assert list((tmp_path / "r").glob(".*.tmp")) == []  # no half part left taking the space
    assert ResultsTable.open(tmp_path / "r").read().empty  # the half-written file is not read
    summary = import_results(csv, results=tmp_path / "r", source="paper")
    assert summary.added == 4
    assert rows_of(tmp_path / "r") == rows_of(tmp_path / "clean")
    again = import_results(csv, results=tmp_path / "r", source="paper")
    assert again.added == 0 and len(ResultsTable.open(tmp_path / "r").read()) == 4
