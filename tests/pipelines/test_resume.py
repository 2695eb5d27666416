"""Crash safety: SIGKILL mid-run, disk full mid-run; both resume to the uninterrupted result.

These run the real CLI in subprocesses on the built-in digits with a tiny random-init model,
small shards, and compare every array of the resumed store with an uninterrupted run.
"""

from __future__ import annotations

import json
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from bob_cache.stores import open_store

ARGS = [
    "extract", "--data", "builtin:digits", "--split", "train", "--backbone", "test_resnet",
    "--random-init", "--image-size", "32", "--batch-size", "16", "--shard-rows", "64",
    "--chunk-rows", "32", "--workers", "0", "--quiet",
]  # fmt: skip
N_ROWS, SHARD_ROWS = 1078, 64
N_SHARDS = -(-N_ROWS // SHARD_ROWS)


def cmd(store: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "bob_cache.cli", *ARGS, "--store", str(store), *extra]


def committed(store: Path) -> int:
    # zarr writes each object to a temporary `*.partial` file and renames it: count records only
    return sum(p.name.isdigit() for p in store.glob("digits/train/*/*/shard_commit/c/*"))


def assert_same_arrays(a: Path, b: Path) -> None:
    (fa,), (fb,) = open_store(a).feature_sets(), open_store(b).feature_sets()
    assert fa.path == fb.path and fa.complete and fb.complete
    for name in ("features", "labels", "ids", "digest", "valid", "error"):
        np.testing.assert_array_equal(fa.array(name)[:], fb.array(name)[:], err_msg=name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An uninterrupted run with the same options."""
    store = tmp_path_factory.mktemp("reference") / "store"
    subprocess.run(cmd(store), check=True, capture_output=True, timeout=300)
    return store


@pytest.mark.slow
def test_sigkill_then_rerun_recomputes_only_missing_shards(reference: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    proc = subprocess.Popen(cmd(store), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 240
    while committed(store) < 3 and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    done = committed(store)
    assert 3 <= done < N_SHARDS, f"killed too late ({done} of {N_SHARDS} shards committed)"

    resumed = subprocess.run([*cmd(store), "--json"], capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    summary = json.loads(resumed.stdout)
    assert summary["shards_skipped"] == done
    assert summary["rows_computed"] == N_ROWS - done * SHARD_ROWS  # the last shard is partial
    assert_same_arrays(reference, store)


def _namespaces_work() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = "d=$(mktemp -d) && mount -t tmpfs -o size=64k tmpfs $d && umount $d"
    try:
        ok = subprocess.run(
            ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", probe],
            capture_output=True,
            timeout=20,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return ok.returncode == 0


def _disk_usage(path: Path) -> int:
    return int(
        subprocess.run(
            ["du", "-sk", str(path)], capture_output=True, text=True, check=True
        ).stdout.split()[0]
    )


@pytest.mark.slow
@pytest.mark.skipif(
    not _namespaces_work(), reason="needs unprivileged user+mount namespaces (unshare)"
)
def test_disk_full_stops_cleanly_and_resumes_after_space_is_freed(
    reference: Path, tmp_path: Path
) -> None:
    """A real ENOSPC: the store sits on a size-limited tmpfs in a private mount namespace."""
    mount, after_full, final = tmp_path / "mnt", tmp_path / "after_full", tmp_path / "final"
    mount.mkdir()
    size_kb = max(64, _disk_usage(reference) // 2)
    script = f"""
        mount -t tmpfs -o size={size_kb}k tmpfs {mount}
        {" ".join(cmd(mount / "store"))} > {tmp_path}/full.out 2> {tmp_path}/full.err
        echo $? > {tmp_path}/full.rc
        cp -a {mount}/store {after_full}
        mount -o remount,size=64m {mount}
        {" ".join(cmd(mount / "store", "--json"))} > {tmp_path}/resume.out 2> {tmp_path}/resume.err
        echo $? > {tmp_path}/resume.rc
        cp -a {mount}/store {final}
    """
    subprocess.run(
        ["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", script],
        check=True,
        timeout=600,
    )
    message = (tmp_path / "full.err").read_text()
    assert (tmp_path / "full.rc").read_text().strip() == "1", message
    assert "ran out of space" in message and "rerun the same command" in message
    assert "Traceback" not in message
    kept = committed(after_full)
    assert 1 <= kept < N_SHARDS
    assert (tmp_path / "resume.rc").read_text().strip() == "0", (
        tmp_path / "resume.err"
    ).read_text()
    assert json.loads((tmp_path / "resume.out").read_text())["shards_skipped"] == kept
    assert_same_arrays(reference, final)


@pytest.mark.slow
def test_write_failure_from_a_file_size_limit_stops_cleanly_and_resumes(
    reference: Path, tmp_path: Path
) -> None:
    """The same recovery without namespaces: a file-size rlimit fails shard writes (EFBIG)."""
    store = tmp_path / "store"
    # The root's zarr.json (consolidated metadata) is written only once every shard is in.
    metadata = max(p.stat().st_size for p in reference.rglob("*/zarr.json"))
    shards = min(p.stat().st_size for p in reference.rglob("features/c/*/*"))
    limit = metadata + 1024  # every metadata file fits, no feature shard does
    assert limit < shards

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    failed = subprocess.run(
        cmd(store), capture_output=True, text=True, timeout=300, preexec_fn=small_files
    )
    assert failed.returncode == 1, failed.stderr
    assert "ran out of space" in failed.stderr and "Traceback" not in failed.stderr
    assert committed(store) == 0
    resumed = subprocess.run(cmd(store), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_arrays(reference, store)


OPTIONS = {
    "backbone": "test_resnet", "random_init": True, "image_size": 32, "workers": 0,
    "batch_size": 4, "shard_rows": 4, "chunk_rows": 2, "quiet": True, "split": "train",
}  # fmt: skip


class _Killed(BaseException):
    """Stands for SIGKILL between two shard commits."""


@pytest.fixture
def interrupted(image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A set of the image folder's train split with two of its shards committed."""
    from bob_cache.stores import feature_set as feature_set_module

    commits = {"n": 0}

    def crash(name: str) -> None:
        commits["n"] += name == "commit"
        if commits["n"] == 2:
            raise _Killed(name)

    monkeypatch.setattr(feature_set_module, "crash_point", crash)
    with pytest.raises(_Killed):
        _extract(image_folder, tmp_path / "store")
    monkeypatch.undo()
    (fs,) = open_store(tmp_path / "store").feature_sets()
    assert fs.committed_shards() == [0, 1]
    return tmp_path / "store"


def _extract(image_folder: Path, store: Path, **kwargs: object) -> object:
    from bob_cache.config import ExtractConfig
    from bob_cache.pipelines.extract import extract

    return extract(ExtractConfig(store=str(store), data=str(image_folder), **OPTIONS, **kwargs))


@pytest.mark.parametrize(
    "failure",
    [
        PermissionError(13, "Permission denied"),
        TimeoutError("The read operation timed out"),
        OSError("403 Forbidden: AccessDenied"),
    ],
    ids=["permission", "timeout", "forbidden"],
)
def test_a_failed_read_is_not_taken_for_changed_images(
    image_folder: Path, interrupted: Path, monkeypatch: pytest.MonkeyPatch, failure: Exception
) -> None:
    from bob_cache.data.folder import FolderSource
    from bob_cache.errors import DataChangedError, DataSourceError

    (fs,) = open_store(interrupted).feature_sets()
    victim = str(fs.array("ids")[1])  # a committed row
    real = FolderSource.read_bytes

    def read_bytes(self: FolderSource, sample: object) -> bytes | None:
        if sample.id == victim:  # type: ignore[attr-defined]
            raise failure
        return real(self, sample)  # type: ignore[arg-type]

    monkeypatch.setattr(FolderSource, "read_bytes", read_bytes)
    with pytest.raises(DataSourceError) as caught:
        _extract(image_folder, interrupted)
    message = str(caught.value)
    assert not isinstance(caught.value, DataChangedError)
    assert str(image_folder / victim) in message and type(failure).__name__ in message
    assert str(failure) in message
    assert "Nothing was written" in message and "rerun the same command" in message
    assert "--overwrite" not in message and "changed since" not in message
    (fs,) = open_store(interrupted).feature_sets()
    assert fs.committed_shards() == [0, 1]  # nothing written
    monkeypatch.undo()  # readable again: the same command resumes
    done = _extract(image_folder, interrupted)
    assert done.rows_computed == 18 - 8  # type: ignore[attr-defined]


def test_other_bytes_are_still_changed_images(image_folder: Path, interrupted: Path) -> None:
    from bob_cache.errors import DataChangedError

    (fs,) = open_store(interrupted).feature_sets()
    victim = image_folder / str(fs.array("ids")[1])
    data = victim.read_bytes()
    victim.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))  # other bytes, the same size
    with pytest.raises(DataChangedError, match=r"1 image\(s\).*changed.*--overwrite"):
        _extract(image_folder, interrupted)
    (fs,) = open_store(interrupted).feature_sets()
    assert fs.committed_shards() == [0, 1]
