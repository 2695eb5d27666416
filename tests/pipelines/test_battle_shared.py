"""Battles sharing one store and results table: two started at the same instant compute each
job once and write each row once; a claim of a dead battle is taken over; a live one is
waited for (and shown); failures and Ctrl-C release the claims."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from bob_cache.pipelines.battle import BattleConfig, battle, load_battle_suite
from bob_cache.pipelines.battle import claims as battle_claims
from bob_cache.pipelines.battle.claims import claim_name, run_claimed
from bob_cache.pipelines.battle.plan import plan_battle
from bob_cache.stores.claims import ClaimBoard, ClaimRecord
from bob_cache.stores.results import UNIT_KEY, ResultsTable
from tests.pipelines.test_battle import FAST_TASKS, suite_file
from tests.pipelines.test_outage import s3  # noqa: F401  (a moto server of the test's own)


def raw_rows(results: Path) -> pd.DataFrame:
    """Every row as written, before the readers drop duplicates."""
    return pd.concat([pd.read_parquet(p) for p in sorted(results.glob("part-*.parquet"))],
                     ignore_index=True)  # fmt: skip


def claim_files(results: Path) -> list[str]:
    folder = results / ".claims"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_two_battles_started_at_once_compute_each_job_once(tmp_path: Path) -> None:
    suite = suite_file(tmp_path, [0], tasks=FAST_TASKS + "  - kind: linear\n    epochs: 5\n")
    gate = tmp_path / "go"
    wait = (  # both import everything, then wait for the same file to appear
        f"import pathlib,time\nwhile not pathlib.Path({str(gate)!r}).exists(): time.sleep(0.001)\n"
    )
    script = wait + (
        "import runpy,sys\nsys.argv=sys.argv[1:]\n"
        "runpy.run_module('bob_cache.cli', run_name='__main__')"
    )
    args = ["battle", str(suite), "--store", str(tmp_path / "store"), "--results",
            str(tmp_path / "results"), "--json"]  # fmt: skip
    procs = [subprocess.Popen([sys.executable, "-c", script, "bob-cache", *args],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]  # fmt: skip
    gate.touch()
    done = [p.communicate(timeout=240) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in done]
    summaries = [json.loads(out) for out, _ in done]
    assert [s["already_done"] for s in summaries] == [0, 0]  # both planned every job
    tasks = [j["id"] for j in summaries[0]["jobs"] if j["kind"] != "extract"]
    assert len(tasks) == 3
    for job in tasks:  # one battle computed it; the other waited and joined
        ran = [o for s in summaries for o in s["outcomes"] if o["job"] == job]
        assert [o["status"] for o in ran] == ["done", "done"]
        assert sorted(o["joined"] for o in ran) == [False, True], job
    written = raw_rows(tmp_path / "results")
    assert not written.duplicated(list(UNIT_KEY)).any()  # no row written twice
    assert written.groupby("config_hash")["run_id"].nunique().max() == 1  # one run per unit
    assert len(ResultsTable.open(tmp_path / "results").read()) == len(written)
    assert claim_files(tmp_path / "results") == []  # every claim released


def stored_claim(results: str, name: str, **fields: object) -> ClaimRecord:
    board = ResultsTable.open(results).claims
    now = time.time()
    base = {"name": name, "token": f"t{time.monotonic_ns()}", "host": socket.gethostname(),
            "pid": os.getpid(), "started": now, "heartbeat": now, "lease": 60.0}  # fmt: skip
    record = ClaimRecord(**{**base, **fields})  # type: ignore[arg-type]
    board._write(record)
    return record


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_dead_battles_claim_is_taken_over_and_a_live_one_waited_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest, where: str
) -> None:
    monkeypatch.setattr(battle_claims, "POLL_SECONDS", 0.1)
    suite = suite_file(tmp_path, [0], tasks=FAST_TASKS)
    results = str(tmp_path / "results")
    if where == "s3":  # the results table, and so the claims, on an S3 server
        results = f"{request.getfixturevalue('s3')['prefix']}/results"
    store = str(tmp_path / "store")
    plan = plan_battle(load_battle_suite(suite), store=store, results=results)
    extract, knn = plan.jobs[0], plan.get("knn#0/digits/r0")
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    stored_claim(results, claim_name(extract), pid=int(gone.stdout))  # a killed battle's
    foreign = stored_claim(results, claim_name(knn), host="elsewhere", pid=4242, lease=20.0)
    events: list[tuple[str, dict]] = []

    def progress(job: str, event: dict) -> None:
        events.append((job, event))
        if "waiting" in event.get("desc", ""):  # the other battle finishes (without rows)
            ResultsTable.open(results).claims.remove(foreign)

    started = time.monotonic()
    summary = battle(BattleConfig(suite=str(suite), store=store, results=results,
                                  on_progress=progress))  # fmt: skip
    assert time.monotonic() - started < 20  # not the foreign claim's lease: it was released
    assert not summary.failed and len(summary.outcomes) == 3
    waits = {e["desc"] for job, e in events if "waiting" in e.get("desc", "")}
    assert waits == {f"waiting for {knn.id} (claimed by elsewhere:4242)"}
    assert ResultsTable.open(results).claims._list() == []  # all released
    assert len(ResultsTable.open(results).read()) > 0


def test_a_failing_or_interrupted_job_releases_its_claim(tmp_path: Path) -> None:
    class Job:
        id, kind = "extract/x/y", "extract"

        def __init__(self, error: BaseException) -> None:
            self.error = error
            self.run = self

        def __call__(self) -> dict:
            assert claim_files(tmp_path) != []  # held while it runs
            raise self.error

    for error in (RuntimeError("the job failed"), KeyboardInterrupt()):
        with pytest.raises(type(error)):
            run_claimed(Job(error), str(tmp_path), (), on_wait=print)
        assert claim_files(tmp_path) == []


def test_a_task_finished_by_another_battle_is_joined_not_run(tmp_path: Path) -> None:
    calls: list[str] = []

    class Run:
        def finished(self, *deps: dict) -> dict:
            return {"keys": ["k"], "seconds": 0.0, "joined": True}

        def __call__(self, *deps: dict) -> dict:
            calls.append("ran")
            return {}

    class Job:
        id, kind, run = "knn#0/x/y", "knn", Run()

    assert run_claimed(Job(), str(tmp_path), ({"keys": ["k"]},), on_wait=print)["joined"]
    assert calls == [] and ClaimBoard(str(tmp_path / ".claims")).records(claim_name(Job())) == []
