"""A report killed between any two of its writes, or stopped by a full disk, leaves the previous
report (or none) and the same command then writes it whole, byte for byte as an uninterrupted
run does."""

from __future__ import annotations

import errno
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from bob_cache.errors import StoreFullError
from bob_cache.pipelines import report as report_module
from bob_cache.pipelines.report import build_report
from bob_cache.stores import feature_set as feature_set_module
from bob_cache.stores.atomic import STAGE_PREFIX
from bob_cache.stores.results import ResultsTable

from .test_report import META, rows


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, no ``except Exception`` catches it."""


def files(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(out.iterdir()) if p.is_file()}


def report(results: Path, out: Path) -> object:
    return build_report(results, out, metadata=META, suite_name="unit", bootstrap=0)


@pytest.fixture(autouse=True)
def fixed_time(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(report_module, "utc_now", lambda: "2026-01-01T00:00:00+00:00")


STEPS = [
    "report-staged", "commit-correlations.png", "commit-ranking.png", "commit-task_scatter.png",
    "commit-results.parquet", "commit-results.csv", "commit-report.md", "commit-report.html",
]  # fmt: skip
FAST = {"report-staged", "commit-report.md"}  # the others: -m slow


@pytest.fixture(scope="module")
def tables(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two results tables, the earlier report's (one backbone less) and the new one's, and
    the reports of each."""
    root = tmp_path_factory.mktemp("tables")
    old, new = root / "old-results", root / "new-results"
    ResultsTable.open(old).append([r for r in rows() if r["backbone"] != "rn18_dino"])
    ResultsTable.open(new).append(rows())
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(report_module, "utc_now", lambda: "2026-01-01T00:00:00+00:00")
        report(old, root / "old-report")
        steps: list[str] = []
        mp.setattr(feature_set_module, "crash_point", steps.append)
        report(new, root / "new-report")
    assert steps == STEPS  # a new write step needs its own kill below
    return {"old": old, "new": new, "old-report": root / "old-report",
            "new-report": root / "new-report"}  # fmt: skip


@pytest.mark.parametrize(
    "step", [pytest.param(s, marks=() if s in FAST else pytest.mark.slow) for s in STEPS]
)
@pytest.mark.parametrize("previous", [True, False], ids=["over-a-report", "first"])
def test_a_report_killed_at_any_step_leaves_the_old_one_and_reruns_whole(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tables: dict[str, Path], step: str,
    previous: bool,
) -> None:  # fmt: skip
    whole = files(tables["new-report"])
    out = tmp_path / "out"
    if previous:
        shutil.copytree(tables["old-report"], out)
    before = files(out) if previous else {}

    def kill(name: str) -> None:
        if name == step:
            raise Killed(name)

    with monkeypatch.context() as mp, pytest.raises(Killed):
        mp.setattr(feature_set_module, "crash_point", kill)
        report(tables["new"], out)
    cut = files(out)
    for page in ("report.md", "report.html"):  # the old page, the new one, or none
        assert cut.get(page) in (before.get(page), whole[page]), page
    if step != "commit-report.html":
        assert cut.get("report.html") == before.get("report.html")
    report(tables["new"], out)  # the same command again
    assert files(out) == whole
    assert not list(out.glob(f"{STAGE_PREFIX}*"))


def test_a_full_disk_keeps_the_previous_report_and_the_rerun_writes_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tables: dict[str, Path]
) -> None:
    out = tmp_path / "out"
    shutil.copytree(tables["old-report"], out)
    before = files(out)
    write_text = Path.write_text

    def full_disk(self: Path, *args: object, **kwargs: object) -> int:
        if self.name == "report.html":
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_text(self, *args, **kwargs)  # type: ignore[arg-type]

    with (
        monkeypatch.context() as mp,
        pytest.raises(StoreFullError, match="No space left.*rerun the same command"),
    ):
        mp.setattr(Path, "write_text", full_disk)
        report(tables["new"], out)
    assert files(out) == before  # the previous report, untouched
    report(tables["new"], out)
    assert files(out) == files(tables["new-report"])
    assert not list(out.glob(f"{STAGE_PREFIX}*"))  # the failed run's staging folder went too


SIGKILLED = """
import os, signal, sys
from bob_cache.pipelines import report
from bob_cache.stores import feature_set
from tests.pipelines.test_report import META

def kill(name):
    if name == sys.argv[3]:
        os.kill(os.getpid(), signal.SIGKILL)

feature_set.crash_point = kill
report.utc_now = lambda: "2026-01-01T00:00:00+00:00"
report.build_report(sys.argv[1], sys.argv[2], metadata=META, suite_name="unit", bootstrap=0)
"""


@pytest.mark.parametrize(
    "step", [pytest.param(s, marks=() if s == "commit-report.md" else pytest.mark.slow)
             for s in ("report-staged", "commit-ranking.png", "commit-report.md")],
)  # fmt: skip
def test_a_report_sigkilled_mid_commit_is_rewritten_whole(
    tmp_path: Path, tables: dict[str, Path], step: str
) -> None:
    """A real SIGKILL (no cleanup runs): the previous report's pages or the new ones, and a
    staging folder that the same command removes while writing the report whole."""
    out = tmp_path / "out"
    shutil.copytree(tables["old-report"], out)
    before = files(out)
    done = subprocess.run(
        [sys.executable, "-c", SIGKILLED, str(tables["new"]), str(out), step],
        capture_output=True, text=True, timeout=300, cwd=Path(__file__).parents[2],
    )  # fmt: skip
    assert done.returncode == -signal.SIGKILL, done.stderr
    whole = files(tables["new-report"])
    cut = files(out)
    assert cut["report.html"] == before["report.html"]
    assert cut["report.md"] in (before["report.md"], whole["report.md"])
    assert list(out.glob(f"{STAGE_PREFIX}*"))  # left behind by the kill
    report(tables["new"], out)
    assert files(out) == whole
    assert not list(out.glob(f"{STAGE_PREFIX}*"))
