"""Sharded IVF builds (``index build --shards N``): equal to a single build list by list, on a
Dask LocalCluster or in this process; a SIGKILLed worker or a kill at any write step is
finished by the same command; updates add new parts; bad options fail with the fix."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from bob_cache.errors import SpecError
from bob_cache.pipelines.index import IndexConfig, build_index
from bob_cache.pipelines.query import QueryConfig, Searcher
from bob_cache.retrieval import faiss_ops, ivf_lists
from bob_cache.retrieval.auto import parse_memory, resolve_kind
from bob_cache.stores import open_store
from bob_cache.stores.index_parts import (
    load_merged_in_memory,
    part_commits,
    part_numbers,
    part_reader,
)
from bob_cache.stores.index_store import (
    INDEX_GROUP,
    check_index,
    get_record,
    index_reader,
    list_indexes,
)
from tests.conftest import blobs, write_feature_sets
from tests.pipelines.test_index import partial_set

PATH = "toy/train/model.tag/feat00000001"
N_ROWS = 1500  # 12 shards of 128; three rows unreadable


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs."""


def make_store(path: Path, n: int = N_ROWS) -> Path:
    x, y = blobs(n, classes=8, dim=16, spread=2.0)
    write_feature_sets(
        path, {"train": (x, y)}, shard_rows=128, unreadable={"train": [5, 700, 1400]}
    )
    return path


def cfg(store: Path, **kw: Any) -> IndexConfig:
    base = {"kind": "ivf", "target_recall": 0.9}
    return IndexConfig(store=str(store), dataset="toy", backbone="model", quiet=True,
                       **{**base, **kw})  # fmt: skip


def load(store: Path, name: str | None = None) -> Any:
    """The stored index ``name`` in memory (a sharded one merged from its parts)."""
    fs = open_store(store).get(PATH)
    record = get_record(fs, name)
    if record.layout == "sharded":
        return load_merged_in_memory(fs, record)
    return faiss_ops.read_index(index_reader(fs, record))


def lists(index: Any) -> list[tuple[np.ndarray, bytes]]:
    """Each inverted list's ids (in stored order) and codes."""
    import faiss

    invlists = faiss.extract_index_ivf(index).invlists
    out = []
    for i in range(invlists.nlist):
        n = invlists.list_size(i)
        ids = faiss.rev_swig_ptr(invlists.get_ids(i), n).copy()
        codes = bytes(faiss.rev_swig_ptr(invlists.get_codes(i), n * invlists.code_size))
        out.append((ids, codes))
    return out


def assert_same_index(a: Any, b: Any) -> None:
    """Same quantizer, same lists (ids in order, codes), same answers."""
    import faiss

    qa, qb = faiss.extract_index_ivf(a).quantizer, faiss.extract_index_ivf(b).quantizer
    assert np.array_equal(qa.reconstruct_n(0, qa.ntotal), qb.reconstruct_n(0, qb.ntotal))
    la, lb = lists(a), lists(b)
    assert [len(i) for i, _ in la] == [len(i) for i, _ in lb]
    for (ia, ca), (ib, cb) in zip(la, lb, strict=True):
        assert np.array_equal(ia, ib) and ca == cb
    x, _ = blobs(50, classes=8, dim=16, spread=2.0, seed=7)
    q = faiss_ops.prepare(x, "cosine")
    for index in (a, b):
        faiss.extract_index_ivf(index).nprobe = 4
    assert np.array_equal(a.search(q, 10)[1], b.search(q, 10)[1])


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Any]:
    """A store with a single-process (one piece) ivf index and a sharded one."""
    store = make_store(tmp_path_factory.mktemp("ref") / "s")
    single = build_index(cfg(store, name="one"))
    sharded = build_index(cfg(store, name="parts", shards=3))
    assert single.record["search_value"] == sharded.record["search_value"]
    return store, load(store, "one")


def test_a_sharded_build_equals_a_single_build(reference: tuple[Path, Any]) -> None:
    store, single = reference
    fs = open_store(store).get(PATH)
    one, parts = get_record(fs, "one"), get_record(fs, "parts")
    assert parts.layout == "sharded" and one.layout == "single"
    assert parts.rows == one.rows == N_ROWS - 3 and parts.shards == one.shards
    assert parts.recall == one.recall and parts.recall_queries == one.recall_queries == 150
    assert [p["plan"]["shards"] for p in parts.parts] == [[0, 1, 2, 3], [4, 5, 6, 7],
                                                          [8, 9, 10, 11], []]  # fmt: skip
    assert len(parts.parts[-1]["plan"]["rows"]) == 150  # the held-out rows, added last
    assert sum(p["rows"] for p in parts.parts) == parts.rows
    assert_same_index(single, load(store, "parts"))
    assert parts.rerank == one.rerank  # tuned per re-ranking depth the same way
    for part in part_numbers(parts):  # stored as lists alone: `trained` holds the quantizer
        stored = faiss_ops.read_index(part_reader(fs, parts, part), ivf_lists.read_flags())
        assert ivf_lists.is_lists_only(stored), part


def test_a_two_worker_local_cluster_builds_the_same_index(
    reference: tuple[Path, Any], tmp_path: Path
) -> None:
    store = make_store(tmp_path / "s")
    summary = build_index(cfg(store, shards=3, local_cluster=2))
    assert summary.action == "built" and summary.record["layout"] == "sharded"
    assert_same_index(reference[1], load(store))


def _committed_parts(store: Path) -> int:
    try:
        fs = open_store(store).get(PATH)
        return sum(len(part_commits(fs, key)) for key, _ in fs.group[INDEX_GROUP].groups())
    except Exception:  # nothing written yet
        return 0


@pytest.mark.slow
def test_a_worker_killed_mid_build_leaves_the_same_index(
    tmp_path: Path, reference: tuple[Path, Any]
) -> None:
    import dask
    from distributed import LocalCluster

    store = make_store(tmp_path / "s")
    with dask.config.set({"distributed.worker.daemon": False}):
        cluster = LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                               dashboard_address=":0")  # fmt: skip
    try:
        done: dict[str, Any] = {}
        config = cfg(store, shards=12, scheduler=cluster.scheduler_address)
        thread = threading.Thread(target=lambda: done.setdefault("s", build_index(config)))
        thread.start()
        pid = next(iter(cluster.workers.values())).process.process.pid
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not _committed_parts(store):
            time.sleep(0.01)
        os.kill(pid, signal.SIGKILL)
        killed_at = _committed_parts(store)
        thread.join(timeout=300)
    finally:
        cluster.close()
    assert 0 < killed_at < 13  # the kill came mid-build
    assert done["s"].action == "built"
    assert_same_index(reference[1], load(store))
    assert build_index(replace(config, scheduler=None)).action == "exists"


SLOW = pytest.mark.slow  # the other steps of the same kind run in the fast suite
BUILD_STEPS = [
    pytest.param("index-version", 1, marks=SLOW), ("index-trained-clear", 1),
    pytest.param("index-trained-data", 1, marks=SLOW), ("index-trained-commit", 1),
    pytest.param("index-part-clear", 2, marks=SLOW), ("index-part-data", 2),
    pytest.param("index-part-commit", 2, marks=SLOW), ("index-record", 1),
]  # fmt: skip


@pytest.mark.parametrize(("step", "nth"), BUILD_STEPS)
def test_a_build_killed_at_any_step_is_finished_by_the_same_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reference: tuple[Path, Any],
    step: str, nth: int,
) -> None:  # fmt: skip
    """Killed at a step (a part step at its second part): no half-written version is taken
    for an index; the same command reuses what was committed and ends equal to a single
    build, with no leftovers."""
    from bob_cache.stores import feature_set as feature_set_module

    store = make_store(tmp_path / "s")
    seen: list[str] = []

    def kill(name: str) -> None:
        seen.append(name)
        if name == step and seen.count(step) == nth:
            raise _Killed(name)

    with monkeypatch.context() as mp, pytest.raises(_Killed):
        mp.setattr(feature_set_module, "crash_point", kill)
        build_index(cfg(store, shards=3))
    fs = open_store(store).get(PATH)
    assert len(list_indexes(fs)) == (step == "index-record")  # complete only once recorded
    if step != "index-record":  # no index yet: queries search the rows exactly
        assert Searcher.open(QueryConfig(str(store), "toy", "model")).exact
    seen.clear()
    monkeypatch.setattr(feature_set_module, "crash_point", seen.append)
    again = build_index(cfg(store, shards=3))
    assert again.action == ("exists" if step == "index-record" else "built")
    retrained = "index-trained-commit" in seen
    assert retrained == (step in ("index-version", "index-trained-clear", "index-trained-data"))
    if step.startswith("index-part"):  # the parts committed before the kill are kept
        assert seen.count("index-part-commit") == 4 - 1 - (step == "index-part-commit")
    fs = open_store(store).get(PATH)
    [final] = list_indexes(fs)
    assert [k for k, _ in fs.group[INDEX_GROUP].groups()] == [final.key]
    assert_same_index(reference[1], load(store))


def test_a_forced_rebuild_killed_before_cleanup_keeps_one_index(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bob_cache.stores import feature_set as feature_set_module

    store = make_store(tmp_path / "s")
    build_index(cfg(store, shards=2))

    def kill(name: str) -> None:
        if name == "index-cleanup":
            raise _Killed(name)

    with monkeypatch.context() as mp, pytest.raises(_Killed):
        mp.setattr(feature_set_module, "crash_point", kill)
        build_index(cfg(store, shards=2, force=True))
    fs = open_store(store).get(PATH)
    assert len(list_indexes(fs)) == 1  # the newest of the name
    assert build_index(cfg(store, shards=2)).action == "exists"  # and leftovers pruned
    fs = open_store(store).get(PATH)
    assert [k for k, _ in fs.group[INDEX_GROUP].groups()] == [list_indexes(fs)[0].key]


def _grow(store: Path, shards: list[int]) -> None:
    x, y = blobs(3000, classes=8, dim=16, spread=2.0)
    partial_set(store, x, y, shards=shards)


def test_update_adds_new_shards_as_new_parts_like_a_single_update(tmp_path: Path) -> None:
    """Built in parts on 20 shards, then 27 more committed: pending is reported, and the
    update adds them as new parts (the single build's update, list by list)."""
    one, parts = tmp_path / "one", tmp_path / "parts"
    for store in (one, parts):
        _grow(store, list(range(20)))
    build_index(cfg(one))
    built = build_index(cfg(parts, shards=2))
    assert len(built.record["parts"]) == 3
    for store in (one, parts):
        _grow(store, list(range(20, 47)))
    fs = open_store(parts).get(PATH)
    assert check_index(fs, get_record(fs, "ivf")) == list(range(20, 47))  # query/serve say so
    a = build_index(cfg(one, update=True))
    b = build_index(cfg(parts, update=True, shards=3))
    assert a.rows_added == b.rows_added == 27 * 63 - 8  # the last shard holds 56 rows
    assert b.record["search_value"] == a.record["search_value"]
    assert [p["part"] for p in b.record["parts"]] == list(range(7))  # 3 + 3 ranges + held
    assert_same_index(load(one), load(parts))
    assert build_index(cfg(parts, update=True)).action == "up-to-date"


@pytest.mark.parametrize(
    "step", ["index-part-data", pytest.param("index-part-commit", marks=SLOW), "index-record"]
)
def test_an_update_killed_at_any_step_is_finished_by_the_same_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    from bob_cache.stores import feature_set as feature_set_module

    store = tmp_path / "s"
    _grow(store, list(range(20)))
    build_index(cfg(store, shards=2))
    _grow(store, list(range(20, 47)))

    def kill(name: str) -> None:
        if name == step:
            raise _Killed(name)

    with monkeypatch.context() as mp, pytest.raises(_Killed):
        mp.setattr(feature_set_module, "crash_point", kill)
        build_index(cfg(store, update=True, shards=3))
    fs = open_store(store).get(PATH)
    [record] = list_indexes(fs)
    if step != "index-record":  # the old record still stands, whole, and says what is pending
        assert record.rows == 20 * 63 and load(store).ntotal == record.rows
    again = build_index(cfg(store, update=True, shards=3))
    assert again.action == ("up-to-date" if step == "index-record" else "updated")
    fs = open_store(store).get(PATH)
    [final] = list_indexes(fs)
    assert final.rows == 47 * 63 - 8 == load(store).ntotal
    assert sorted(part_commits(fs, final.key)) == [p["part"] for p in final.parts]


def test_bad_sharded_options_fail_with_the_fix(tmp_path: Path) -> None:
    store = make_store(tmp_path / "s")
    with pytest.raises(SpecError, match=r"more parts than the 12 committed shards.*--shards 12"):
        build_index(cfg(store, shards=13))
    for kind in ("flat", "hnsw"):
        with pytest.raises(SpecError, match=f"--kind {kind} has no inverted lists.*ivfpq"):
            cfg(store, kind=kind, shards=2)
    with pytest.raises(SpecError, match="add --shards N"):
        cfg(store, local_cluster=2)
    with pytest.raises(SpecError, match="not both"):
        cfg(store, shards=2, local_cluster=2, scheduler="tcp://x:1")
    with pytest.raises(SpecError, match="--shards must be at least 1"):
        cfg(store, shards=0)
    build_index(cfg(store, name="one"))
    with pytest.raises(SpecError, match="built in one piece.*--shards N --force"):
        build_index(cfg(store, name="one", update=True, shards=2))
    with pytest.raises(SpecError, match="Raise --shards to"):
        build_index(cfg(store, shards=2, max_memory="20KB", name="tiny"))


def test_a_training_sample_over_the_memory_budget_is_capped_with_a_message(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    store = make_store(tmp_path / "s", n=3000)
    budget = 3 * 4 * 16 * 2000  # a sample of 2000 rows × 16 dims, three copies of it
    summary = build_index(cfg(store, shards=2, max_memory=str(budget), params={"nlist": 16}))
    [note] = summary.notes
    assert "capped at 2000 rows (of the 10000" in note and "Raise --max-memory" in note
    assert any("capped at 2000 rows" in r.getMessage() for r in caplog.records)
    fs = open_store(store).get(PATH)
    trained = fs.group[f"{INDEX_GROUP}/{summary.record['key']}/trained"].attrs["commit"]
    assert trained["rows"] == 2000
    with pytest.raises(SpecError, match="at least 512 rows.*Raise --max-memory"):
        build_index(cfg(store, shards=12, max_memory="60000", params={"nlist": 512}, name="x"))


@pytest.mark.parametrize("shards", [None, 2])
def test_a_small_training_sample_gives_one_note_not_a_faiss_warning_per_codebook(
    tmp_path: Path, shards: int | None, capfd: pytest.CaptureFixture[str]
) -> None:
    store = make_store(tmp_path / "s")  # 1,497 usable rows: under 39 × 256 for the PQ codes
    params = {"nlist": 8, "m": 8}
    summary = build_index(cfg(store, kind="ivfpq", shards=shards, params=params))
    [note] = summary.notes
    assert "Trained on 1,497 rows" in note and "wants 9,984" in note
    assert "8 lists and 256 codes per PQ sub-quantizer" in note
    assert "please provide at least" not in capfd.readouterr().err  # FAISS's own, 8 times
    assert summary.record["recall"] > 0.5  # trained all the same


def test_auto_builds_in_parts_when_no_index_fits_the_budget() -> None:
    memory = parse_memory("15MB")  # 1M × 768: even 1-byte PQ codes need ~22 MB whole
    choice = resolve_kind("auto", 1_000_000, 768, max_memory=memory, params={},
                          max_shards=1000)  # fmt: skip
    assert choice.kind.name == "ivfpq" and choice.shards is not None and choice.shards > 2
    assert "built in" in choice.reason and f"{choice.shards} parts" in choice.reason
    with pytest.raises(SpecError, match="Raise --max-memory"):
        resolve_kind("auto", 1_000_000, 768, max_memory=memory, params={}, max_shards=10)
    with pytest.raises(SpecError, match="Raise --max-memory"):  # the quantizer alone: 13 MB
        resolve_kind("auto", 1_000_000, 768, max_memory=parse_memory("10MB"), params={})
    fits = resolve_kind("auto", 1_000_000, 768, max_memory=parse_memory("8GB"), params={},
                        shards=4)  # fmt: skip
    assert fits.kind.name == "ivf" and fits.shards == 4  # only IVF kinds split into parts


def test_cli_builds_in_parts_and_refuses_too_many(cli, tmp_path: Path) -> None:
    store = make_store(tmp_path / "s")
    sel = ["--store", store, "--dataset", "toy", "--backbone", "model", "--kind", "ivf"]
    built = cli("index", "build", *sel, "--shards", "2", "--target-recall", "0.9", "--json")
    assert built.exit_code == 0, built.output
    record = json.loads(built.stdout)["record"]
    assert record["layout"] == "sharded" and len(record["parts"]) == 3
    bad = cli("index", "build", *sel, "--shards", "50", "--name", "x")
    assert bad.exit_code == 1 and "Pass --shards 12 or fewer" in bad.output
