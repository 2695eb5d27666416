"""The battle stage: planning against the store and the results table, skipping what is
done, running on Dask (in-process and a LocalCluster), and reporting failures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from bob_cache.pipelines.battle import BattleConfig, battle, load_battle_suite
from bob_cache.pipelines.battle.plan import plan_battle
from bob_cache.pipelines.cluster import SchedulerError
from bob_cache.stores.results import ResultsTable

SUITE = """\
name: tiny
backbones:
{backbones}
datasets:
  - name: digits
    data: builtin:digits
    limit: 60
tasks:
{tasks}options:
  workers: 0
  shard_rows: 32
"""
TASKS = """\
  - kind: linear
  - kind: knn
    k: [5]
  - kind: few-shot
    shots: [1]
    seeds: [0]
  - kind: retrieval
"""
FAST_TASKS = "  - kind: knn\n    k: [5]\n  - kind: retrieval\n"
BACKBONE = """\
  - name: test_resnet
    label: {label}
    random_init: true
    seed: {seed}
    image_size: 32
    family: ResNet
    method: random init
    params: 1000
"""


def suite_file(tmp_path: Path, seeds: list[int], extra: str = "", tasks: str = TASKS) -> Path:
    text = "".join(BACKBONE.format(label=f"r{s}", seed=s) for s in seeds) + extra
    path = tmp_path / "suite.yaml"
    path.write_text(SUITE.format(backbones=text.rstrip("\n"), tasks=tasks))
    return path


def run(tmp_path: Path, suite: Path, **kwargs: object):
    return battle(BattleConfig(suite=str(suite), store=str(tmp_path / "store"),
                               results=str(tmp_path / "results"), **kwargs))  # fmt: skip


def rows(results: Path) -> pd.DataFrame:
    frame = ResultsTable.open(results).read()
    keys = ["backbone", "feature_key", "stage", "method", "setting", "metric", "seed"]
    return frame.sort_values(keys)[[*keys, "value", "config_hash"]].reset_index(drop=True)


@pytest.fixture(scope="module")
def finished(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A battle of two backbones, run once in-process (its progress events in events.json)."""
    tmp = tmp_path_factory.mktemp("battle")
    events: list[dict] = []
    summary = run(tmp, suite_file(tmp, [0, 1]), threads=1,
                  on_progress=lambda job, event: events.append({**event, "job": job}))  # fmt: skip
    assert not summary.failed and len(summary.outcomes) == 9  # one extraction for both
    assert summary.outcomes[0]["job"] == "extract/digits/r0+r1"  # decode once, extract many
    assert summary.log is None and not list((tmp / "results").glob("*.log"))  # nothing failed
    (tmp / "events.json").write_text(json.dumps(events))
    return tmp


def test_progress_travels_from_the_worker_to_the_client(finished: Path) -> None:
    events = json.loads((finished / "events.json").read_text())
    stages = {e["job"]: e["stage"] for e in events if "stage" in e}
    assert stages["extract/digits/r0+r1"] == "extract"  # every job says when it starts
    assert stages["linear#0/digits/r1"] == stages["few-shot#2/digits/r0"] == "probe"
    assert stages["retrieval#3/digits/r0"] == "retrieval-eval" and len(stages) == 9
    bars = [e for e in events if e["job"] == "extract/digits/r0+r1" and "desc" in e]
    assert {(e["n"], e["total"]) for e in bars} >= {(0, 60), (60, 60)}  # a split's count


def test_a_battle_runs_every_job_and_a_second_run_does_nothing(finished: Path) -> None:
    frame = rows(finished / "results")
    assert set(frame["backbone"]) == {"test_resnet.random-s0", "test_resnet.random-s1"}
    per = frame.groupby("backbone")["stage"].value_counts().unstack()
    assert (per["retrieval"] > 0).all() and (per["probe"] > 0).all()
    settings = set(frame["setting"])
    assert {"full", "1-shot"} <= settings
    again = run(finished, finished / "suite.yaml")
    assert again.outcomes == [] and again.already_done == 10
    assert len(ResultsTable.open(finished / "results").read()) == len(frame)  # nothing added


def test_adding_a_backbone_plans_only_its_jobs(finished: Path, tmp_path: Path) -> None:
    path = suite_file(tmp_path, [0, 1, 2])
    suite = load_battle_suite(path)
    plan = plan_battle(suite, store=str(finished / "store"), results=str(finished / "results"))
    assert {(j.kind, j.backbone) for j in plan.todo} == {
        (k, "r2") for k in ("extract", "linear", "knn", "few-shot", "retrieval")
    }


def test_the_backbones_metadata_lands_beside_the_results(finished: Path) -> None:
    meta = json.loads((finished / "results" / "backbones-tiny.json").read_text())
    assert meta["test_resnet.random-s1"] == {
        "label": "r1", "name": "test_resnet", "family": "ResNet", "method": "random init",
        "data": None, "params": 1000,
    }  # fmt: skip


def test_a_dry_run_writes_nothing(tmp_path: Path) -> None:
    summary = run(tmp_path, suite_file(tmp_path, [0]), dry_run=True)
    assert len(summary.jobs) == 5 and summary.outcomes == []
    assert not (tmp_path / "store").exists() and not (tmp_path / "results").exists()


def test_a_failing_job_is_reported_and_the_others_finish(tmp_path: Path) -> None:
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a checkpoint")
    extra = f"  - name: test_resnet\n    label: broken\n    weights: {bad}\n"
    summary = run(tmp_path, suite_file(tmp_path, [0], extra))
    status = {o["job"]: o for o in summary.outcomes}
    # both backbones share one decode; the broken one is left out and its tasks say why
    assert status["extract/digits/r0+broken"]["status"] == "done"
    assert status["linear#0/digits/broken"]["status"] == "failed"
    assert "extraction of 'broken' failed: Cannot read weights file" in " ".join(
        status["linear#0/digits/broken"]["error"].split()
    )
    assert all(o["status"] == "done" for j, o in status.items() if j.endswith("/r0"))
    assert len(summary.failed) == 4
    assert not list((tmp_path / "results" / ".claims").glob("*.json"))  # failed jobs' released
    alone = run(tmp_path / "alone", suite_file(tmp_path, [], extra))  # its own job fails
    status = {o["job"]: o for o in alone.outcomes}
    assert status["extract/digits/broken"]["status"] == "failed"
    assert status["linear#0/digits/broken"]["status"] == "not run"
    assert "needs extract/digits/broken" in status["linear#0/digits/broken"]["error"]


def broken_suite(tmp_path: Path, seeds: list[int], tasks: str = TASKS) -> Path:
    """A suite whose backbone 'broken' has an unreadable weights file (a user error)."""
    bad = tmp_path / "broken.pth"
    bad.write_bytes(b"not a checkpoint")
    extra = f"  - name: test_resnet\n    label: broken\n    weights: {bad}\n"
    return suite_file(tmp_path, seeds, extra, tasks)


def test_a_user_error_is_one_line_with_its_fix_and_its_traceback_goes_to_the_log(
    tmp_path: Path,
) -> None:
    from tests.conftest import run_cli

    suite = broken_suite(tmp_path, [0], FAST_TASKS)
    done = run_cli("battle", suite, "--store", tmp_path / "s", "--results", tmp_path / "r")
    assert done.returncode == 1, done.stderr
    lines = done.stderr.splitlines()
    ok = [line for line in lines if line.startswith("✓ ")]
    failed = [line for line in lines if line.startswith("✗ ")]
    assert len(ok) == 3 and len(failed) == 2  # one line per finished job (stderr not a TTY)
    for kind in ("knn", "retrieval"):
        (line,) = [f for f in failed if f.startswith(f"✗ {kind} digits × broken: failed: ")]
        assert "re-save just the state_dict" in line  # the error's fix
    assert "Traceback" not in done.stderr + done.stdout  # no worker tracebacks on the console
    assert "distributed" not in done.stderr and "Compute Failed" not in done.stderr
    summary = next(line for line in lines if "did not finish" in line)
    assert summary.startswith("2 job(s) did not finish")
    log = Path(summary.rsplit("their tracebacks: ", 1)[1])
    assert log.parent == tmp_path / "r" and log.name.startswith("battle-tiny-")
    text = log.read_text()
    assert text.count("Traceback (most recent call last)") == 2
    assert "== knn#0/digits/broken: failed" in text and "BackboneUnavailableError" in text
    assert f"bob-cache battle {suite}" in text  # the command that ran


def test_a_failing_extraction_leaves_its_tasks_not_run_and_json_names_the_log(
    cli, tmp_path: Path
) -> None:
    suite = broken_suite(tmp_path, [])
    result = cli("battle", suite, "--store", tmp_path / "s", "--results", tmp_path / "r", "--json")
    assert result.exit_code == 1
    summary = json.loads(result.stdout)
    assert [o["status"] for o in summary["outcomes"]].count("not run") == 4
    log = Path(summary["log"]).read_text()
    assert "== extract/digits/broken: failed" in log and "Cannot read weights file" in log
    assert "== knn#1/digits/broken: not run" in log and "needs extract/digits/broken" in log


def test_a_terminal_gets_the_live_view_and_quiet_gets_lines(cli, tmp_path: Path, monkeypatch):
    import io

    from rich.console import Console

    import bob_cache.commands.battle as command
    from bob_cache import progress

    views: list[list[tuple]] = []

    class Recorder(progress.JobsView):
        def __init__(self, console: object) -> None:
            super().__init__(console)
            views.append([])

        def started(self, job: str, label: str, stage: str) -> None:
            views[-1].append((job, label, stage))
            super().started(job, label, stage)

    terminal = io.StringIO()
    console = Console(file=terminal, force_terminal=True, color_system=None, width=200)
    monkeypatch.setattr(command, "err", console)
    monkeypatch.setattr(progress, "JobsView", Recorder)
    suite = broken_suite(tmp_path, [])
    args = ["battle", suite, "--store", tmp_path / "s", "--results", tmp_path / "r"]
    assert cli(*args).exit_code == 1
    assert views == [[("extract/digits/broken", "extract digits × broken", "extract")]]
    assert "✗ extract digits × broken: failed: Cannot read weights" in terminal.getvalue()
    terminal.truncate(0)
    assert cli(*args, "--quiet").exit_code == 1
    assert len(views) == 1 and "✗ extract digits × broken: failed" in terminal.getvalue()


def test_ctrl_c_prints_the_rerun_hint_and_the_rerun_skips_the_done_jobs(
    cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    execute = sys.modules["bob_cache.pipelines.battle.execute"]
    real = execute._outcome

    def interrupted_after_the_extraction(job, future, outcomes):
        outcome = real(job, future, outcomes)
        if job.kind == "extract":
            raise KeyboardInterrupt  # as Ctrl-C does, in the thread that waits for the jobs
        return outcome

    monkeypatch.setattr(execute, "_outcome", interrupted_after_the_extraction)
    suite = suite_file(tmp_path, [0], tasks=FAST_TASKS)
    args = ["battle", suite, "--store", tmp_path / "s", "--results", tmp_path / "r"]
    result = cli(*args)
    assert result.exit_code == 130
    command = f"bob-cache battle {suite} --store {tmp_path / 's'} --results {tmp_path / 'r'}"
    assert "Interrupted. Finished jobs are kept" in result.output
    assert f"rerun `{command}` to run the rest" in result.output
    assert "Traceback" not in result.output and "Battle tiny:" not in result.output
    plan = plan_battle(load_battle_suite(suite), store=str(tmp_path / "s"),
                       results=str(tmp_path / "r"))  # what the rerun does  # fmt: skip
    assert plan.jobs[0].kind == "extract" and plan.jobs[0].done
    assert 1 <= len(plan.todo) <= 2  # the tasks (less one that ended before the stop)
    assert not list((tmp_path / "r" / ".claims").glob("*.json"))  # its job claims released


def test_an_interrupted_run_stops_its_jobs_at_their_next_progress_report() -> None:
    execute = sys.modules["bob_cache.pipelines.battle.execute"]
    reporter = execute._Reporter("extract/x", execute.RunContext(1, "t0ken"))
    reporter("digits", 10, 100)  # running: nothing happens (no client to report to)
    execute.mark_stopped("t0ken")
    with pytest.raises(execute.JobInterrupted, match="interrupted"):
        reporter("digits", 20, 100)
    other = execute._Reporter("extract/x", execute.RunContext(1, "other"))
    other("digits", 20, 100)  # another run goes on


@pytest.mark.parametrize("workers", [[], pytest.param(["--workers", "2"], marks=pytest.mark.slow)])
@pytest.mark.filterwarnings("ignore:Object at .* is not recognized:UserWarning")  # polling
def test_sigint_stops_a_running_battle_without_dask_noise(tmp_path: Path, workers: list) -> None:
    """Ctrl-C on a terminal: SIGINT to the whole process group (worker processes included)."""

    def extracting() -> bool:  # a shard's features on disk: a file test, no store reader
        return any((tmp_path / "s").glob("digits/*/*/*/features/c/*"))

    suite = suite_file(tmp_path, [0], tasks=FAST_TASKS)
    # the whole of digits at 128 px: the extraction outlasts the poll below by many seconds
    suite.write_text(suite.read_text().replace("limit: 60", "limit: 1797")
                     .replace("image_size: 32", "image_size: 128"))  # fmt: skip
    cmd = [sys.executable, "-m", "bob_cache.cli", "battle", str(suite), "--store",
           str(tmp_path / "s"), "--results", str(tmp_path / "r"), *workers]  # fmt: skip
    # A terminal's battle: SIGINT at its default disposition, whatever pytest inherited (a
    # shell's background job, `cmd &`, runs with SIGINT ignored, and that survives exec).
    default = lambda: signal.signal(signal.SIGINT, signal.SIG_DFL)  # noqa: E731
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=default)  # fmt: skip
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not extracting():
        time.sleep(0.05)  # extracting
    assert proc.poll() is None, "the battle finished before its extraction was seen"
    os.killpg(proc.pid, signal.SIGINT)
    stopped = time.monotonic()
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert time.monotonic() - stopped < 15  # the running extraction stopped early
    assert "Interrupted." in stderr and f"rerun `bob-cache battle {suite} --store" in stderr
    assert "Traceback" not in stderr and "distributed" not in stderr and "Warning" not in stderr


def test_a_scheduler_that_does_not_answer_fails_fast_and_clearly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bob_cache.pipelines.cluster as cluster

    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT_S", 2)  # the wait is the product's setting
    started = time.monotonic()
    with pytest.raises(SchedulerError, match=r"No Dask scheduler answers at 'tcp://127.0.0.1:9'"):
        run(tmp_path, suite_file(tmp_path, [0]), scheduler="tcp://127.0.0.1:9")
    assert time.monotonic() - started < 30


@pytest.mark.slow
def test_a_local_cluster_of_two_workers_gives_the_same_rows(finished: Path, tmp_path: Path) -> None:
    suite = suite_file(tmp_path, [0, 1])  # with image loader processes inside Dask workers
    suite.write_text(suite.read_text().replace("workers: 0", "workers: 1"))
    events: list[tuple[str, dict]] = []
    summary = run(tmp_path, suite, workers=2, threads=1,
                  on_progress=lambda job, event: events.append((job, event)))  # fmt: skip
    assert not summary.failed
    assert len({job for job, event in events if "stage" in event}) == 9  # from the processes
    ours, theirs = rows(tmp_path / "results"), rows(finished / "results")
    pd.testing.assert_frame_equal(ours, theirs)


OOD_SUITE = """\
name: ood
backbones:
{backbone}
datasets:
  - name: digits
    data: builtin:digits
    limit: 60
    shift: [digits-noise]
    detect: [digits-noise]
  - name: digits-noise
    data: {shifted}
    evaluate: false
tasks:
  - kind: linear
  - kind: ood
    detectors: [msp, knn, mahalanobis]
    knn_k: 5
options:
  workers: 0
  shard_rows: 32
"""


def test_an_ood_task_waits_for_its_shift_sets_and_ranks_in_the_report(tmp_path: Path) -> None:
    from bob_cache.pipelines.shift import ShiftConfig, shift

    made = shift(ShiftConfig(data="builtin:digits", out=str(tmp_path / "shifted"),
                             corruptions=("gaussian_noise",), severities=(5,), limit=60,
                             quiet=True))  # fmt: skip
    path = tmp_path / "suite.yaml"
    backbone = BACKBONE.format(label="r0", seed=0).rstrip("\n")
    path.write_text(OOD_SUITE.format(backbone=backbone, shifted=made.outputs[0]["data"]))
    plan = plan_battle(load_battle_suite(path), store=str(tmp_path / "store"),
                       results=str(tmp_path / "results"))  # fmt: skip
    kinds = [(j.kind, j.dataset) for j in plan.jobs]
    assert kinds == [("extract", "digits"), ("extract", "digits-noise"), ("linear", "digits"),
                     ("ood", "digits")]  # nothing runs on the evaluate: false set  # fmt: skip
    assert plan.jobs[-1].deps == ("extract/digits/r0", "extract/digits-noise/r0")
    summary = run(tmp_path, path, threads=1)
    assert not summary.failed, summary.outcomes
    frame = ResultsTable.open(tmp_path / "results").read(stage="ood")
    assert {"shift:digits-noise", "detect:digits-noise"} <= set(frame.setting)
    assert set(frame[frame.setting == "detect:digits-noise"].method) == {
        "msp",
        "knn",
        "mahalanobis",
    }
    assert run(tmp_path, path).outcomes == []  # the ood job is done: its rows are there


def test_shift_and_detect_names_must_be_datasets_of_the_suite(tmp_path: Path) -> None:
    path = tmp_path / "suite.yaml"
    text = OOD_SUITE.format(backbone=BACKBONE.format(label="r0", seed=0).rstrip("\n"),
                            shifted="builtin:digits")  # fmt: skip
    path.write_text(text.replace("shift: [digits-noise]", "shift: [digits-nois, digits]"))
    with pytest.raises(Exception, match="(?s)datasets.0.shift.0.*Did you mean 'digits-noise'") as e:
        load_battle_suite(path)
    assert "is this dataset itself" in str(e.value)


FINETUNE_SUITE = """\
name: tuned
backbones:
  - name: test_resnet
    label: r0
    weights: {weights}
  - name: test_resnet
    label: r1
    random_init: true
datasets:
  - name: digits
    data: builtin:digits
    limit: 40
  - name: shapes
    kind: coco
    data: {shapes}/train.json
    val_data: {shapes}/val.json
tasks:
  - kind: linear
  - kind: finetune
    task: detection
    mode: frozen
    backbones: [r0]
    lr: [0.001]
    epochs: 1
    batch_size: 4
    image_size: 64
    workers: 0
options:
  workers: 0
  runs: {runs}
"""


def test_a_finetune_task_runs_without_extraction_on_its_own_datasets(tmp_path: Path) -> None:
    import timm
    import torch
    from safetensors.torch import save_file

    from bob_cache.data.synth_shapes import write_synth_shapes

    write_synth_shapes(tmp_path / "shapes", n=8, image_size=64, val_fraction=0.5)
    torch.manual_seed(0)
    weights = tmp_path / "r0.safetensors"
    save_file(timm.create_model("test_resnet").state_dict(), str(weights))
    path = tmp_path / "suite.yaml"
    path.write_text(FINETUNE_SUITE.format(weights=weights, shapes=tmp_path / "shapes",
                                          runs=tmp_path / "runs"))  # fmt: skip
    plan = plan_battle(load_battle_suite(path), store=str(tmp_path / "store"),
                       results=str(tmp_path / "results"))  # fmt: skip
    kinds = sorted((j.kind, j.dataset, j.backbone) for j in plan.jobs)
    assert ("finetune", "shapes", "r0") in kinds and ("finetune", "shapes", "r1") not in kinds
    assert not any(dataset == "shapes" and kind != "finetune" for kind, dataset, _ in kinds)
    tune = next(j for j in plan.jobs if j.kind == "finetune")
    assert tune.deps == () and not tune.done
    summary = run(tmp_path, path, threads=1)
    assert not summary.failed, summary.outcomes
    frame = ResultsTable.open(tmp_path / "results").read(stage="finetune")
    assert set(frame["dataset"]) == {"shapes"} and "bbox_AP" in set(frame["metric"])
    assert set(frame.loc[frame["task"] != "", "task"]) == {"finetune-detection"}
    assert list((tmp_path / "runs" / "shapes" / "r0").glob("detection-frozen-*/best.safetensors"))
    assert run(tmp_path, path).outcomes == []  # done: its rows are in the table


def test_a_coco_dataset_needs_val_data_and_task_backbones_must_exist(tmp_path: Path) -> None:
    path = tmp_path / "suite.yaml"
    text = FINETUNE_SUITE.format(weights="w.pt", shapes=tmp_path, runs=tmp_path)
    text = text.replace(f"    val_data: {tmp_path}/val.json\n", "")
    path.write_text(text.replace("backbones: [r0]", "backbones: [r9]"))
    with pytest.raises(Exception, match="(?s)needs val_data.*unknown backbone 'r9'") as e:
        load_battle_suite(path)
    assert "Did you mean 'r0'" in str(e.value) or "r0" in str(e.value)


SEGMENTATION_SUITE = """\
name: dense
backbones:
  - name: test_vit
    label: v0
    random_init: true
    image_size: 64
datasets:
  - name: shapes
    kind: segmentation
    data: {shapes}
tasks:
  - kind: dense
    epochs: 2
    lrs: [0.01]
  - kind: finetune
    task: semantic
    lr: [0.001]
    epochs: 1
    batch_size: 4
    image_size: 64
options:
  workers: 0
  shard_rows: 8
  runs: {runs}
"""


def test_a_dense_task_gets_its_own_grid_extraction_and_semantic_finetune_none(
    tmp_path: Path,
) -> None:
    from bob_cache.data.synth_shapes import write_synth_shapes

    write_synth_shapes(tmp_path / "shapes", n=12, image_size=64, val_fraction=0.34)
    path = tmp_path / "suite.yaml"
    path.write_text(SEGMENTATION_SUITE.format(shapes=tmp_path / "shapes", runs=tmp_path / "runs"))
    plan = plan_battle(load_battle_suite(path), store=str(tmp_path / "store"),
                       results=str(tmp_path / "results"))  # fmt: skip
    jobs = {j.id: j for j in plan.jobs}
    assert sorted(jobs) == ["dense#0/shapes/v0", "extract/shapes/v0+pool=grid",
                            "finetune#1/shapes/v0"]  # no pooled extraction  # fmt: skip
    assert jobs["dense#0/shapes/v0"].deps == ("extract/shapes/v0+pool=grid",)
    assert jobs["finetune#1/shapes/v0"].deps == ()
    summary = run(tmp_path, path, threads=1)
    assert not summary.failed, summary.outcomes
    frame = ResultsTable.open(tmp_path / "results").read()
    dense = frame[frame["method"] == "dense-linear"]
    assert "mIoU" in set(dense["metric"]) and set(dense["stage"]) == {"probe"}
    assert "mIoU" in set(frame[frame["stage"] == "finetune"]["metric"])
    assert run(tmp_path, path).outcomes == []  # both done: their rows are in the table
