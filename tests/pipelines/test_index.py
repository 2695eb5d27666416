"""The index stage: build, reuse, update with new shards, and refusing stale or foreign indexes."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from bob_cache.errors import IndexMismatchError, IndexNotFoundError, StaleIndexError
from bob_cache.pipelines.index import IndexConfig, build_index
from bob_cache.pipelines.query import QueryConfig, Searcher
from bob_cache.stores import FeatureSetRequest, open_store, resolve_layout
from tests.conftest import blobs, write_feature_sets


def partial_set(store: Path, x: np.ndarray, y: np.ndarray, shards: list[int]) -> None:
    """A feature set with only ``shards`` committed (64-row shards)."""
    layout = resolve_layout(shard_rows=64)
    request = FeatureSetRequest(
        path="toy/train/model.tag/feat00000001", key="feat00000001",
        spec={"layer": "final", "pool": "head", "dtype": "float32"},
        provenance={"dataset": {"name": "toy", "class_names": []}, "split": "train",
                    "backbone": {"slug": "model.tag", "name": "model", "arch": "model"}},
        n_rows=len(x), dim=x.shape[1], dtype="float32",
    )  # fmt: skip
    fs = open_store(store, mode="a").require(request, layout)
    starts = {layout.shard_bounds(s, len(x))[0] for s in shards}
    errors = ["unreadable" if i - 3 in starts else "" for i in range(len(x))]  # one per shard
    ids = [f"r{i}" for i in range(len(x))]
    fs.write_rows(x, labels=y, ids=ids, errors=errors, shards=shards)
    fs.finalize()


def cfg(store: Path, **kw: object) -> IndexConfig:
    return IndexConfig(store=str(store), dataset="toy", backbone="model", quiet=True, **kw)


def test_build_records_recall_and_a_rerun_reuses_the_index(tmp_path: Path) -> None:
    x, y = blobs(2000, classes=8, dim=16, spread=2.0)
    write_feature_sets(tmp_path / "s", {"train": (x, y)}, shard_rows=256)
    summary = build_index(cfg(tmp_path / "s", kind="hnsw", target_recall=0.9))
    r = summary.record
    assert summary.action == "built" and r["rows"] == 2000 and r["kind"] == "hnsw"
    assert r["recall"] >= 0.9 and r["search_param"] == "efSearch" and r["bytes"] > 0
    assert r["feature_key"] == "feat00000001" and r["recall_queries"] == 200  # a tenth held out
    again = build_index(cfg(tmp_path / "s", kind="hnsw"))
    assert again.action == "exists" and again.record["created"] == r["created"]
    forced = build_index(cfg(tmp_path / "s", kind="hnsw", force=True))
    assert forced.action == "built"


def test_update_adds_only_newly_committed_shards(tmp_path: Path) -> None:
    x, y = blobs(256, classes=4, dim=8)
    partial_set(tmp_path / "s", x, y, shards=[0, 2])
    built = build_index(cfg(tmp_path / "s", kind="flat"))
    assert built.record["rows"] == 2 * 63 and built.record["shards"] == [0, 2]
    searcher = Searcher.open(QueryConfig(str(tmp_path / "s"), "toy", "model"))
    assert searcher.pending_shards == []
    partial_set(tmp_path / "s", x, y, shards=[1, 3])
    searcher = Searcher.open(QueryConfig(str(tmp_path / "s"), "toy", "model"))
    assert searcher.pending_shards == [1, 3]
    updated = build_index(cfg(tmp_path / "s", update=True))
    assert (updated.action, updated.rows_added) == ("updated", 2 * 63)
    assert updated.record["rows"] == 4 * 63 and updated.record["shards"] == [0, 1, 2, 3]
    searcher = Searcher.open(QueryConfig(str(tmp_path / "s"), "toy", "model"))
    assert searcher.n_indexed == 252
    hits = searcher.search_vectors(x[[70, 200]], k=1)
    assert hits["row"].tolist() == [70, 200]  # rows added by the update are found
    assert 3 not in set(searcher.search_vectors(x[3], k=250)["row"])  # invalid row left out
    assert build_index(cfg(tmp_path / "s", update=True)).action == "up-to-date"


def test_stale_index_is_detected_after_shards_are_recomputed(tmp_path: Path) -> None:
    x, y = blobs(256, classes=4, dim=8)
    write_feature_sets(tmp_path / "s", {"train": (x, y)})
    build_index(cfg(tmp_path / "s", kind="flat"))
    fs = open_store(tmp_path / "s", mode="a").get("feat0000")
    fs.uncommit([1])
    with pytest.raises(StaleIndexError, match=r"shards \[1\].*--force"):
        Searcher.open(QueryConfig(str(tmp_path / "s"), "toy", "model"))
    with pytest.raises(StaleIndexError):
        build_index(cfg(tmp_path / "s", update=True))


def test_an_index_from_another_feature_set_is_refused(tmp_path: Path) -> None:
    x, y = blobs(200, classes=4, dim=8)
    write_feature_sets(tmp_path / "s", {"train": (x, y)}, key="aaaa00000001")
    write_feature_sets(tmp_path / "s", {"train": (x, y)}, key="bbbb00000001", backbone="other.t")
    build_index(cfg(tmp_path / "s", kind="flat"))
    source = tmp_path / "s/toy/train/model.tag/aaaa00000001/indexes"
    shutil.copytree(source, tmp_path / "s/toy/train/other.t/bbbb00000001/indexes")
    with pytest.raises(IndexMismatchError, match="built from feature set aaaa00000001"):
        Searcher.open(QueryConfig(str(tmp_path / "s"), "toy", "other"))


def test_missing_index_names_the_build_command(tmp_path: Path) -> None:
    x, y = blobs(100, classes=4, dim=8)
    write_feature_sets(tmp_path / "s", {"train": (x, y)})
    exact = Searcher.open(QueryConfig(str(tmp_path / "s"), "toy", "model"))
    assert exact.index_name is None and "bob-cache index build" in exact.note
    with pytest.raises(IndexNotFoundError, match="bob-cache index build"):
        Searcher.open(QueryConfig(str(tmp_path / "s"), "toy", "model", index="flat"))
    build_index(cfg(tmp_path / "s", kind="flat"))
    with pytest.raises(IndexNotFoundError, match="It has: flat"):
        Searcher.open(QueryConfig(str(tmp_path / "s"), "toy", "model", index="hnsw"))


def test_tuning_holds_rows_out_across_class_ordered_shards(tmp_path: Path) -> None:
    from bob_cache.retrieval.vectors import sample_rows
    from bob_cache.stores import open_store

    x, y = blobs(3000, classes=6, dim=16, spread=2.0)
    order = np.argsort(y, kind="stable")  # stored class by class, as class folders are
    write_feature_sets(tmp_path / "s", {"train": (x[order], y[order])}, shard_rows=128)
    fs = open_store(tmp_path / "s").get("toy/train/model.tag/feat00000001")
    _, rows = sample_rows(fs, list(range(fs.layout.n_shards(fs.n_rows))), 300, "l2", seed=1)
    assert len(np.unique(y[order][rows])) == 6 and np.all(np.diff(rows) > 0)
    summary = build_index(cfg(tmp_path / "s", kind="ivf", target_recall=0.9))
    r = summary.record
    assert r["rows"] == 3000 and r["recall_queries"] == 300 and r["recall"] >= 0.9
    searcher = Searcher.open(QueryConfig(str(tmp_path / "s"), "toy", "model"))
    assert searcher.n_indexed == 3000  # the held-out rows were added after tuning


def test_an_index_is_streamed_to_the_store_in_chunks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bob_cache.stores import index_store, open_store

    monkeypatch.setattr(index_store, "_CHUNK_BYTES", 4096)
    x, y = blobs(500, classes=4, dim=16)
    write_feature_sets(tmp_path / "s", {"train": (x, y)})
    r = build_index(cfg(tmp_path / "s", kind="flat")).record
    fs = open_store(tmp_path / "s").get("toy/train/model.tag/feat00000001")
    data = fs.group[f"indexes/{r['key']}/data"]
    assert data.shape[0] == r["bytes"] > 500 * 16 * 4 and data.chunks == (4096,)
    searcher = Searcher.open(QueryConfig(str(tmp_path / "s"), "toy", "model"))
    assert searcher.search_vectors(x[[7, 450]], k=1)["row"].tolist() == [7, 450]


def test_update_tunes_on_new_rows_held_out_then_added(tmp_path: Path) -> None:
    x, y = blobs(3000, classes=8, dim=16, spread=2.0)  # 47 shards of 64, one invalid row each
    partial_set(tmp_path / "s", x, y, shards=list(range(15)))
    built = build_index(cfg(tmp_path / "s", kind="ivf", target_recall=0.9))
    # 960 rows: a tenth is under 100 queries, so it tunes on indexed rows (each left out)
    assert built.record["rows"] == 945 and built.record["recall_queries"] == 945
    partial_set(tmp_path / "s", x, y, shards=list(range(15, 47)))
    updated = build_index(cfg(tmp_path / "s", update=True))
    assert updated.rows_added == 2040 - 32 and updated.record["rows"] == 2953
    assert updated.record["recall_queries"] == 204  # a tenth of the new rows, held out
    assert updated.record["recall"] >= 0.9
    searcher = Searcher.open(QueryConfig(str(tmp_path / "s"), "toy", "model"))
    assert searcher.n_indexed == 2953  # the held-out rows were added after tuning


class _Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs."""


@pytest.mark.parametrize("step", ["index-data", "index-record", "index-cleanup"])
@pytest.mark.parametrize("update", [False, True])
def test_a_build_killed_at_any_step_is_finished_by_the_same_command(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str, update: bool
) -> None:
    """Each step of an index write (data, record, removal of the old version) killed once:
    the previous index stays usable (or there is none), and rerunning the same command ends
    with exactly one complete index equal to an uninterrupted build."""
    from bob_cache.stores import feature_set as feature_set_module
    from bob_cache.stores import open_store
    from bob_cache.stores.index_store import INDEX_GROUP, list_indexes

    x, y = blobs(400, classes=4, dim=8)
    partial_set(tmp_path / "s", x, y, shards=[0, 1, 2])
    build_index(cfg(tmp_path / "s", kind="flat"))  # the index a killed update must not lose
    partial_set(tmp_path / "s", x, y, shards=[3, 4, 5, 6])
    config = cfg(tmp_path / "s", update=True) if update else cfg(tmp_path / "s", kind="flat",
                                                                   force=True)  # fmt: skip

    def kill(name: str) -> None:
        if name == step:
            raise _Killed(name)

    monkeypatch.setattr(feature_set_module, "crash_point", kill)
    with pytest.raises(_Killed):
        build_index(config)
    monkeypatch.setattr(feature_set_module, "crash_point", lambda name: None)
    fs = open_store(tmp_path / "s").get("toy/train/model.tag/feat00000001")
    survivors = list_indexes(fs)
    assert len(survivors) == 1  # the old index (or the new one, once its record is written)
    Searcher.open(QueryConfig(str(tmp_path / "s"), "toy", "model"))  # still serves queries
    again = build_index(config)
    assert again.action in ("built", "updated", "up-to-date")
    fs = open_store(tmp_path / "s").get("toy/train/model.tag/feat00000001")
    [final] = list_indexes(fs)
    assert [k for k, _ in fs.group[INDEX_GROUP].groups()] == [final.key]  # leftovers removed
    searcher = Searcher.open(QueryConfig(str(tmp_path / "s"), "toy", "model"))
    assert searcher.n_indexed == final.rows == 400 - 7  # every committed, valid row


@pytest.mark.parametrize("step", ["index-data", "index-record"])
def test_a_first_build_killed_at_any_step_is_finished_without_force(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    """No earlier index, no --force: the same command after the kill ends with one complete
    index (a killed attempt's leftovers removed) that serves every valid row."""
    from bob_cache.stores import feature_set as feature_set_module
    from bob_cache.stores.index_store import INDEX_GROUP, list_indexes

    x, y = blobs(400, classes=4, dim=8)
    partial_set(tmp_path / "s", x, y, shards=list(range(7)))

    def kill(name: str) -> None:
        if name == step:
            raise _Killed(name)

    with monkeypatch.context() as mp, pytest.raises(_Killed):
        mp.setattr(feature_set_module, "crash_point", kill)
        build_index(cfg(tmp_path / "s", kind="flat"))
    fs = open_store(tmp_path / "s").get("toy/train/model.tag/feat00000001")
    assert len(list_indexes(fs)) == (step == "index-record")  # complete only once recorded
    again = build_index(cfg(tmp_path / "s", kind="flat"))
    assert again.action == ("exists" if step == "index-record" else "built")
    fs = open_store(tmp_path / "s").get("toy/train/model.tag/feat00000001")
    [final] = list_indexes(fs)
    assert [k for k, _ in fs.group[INDEX_GROUP].groups()] == [final.key]
    assert Searcher.open(QueryConfig(str(tmp_path / "s"), "toy", "model")).n_indexed == 393
