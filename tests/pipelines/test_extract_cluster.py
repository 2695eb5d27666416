"""Extraction on Dask: a LocalCluster fills one feature set equal to a single-process run, a
worker killed (SIGKILL) mid-extraction costs only its shard, and bad options fail clearly."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from pathlib import Path

import pytest

from bob_cache.config import ExtractConfig
from bob_cache.errors import SpecError
from bob_cache.pipelines.cluster import SchedulerError
from bob_cache.pipelines.extract import extract
from bob_cache.stores import open_store
from tests.pipelines.test_many_writers import OPTIONS
from tests.pipelines.test_many_writers import assert_same as same_set

DIGITS = {"data": "builtin:digits", "split": "train", "limit": 320}  # 20 shards of 16


def run(store: Path, **kwargs: object):
    return extract(ExtractConfig(store=str(store), **{**OPTIONS, **DIGITS, **kwargs}))


def assert_same(a: Path, b: Path) -> None:
    same_set(a, b)  # complete, same path, every row array equal
    assert open_store(b).feature_sets()[0].n_rows == 320


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("reference") / "store"
    run(store)
    return store


@pytest.mark.slow
def test_a_worker_killed_mid_extraction_costs_only_its_shard(reference: Path, tmp_path: Path):
    import dask
    from distributed import LocalCluster

    with dask.config.set({"distributed.worker.daemon": False}):
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                               dashboard_address=":0")  # fmt: skip
    store = tmp_path / "store"
    try:
        done: dict[str, object] = {}
        worker = threading.Thread(
            target=lambda: done.setdefault(
                "summary", run(store, scheduler=cluster.scheduler_address, parts=2, batch_size=4)
            )
        )
        worker.start()
        pid = next(iter(cluster.workers.values())).process.process.pid
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not _committed(store):
            time.sleep(0.05)
        assert _committed(store), "no shard was committed in time"
        os.kill(pid, signal.SIGKILL)  # mid-part: its other shards are still to do
        killed_at = _committed(store)
        worker.join(timeout=300)
        assert not worker.is_alive()
    finally:
        cluster.close()
    assert killed_at < 20  # the kill came before the set was finished
    assert done["summary"].rows_computed >= 320 - 16 * killed_at
    assert_same(reference, store)


def _committed(store: Path) -> int:
    try:  # the store or the set may not exist yet, or be half-made
        sets = open_store(store).feature_sets()
        return sum(1 for fs in sets for r in fs.commits() if r is not None)
    except Exception:
        return 0


def test_cluster_options_are_checked_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import bob_cache.pipelines.cluster as cluster

    monkeypatch.setattr(cluster, "CONNECT_TIMEOUT_S", 2)  # the wait is the product's setting
    with pytest.raises(SpecError, match="--part cannot be combined with --scheduler"):
        ExtractConfig(data="builtin:digits", backbone="x", local_cluster=2, part=(0, 2))
    with pytest.raises(SpecError, match="--local-cluster must be at least 1"):
        ExtractConfig(data="builtin:digits", backbone="x", local_cluster=0)
    with pytest.raises(SpecError, match="not both"):
        ExtractConfig(data="builtin:digits", backbone="x", local_cluster=2, scheduler="tcp://x:1")
    started = time.monotonic()
    with pytest.raises(SchedulerError, match=r"No Dask scheduler answers at 'tcp://127.0.0.1:9'"):
        run(tmp_path / "store", scheduler="tcp://127.0.0.1:9")
    assert time.monotonic() - started < 60
    assert not (tmp_path / "store").exists()


@pytest.mark.slow
def test_cli_local_cluster_fills_the_set_a_single_process_would(
    cli, reference: Path, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    args = ["extract", "--data", "builtin:digits", "--split", "train", "--limit", "320",
            "--backbone", "test_resnet", "--random-init", "--image-size", "32", "--workers", "0",
            "--batch-size", "8", "--shard-rows", "16", "--chunk-rows", "8", "--store", store,
            "--local-cluster", "2", "--json"]  # fmt: skip
    result = cli(*args)  # two worker processes fill one set, equal to one process's
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["rows_computed"] == 320 and summary["shards_computed"] == 20
    assert_same(reference, store)
    again = cli(*args)  # every shard committed: nothing to compute
    assert again.exit_code == 0 and json.loads(again.stdout)["rows_computed"] == 0
    bad = cli(*args[:-3], "--local-cluster", "2", "--part", "0/2")
    assert bad.exit_code == 1 and "--part cannot be combined" in bad.output


def test_a_part_that_fails_for_good_is_computed_by_the_final_pass(
    reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog
) -> None:
    from distributed import LocalCluster

    import bob_cache.pipelines.extract_cluster as cluster_module

    real = cluster_module._run_part

    def flaky(config: ExtractConfig, threads: int):
        if config.part == (0, 2):
            raise RuntimeError("disk gone on this worker")
        return real(config, threads)

    monkeypatch.setattr(cluster_module, "_run_part", flaky)  # an in-process worker sees it
    with LocalCluster(n_workers=1, processes=False, dashboard_address=":0") as cluster:
        summary = run(tmp_path / "store", scheduler=cluster.scheduler_address, parts=2)
    assert summary.rows_computed == 320 and summary.shards_computed == 20  # 10 + 10 here
    assert_same(reference, tmp_path / "store")
    (record,) = [r for r in caplog.records if r.name == "bob_cache.pipelines.extract_cluster"]
    assert record.levelname == "WARNING"  # the user learns which part failed, and why
    assert "part 0/2 failed on the cluster (RuntimeError: disk gone on this worker)" in (
        record.getMessage()
    )


def test_local_cluster_workers_get_a_torch_friendly_environment(monkeypatch) -> None:
    import os

    from bob_cache.pipelines.cluster import dask_client

    # what an earlier default Dask cluster leaves in this process's environment
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "65536")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with dask_client(scheduler=None, workers=1, gpus=0) as client:
        # os.getenv ships by reference (a worker process cannot import a test module)
        omp = list(client.run(os.getenv, "OMP_NUM_THREADS").values())
        trim = list(client.run(os.getenv, "MALLOC_TRIM_THRESHOLD_").values())
    assert trim == [None]  # Dask's default: a fixed mmap threshold
    assert omp == [str(os.cpu_count() or 1)]  # not Dask's 1
    assert os.environ["MALLOC_TRIM_THRESHOLD_"] == "65536"  # the caller's own is given back


def test_loaders_fork_where_the_process_would_spawn_them(monkeypatch) -> None:
    import multiprocessing

    from bob_cache.data.images import loader_context

    assert loader_context(0) is None
    monkeypatch.setattr(multiprocessing, "get_start_method", lambda allow_none=False: "spawn")
    assert loader_context(2) == "fork"
    monkeypatch.setattr(multiprocessing, "get_start_method", lambda allow_none=False: "fork")
    assert loader_context(2) is None


@pytest.mark.parametrize("env", [{}, {"OMP_NUM_THREADS": "1"}, {"MKL_NUM_THREADS": "1"}])
def test_the_caller_knows_torch_s_thread_count_without_loading_torch(env: dict) -> None:
    """Parts run at the caller's torch thread count (bit-equal features); the caller of a
    cluster run does not import torch, so it must get the count torch would start with."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "from bob_cache.pipelines import get_stage\n"
        "from bob_cache.pipelines.extract_cluster import _torch_threads\n"
        "get_stage('extract')\n"
        "n = _torch_threads()\n"
        "assert 'torch' not in sys.modules, 'the cluster caller loaded torch'\n"
        "import torch\n"
        "print(n, torch.get_num_threads())\n"
    )
    variables = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")
    environ = {k: v for k, v in os.environ.items() if k not in variables} | env
    done = subprocess.run(
        [sys.executable, "-c", code], env=environ, capture_output=True, text=True, check=True
    )
    ours, torch_s = done.stdout.split()
    assert ours == torch_s, (env, ours, torch_s)
