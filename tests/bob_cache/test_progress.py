"""Progress: bars report their counts to a sink (even when hidden), and the battle's live view
shows each running job's count, rate and ETA, or its stage."""

from __future__ import annotations

import io
import time

import pytest
from rich.console import Console

from bob_cache import progress
from bob_cache.progress import JobsView, progress_bar, reporting_progress


def test_a_hidden_bar_reports_its_count_inside_reporting_progress(monkeypatch) -> None:
    monkeypatch.setattr(progress, "REPORT_EVERY_S", 0.0)  # every update
    seen: list[tuple[str, int, int | None]] = []
    with (
        reporting_progress(lambda *report: seen.append(report)),
        progress_bar(10, desc="digits r0", quiet=True) as bar,
    ):
        bar.update(4)
        bar.update(6)
    assert seen[0] == ("digits r0", 0, 10)  # at its start
    assert ("digits r0", 4, 10) in seen and seen[-1] == ("digits r0", 10, 10)  # and its close
    with progress_bar(10, desc="outside", quiet=True) as bar:
        bar.update(10)
    assert all(d == "digits r0" for d, _, _ in seen)  # no sink outside the context


def test_reports_are_throttled_and_a_sink_can_stop_the_work() -> None:
    seen: list[int] = []
    with (
        reporting_progress(lambda desc, n, total: seen.append(n)),
        progress_bar(1000, desc="x", quiet=True) as bar,
    ):
        for _ in range(1000):
            bar.update(1)
    assert seen[0] == 0 and seen[-1] == 1000 and len(seen) < 10  # not one per update

    def stop(desc: str, n: int, total: int | None) -> None:
        if n:
            raise KeyboardInterrupt

    with (
        pytest.raises(KeyboardInterrupt),
        reporting_progress(stop),
        progress_bar(10, desc="x", quiet=True) as bar,
    ):
        time.sleep(progress.REPORT_EVERY_S)
        bar.update(10)


def render(view: JobsView) -> str:
    buffer = io.StringIO()
    Console(file=buffer, width=160, force_terminal=False).print(view._progress)
    return buffer.getvalue()


def test_the_jobs_view_shows_count_rate_and_eta_or_the_stage() -> None:
    view = JobsView(Console(file=io.StringIO(), force_terminal=True))
    view.started("e", "extract digits × r0", "extract")
    view.started("p", "linear digits × r0", "probe")
    view.advance("e", "extract digits × r0", "digits r0", 0, 100)
    assert "0/100 -:--:--" in render(view)  # no rate, so no ETA yet
    for n in (20, 50):
        time.sleep(0.05)
        view.advance("e", "extract digits × r0", "digits r0", n, 100)
    lines = render(view).splitlines()
    extract = next(line for line in lines if "extract digits × r0 · digits r0" in line)
    assert "50/100" in extract and " img/s" in extract and "-:--:--" not in extract  # rate, ETA
    probe = next(line for line in lines if "linear digits × r0 · probe" in line)
    assert "img/s" not in probe and "/" not in probe.split("probe")[1]  # a stage: no count
    view.ended("e")
    view.advance("e", "extract digits × r0", "digits r0", 80, 100)  # a late report
    assert "extract digits" not in render(view) and "linear digits" in render(view)


def test_a_narrow_terminal_shortens_the_label_not_the_numbers() -> None:
    view = JobsView(Console(file=io.StringIO(), force_terminal=True))
    label = "extract a-rather-long-dataset-name × 3 backbones, one decode"
    for n in (0, 400, 900):
        view.advance("e", label, "a-rather-long-dataset-name × 3 backbones", n, 1797)
        time.sleep(0.05)
    buffer = io.StringIO()
    Console(file=buffer, width=80, force_terminal=False).print(view._progress)
    line = next(x for x in buffer.getvalue().splitlines() if "extract" in x)
    assert "900/1797" in line and "img/s" in line and "…" in line  # the label gave way
    assert "· a-rather" not in line  # the bar's name is already in the label: said once
