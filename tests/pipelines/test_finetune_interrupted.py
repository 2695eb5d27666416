"""A fine-tuning run killed between any two of its writes (or stopped by a full disk) is
finished by the same command with ``--resume``, to the same weights, log, summary and
results rows as an uninterrupted run; no partial file is ever left under a final name."""

from __future__ import annotations

import errno
import json
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from bob_cache.errors import StoreFullError
from bob_cache.finetune import checkpoint as ckpt
from bob_cache.pipelines.finetune import FinetuneConfig, finetune
from bob_cache.stores import feature_set as feature_set_module
from bob_cache.stores.results import ResultsTable
from tests.conftest import write_image_folder

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

KW = dict(
    backbone="test_resnet", task="classification", mode="random-init", image_size=32,
    batch_size=8, epochs=2, steps_per_epoch=1, workers=0, lrs=(1e-3,), quiet=True,
)  # fmt: skip
# Every write of a run, in order, as (crash point, occurrence): the kill lands just after it.
STEPS = [
    ("finetune-config", 0), ("finetune-run-config", 0), ("finetune-best", 0),
    ("finetune-checkpoint", 0), ("finetune-log", 0), ("finetune-best", 1),
    ("finetune-checkpoint", 1), ("finetune-log", 1), ("finetune-record", 0),
    ("finetune-best-copy", 0), ("finetune-summary", 0),
]  # fmt: skip
FAST = {("finetune-checkpoint", 1), ("finetune-summary", 0)}  # the others: -m slow


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, no ``except Exception`` catches it."""


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> str:
    """train/ and val/ folders of three classes, six photos each: a fast validation pass."""
    return str(write_image_folder(tmp_path_factory.mktemp("photos") / "photos"))


def config(root: Path, photos: str, **kw: Any) -> FinetuneConfig:
    return FinetuneConfig(out=str(root / "run"), results=str(root / "results"), train=photos,
                          val=photos, **{**KW, **kw})  # fmt: skip


def outcome(summary: Any, root: Path) -> dict[str, Any]:
    """What an interrupted run must reproduce exactly (timings and row ids aside)."""
    run = Path(summary.runs[0]["run_dir"])
    log = [json.loads(line) for line in (run / ckpt.LOG).read_text().splitlines()]
    rows = ResultsTable.open(root / "results").read()
    rows = rows.drop(columns=["run_id", "time", "versions"]).sort_values(["setting", "metric"])
    weights = load_file(str(root / "run" / ckpt.BEST))
    saved = json.loads((root / "run" / "summary.json").read_text())
    return {
        "val": summary.val,
        "best_epoch": summary.best_epoch,
        "best_lr": summary.best_lr,
        "log": [(r["epoch"], r["val"]) for r in log],
        "rows": rows.reset_index(drop=True).to_dict(orient="records"),
        "weights": {k: v.tolist() for k, v in weights.items()},
        "saved": {k: saved[k] for k in ("val", "best_epoch", "best_lr")},
    }


def leftovers(root: Path) -> list[str]:
    return sorted(p.name for p in root.rglob(".*") if ".tmp" in p.name)


@pytest.fixture(scope="module")
def whole(tmp_path_factory: pytest.TempPathFactory, photos: str) -> dict[str, Any]:
    """An uninterrupted run, and the crash points it passed, in order."""
    root = tmp_path_factory.mktemp("whole")
    seen: list[str] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(feature_set_module, "crash_point", seen.append)
        summary = finetune(config(root, photos))
    return {"outcome": outcome(summary, root), "steps": seen}


def test_the_steps_are_those_the_kill_tests_cover(whole: dict[str, Any]) -> None:
    counted = [(s, whole["steps"][:i].count(s)) for i, s in enumerate(whole["steps"])]
    assert counted == STEPS  # a new write step needs its own kill below


@pytest.mark.parametrize(
    ("step", "after"),
    [pytest.param(s, n, id=f"{s}-{n}", marks=() if (s, n) in FAST else pytest.mark.slow)
     for s, n in STEPS],
)  # fmt: skip
def test_a_run_killed_after_any_write_is_finished_by_resume(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    whole: dict[str, Any],
    photos: str,
    step: str,
    after: int,
) -> None:
    seen = {"n": 0}

    def kill(name: str) -> None:
        if name == step:
            if seen["n"] == after:
                raise Killed(name)
            seen["n"] += 1

    monkeypatch.setattr(feature_set_module, "crash_point", kill)
    with pytest.raises(Killed):
        finetune(config(tmp_path, photos))
    monkeypatch.undo()
    resumed = finetune(config(tmp_path, photos, resume=True))
    assert outcome(resumed, tmp_path) == whole["outcome"]
    assert leftovers(tmp_path) == []


def test_a_full_disk_at_a_checkpoint_keeps_the_last_one_and_resume_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, whole: dict[str, Any], photos: str
) -> None:
    save = torch.save
    calls = {"n": 0}

    def full_disk(obj: object, path: Any, *args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] == 2:  # the second epoch's checkpoint: half written, then ENOSPC
            Path(path).write_bytes(b"half a checkpoint")
            raise OSError(errno.ENOSPC, "No space left on device")
        save(obj, path, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(StoreFullError, match="No space left.*same command with --resume"):
        finetune(config(tmp_path, photos))
    monkeypatch.undo()
    run = tmp_path / "run" / f"{KW['mode']}-lr{KW['lrs'][0]:g}"
    assert torch.load(run / ckpt.CHECKPOINT, weights_only=False)["epoch"] == 1  # the last good
    assert leftovers(tmp_path) == []  # the half-written file was removed
    resumed = finetune(config(tmp_path, photos, resume=True))
    assert outcome(resumed, tmp_path) == whole["outcome"]


@pytest.mark.slow
def test_a_full_disk_at_the_results_rows_is_finished_by_resume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, whole: dict[str, Any], photos: str
) -> None:
    def full_disk(self: Path, data: bytes) -> int:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Path, "write_bytes", full_disk)
    with pytest.raises(OSError):
        finetune(config(tmp_path, photos))
    monkeypatch.undo()
    assert ResultsTable.open(tmp_path / "results").files("part-*.parquet") == []
    resumed = finetune(config(tmp_path, photos, resume=True))
    assert outcome(resumed, tmp_path) == whole["outcome"]


SIGKILLED = """
import json, os, signal, sys
from pathlib import Path
import torch
from bob_cache.pipelines.finetune import FinetuneConfig, finetune
root, photos, kw = Path(sys.argv[1]), sys.argv[2], json.loads(sys.argv[3])
torch.set_num_threads(int(sys.argv[4]))  # the parent's: float sums must add up the same way
save, calls = torch.save, {"n": 0}
def dying(obj, path, *args, **kwargs):
    calls["n"] += 1
    if calls["n"] == 2:  # the second epoch's checkpoint, half written
        Path(path).write_bytes(b"half a checkpoint")
        os.kill(os.getpid(), signal.SIGKILL)
    save(obj, path, *args, **kwargs)
torch.save = dying
finetune(FinetuneConfig(out=str(root / "run"), results=str(root / "results"), train=photos,
                        val=photos, **{**kw, "lrs": tuple(kw["lrs"])}))
"""


@pytest.mark.slow
def test_a_run_sigkilled_while_writing_a_checkpoint_resumes_from_the_last_whole_one(
    tmp_path: Path, whole: dict[str, Any], photos: str
) -> None:
    """A real SIGKILL: no cleanup runs, the half-written temporary file stays behind; the
    resume never reads it, removes it, and ends where an uninterrupted run does."""
    done = subprocess.run(
        [sys.executable, "-c", SIGKILLED, str(tmp_path), photos, json.dumps(KW),
         str(torch.get_num_threads())],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert done.returncode == -signal.SIGKILL, done.stderr
    assert leftovers(tmp_path)  # the torn file, under a temporary name only
    resumed = finetune(config(tmp_path, photos, resume=True))
    assert outcome(resumed, tmp_path) == whole["outcome"]
    assert leftovers(tmp_path) == []
