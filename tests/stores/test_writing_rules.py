"""The store's writing rules under crashes and concurrent writers.

A failure is injected between every two steps of a shard write, a commit, an uncommit and a
repair (``crash_point`` raises a BaseException, as a kill stops a process); rerunning the
same operation must leave arrays identical to an uninterrupted run. Concurrent creators run
in separate processes released at the same instant.
"""

from __future__ import annotations

import multiprocessing
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from bob_cache.errors import StaleIndexError
from bob_cache.stores import feature_set as feature_set_module
from bob_cache.stores import open_store, verify_store
from bob_cache.stores.feature_set import COMMITS, ROW_ARRAYS, WRITE_STEPS
from bob_cache.stores.location import open_zarr_store, put_exclusive

from .test_contract import LAYOUT, N, create, put, request_for

ARRAYS = ("features", *ROW_ARRAYS)


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, no ``except Exception`` catches it."""


def crash_at(monkeypatch: pytest.MonkeyPatch, step: str, *, after: int = 0) -> None:
    """Fail at the ``after``-th (0-based) time ``step`` is reached."""
    seen = {"n": 0}

    def point(name: str) -> None:
        if name == step:
            if seen["n"] == after:
                raise Killed(step)
            seen["n"] += 1

    monkeypatch.setattr(feature_set_module, "crash_point", point)


def finished(path: Path) -> Any:
    fs = create(open_store(path, mode="a"))
    for shard in range(3):
        put(fs, shard)
    fs.finalize()
    return fs


def assert_same(a: Any, b: Any) -> None:
    assert a.complete and b.complete
    for name in ARRAYS:
        np.testing.assert_array_equal(a.array(name)[:], b.array(name)[:], err_msg=name)


@pytest.fixture
def reference(tmp_path: Path) -> Any:
    return finished(tmp_path / "reference")


@pytest.mark.parametrize("step", WRITE_STEPS)
def test_a_kill_at_any_write_step_is_repaired_by_writing_again(
    tmp_path: Path, reference: Any, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    fs = create(open_store(tmp_path / "store", mode="a"))
    put(fs, 0)
    crash_at(monkeypatch, step)
    with pytest.raises(Killed):
        put(fs, 1)
    monkeypatch.undo()
    again = create(open_store(tmp_path / "store", mode="a"))  # the rerun, a new process
    assert again.missing_shards() == ([2] if step == "commit" else [1, 2])
    assert not again.complete
    for shard in again.missing_shards():
        put(again, shard)
    assert again.finalize()
    assert_same(again, reference)


def test_a_truncated_object_of_an_uncommitted_shard_is_replaced(
    tmp_path: Path, reference: Any
) -> None:
    fs = create(open_store(tmp_path / "store", mode="a"))
    put(fs, 0)
    key = fs.object_keys(1)["features"]
    sync(fs.group.store.set(key, default_buffer_prototype().buffer.from_bytes(b"\x00trunc")))
    for shard in (1, 2):
        put(fs, shard)
    assert fs.finalize()
    assert_same(fs, reference)


@pytest.mark.parametrize(("step", "after"), [("uncommit", 0), ("uncommit", 1), ("delete", 0),
                                             ("delete", 1)])  # fmt: skip
def test_a_kill_during_repair_is_repaired_by_rerunning_it(
    tmp_path: Path, reference: Any, monkeypatch: pytest.MonkeyPatch, step: str, after: int
) -> None:
    fs = finished(tmp_path / "store")
    store = fs.group.store
    garbage = default_buffer_prototype().buffer.from_bytes(b"garbage")
    sync(store.set(fs.object_keys(0)["features"], garbage))
    sync(store.delete(fs.object_keys(2)["labels"]))
    crash_at(monkeypatch, step, after=after)
    with pytest.raises(Killed):
        verify_store(open_store(tmp_path / "store", mode="a"), repair=True)
    monkeypatch.undo()
    assert not create(open_store(tmp_path / "store", mode="a")).complete or step == "uncommit"
    reports = verify_store(open_store(tmp_path / "store", mode="a"), repair=True)  # rerun
    assert all(r.repaired or r.ok for r in reports)
    again = create(open_store(tmp_path / "store", mode="a"))
    assert again.missing_shards() == [0, 2]
    for shard in again.missing_shards():
        put(again, shard)
    assert again.finalize()
    assert_same(again, reference)
    assert all(r.ok for r in verify_store(open_store(tmp_path / "store")))


def test_verify_flags_a_committed_shard_whose_labels_object_is_missing(tmp_path: Path) -> None:
    fs = finished(tmp_path / "store")
    sync(fs.group.store.delete(fs.object_keys(1)["labels"]))
    (report,) = verify_store(open_store(tmp_path / "store"))
    assert report.damaged_shards == [1]
    assert "stored object of labels is missing" in report.problems[0]


def test_completeness_is_derived_and_attributes_are_never_rewritten(tmp_path: Path) -> None:
    store = open_store(tmp_path / "store", mode="a")
    fs = create(store)
    meta = tmp_path / "store" / fs.path / "zarr.json"
    before = meta.read_bytes()
    for shard in range(3):
        put(fs, shard, errors=["", "bad", "", ""] if shard == 1 else None)
    assert fs.finalize() and fs.complete and fs.n_invalid == 1
    fs.uncommit([1])
    assert not fs.complete and fs.missing_shards() == [1]
    assert meta.read_bytes() == before


def test_recomputing_a_shard_gives_a_new_generation_and_stales_its_index(tmp_path: Path) -> None:
    from bob_cache.stores.index_store import IndexRecord, check_index

    fs = finished(tmp_path / "store")
    old = fs.generations()
    record = IndexRecord(
        name="flat", kind="flat", metric="l2", params={}, feature_key=fs.key,
        feature_set=fs.path, feature_set_created=fs.attrs["created"], shards=[0, 1, 2],
        rows=N, dim=fs.dim, generations={str(k): v for k, v in old.items()},
    )  # fmt: skip
    assert check_index(fs, record) == []
    fs.uncommit([1])
    put(fs, 1)  # the same numbers, recomputed
    assert fs.generations()[1] != old[1] and fs.generations()[0] == old[0]
    with pytest.raises(StaleIndexError, match=r"shards \[1\] were uncommitted or recomputed"):
        check_index(fs, record)


def test_a_committed_shard_is_never_rewritten(tmp_path: Path) -> None:
    fs = finished(tmp_path / "store")
    record = fs.group[COMMITS][0]
    assert put(fs, 0) is False and fs.group[COMMITS][0] == record


def test_exclusive_put_creates_once(tmp_path: Path) -> None:
    for store in (open_zarr_store(tmp_path / "s", mode="a"), open_zarr_store("memory://x")):
        assert put_exclusive(store, "a/zarr.json", b"first")
        assert not put_exclusive(store, "a/zarr.json", b"second")
        got = sync(store.get("a/zarr.json", default_buffer_prototype()))
        assert got.to_bytes() == b"first"


def _race_create(path: str, shard: int, barrier: Any, out: Any) -> None:
    from tests.stores.test_contract import create as create_set
    from tests.stores.test_contract import put as put_shard

    barrier.wait()
    fs = create_set(open_store(path, mode="a"))
    put_shard(fs, shard)
    out.put((shard, fs.attrs["created"], fs.attrs.get("command")))


def test_writers_started_at_the_same_instant_share_one_set(tmp_path: Path) -> None:
    ctx = multiprocessing.get_context("spawn")
    n = LAYOUT.n_shards(N)
    barrier, out = ctx.Barrier(n), ctx.Queue()
    path = str(tmp_path / "store")
    procs = [ctx.Process(target=_race_create, args=(path, s, barrier, out)) for s in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0] * n
    seen = [out.get(timeout=5) for _ in range(n)]
    fs = open_store(path).get(request_for().path)
    assert {created for _, created, _ in seen} == {fs.attrs["created"]}  # one create won
    assert fs.complete and sorted(s for s, _, _ in seen) == list(range(n))


def test_a_kill_before_consolidation_is_repaired_by_finalizing_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import warnings

    import xarray as xr
    import zarr

    fs = create(open_store(tmp_path / "store", mode="a"))
    for shard in range(3):
        put(fs, shard)

    def killed(*args: Any, **kwargs: Any) -> None:
        raise Killed("consolidate")

    monkeypatch.setattr(zarr, "consolidate_metadata", killed)
    with pytest.raises(Killed):
        fs.finalize()
    monkeypatch.undo()
    assert fs.complete  # every shard is committed; only the metadata copy is missing
    assert fs.finalize()  # what rerunning the extraction does
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = xr.open_zarr(tmp_path / "store", group=fs.path)
    assert ds["features"].shape == (N, fs.dim)
