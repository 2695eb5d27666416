"""The parts of a sharded index in the store: committed blobs (a killed write is never read),
the reading API the serving side uses, damage named with the rebuild, and an S3 round trip."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bob_cache.errors import DamagedDataError
from bob_cache.pipelines.index import IndexConfig, build_index
from bob_cache.retrieval import faiss_ops
from bob_cache.stores import index_parts, index_store, open_store
from bob_cache.stores.index_store import get_record, index_reader
from tests.conftest import blobs, write_feature_sets

PATH = "toy/train/model.tag/feat00000001"


class _Killed(BaseException):
    pass


def make_store(store: str | Path, n: int = 1200) -> None:
    x, y = blobs(n, classes=6, dim=8, spread=2.0)
    write_feature_sets(store, {"train": (x, y)}, shard_rows=128)  # type: ignore[arg-type]


def cfg(store: str | Path, **kw: object) -> IndexConfig:
    return IndexConfig(store=str(store), dataset="toy", backbone="model", kind="ivf",
                       target_recall=0.9, quiet=True, **kw)  # fmt: skip


def ids_per_list(index: object) -> list[list[int]]:
    import faiss

    lists = faiss.extract_index_ivf(index).invlists
    return [
        faiss.rev_swig_ptr(lists.get_ids(i), lists.list_size(i)).tolist()
        for i in range(lists.nlist)
    ]


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("parts") / "s"
    make_store(store)
    build_index(cfg(store, name="one"))
    build_index(cfg(store, name="parts", shards=3))
    return store


def test_a_blob_is_read_only_once_committed_and_a_rewrite_replaces_a_leftover(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bob_cache.stores import feature_set as feature_set_module

    make_store(tmp_path / "s")
    fs = open_store(tmp_path / "s", mode="a").get(PATH)
    key = index_parts.create_version(fs, "x", {"identity": 1})
    parts = index_parts.version_group(fs, key).require_group(index_parts.PARTS)
    data = bytes(range(256)) * 40  # 10,240 bytes

    def kill(name: str) -> None:
        if name == "index-part-data":
            raise _Killed(name)

    with monkeypatch.context() as mp, pytest.raises(_Killed):
        mp.setattr(feature_set_module, "crash_point", kill)
        index_parts.write_blob(fs, parts, "0", lambda sink: sink(data[:100]), commit={"part": 0},
                               step="index-part")  # fmt: skip
    assert "0" in parts and index_parts.part_commits(fs, key) == {}  # written, not committed
    monkeypatch.setattr(index_store, "_CHUNK_BYTES", 4096)
    commit = index_parts.write_blob(fs, parts, "0", lambda sink: sink(data), commit={"part": 0},
                                    step="index-part")  # fmt: skip
    assert commit == {"part": 0, "bytes": len(data)} == index_parts.part_commits(fs, key)[0]
    assert parts["0"].chunks == (4096,)  # streamed in whole chunks
    read = index_parts.blob_reader(fs, key, "parts/0")
    assert b"".join(iter(lambda: read(1000), b"")) == data
    index_parts.write_blob(fs, parts, "1", lambda sink: sink(b"tiny"), commit={}, step="s")
    assert parts["1"].chunks == (4,)  # a blob under one chunk is stored at its own size
    assert index_parts.find_version(fs, "x", {"identity": 1}) == key
    assert index_parts.find_version(fs, "x", {"identity": 2}) is None


def test_the_reading_api_gives_the_trained_index_and_each_part_in_order(built: Path) -> None:
    import faiss

    fs = open_store(built).get(PATH)
    record = get_record(fs, "parts")
    trained = faiss.deserialize_index(np.frombuffer(index_parts.read_trained(fs, record), "uint8"))
    assert trained.is_trained and trained.ntotal == 0
    got = [(k, faiss.deserialize_index(np.frombuffer(b, "uint8")).ntotal)
           for k, b in index_parts.iter_parts(fs, record)]  # fmt: skip
    assert [k for k, _ in got] == [0, 1, 2, 3]
    assert [n for _, n in got] == [p["rows"] for p in record.parts] and record.rows == 1200
    merged = index_parts.load_merged_in_memory(fs, record)
    single = faiss_ops.read_index(index_reader(fs, get_record(fs, "one")))
    assert merged.ntotal == 1200 and ids_per_list(merged) == ids_per_list(single)


def test_a_sharded_index_is_not_opened_as_one_blob(built: Path) -> None:
    fs = open_store(built).get(PATH)
    with pytest.raises(index_store.ShardedLayoutError, match=r"4 parts.*--force"):
        index_reader(fs, get_record(fs, "parts"))


def test_a_damaged_part_names_the_rebuild(tmp_path: Path) -> None:
    make_store(tmp_path / "s")
    record = build_index(cfg(tmp_path / "s", shards=2)).record
    chunk = tmp_path / "s" / PATH / "indexes" / record["key"] / "parts" / "1" / "c" / "0"
    raw = bytearray(chunk.read_bytes())
    raw[10] ^= 0xFF
    chunk.write_bytes(bytes(raw))
    fs = open_store(tmp_path / "s").get(PATH)
    with pytest.raises(DamagedDataError, match=r"chunk\(s\) parts/1:0 .*--kind ivf --name ivf"):
        index_parts.load_merged_in_memory(fs, get_record(fs, None))


def test_s3_round_trip_on_dask(s3_env: str) -> None:
    """Parts written to S3 by a Dask worker (which opens the store itself) merge into the
    index a single build holds."""
    from distributed import LocalCluster

    make_store(s3_env, n=640)  # 5 shards
    build_index(cfg(s3_env, name="one"))
    with LocalCluster(n_workers=1, processes=False, dashboard_address=":0") as cluster:
        build_index(cfg(s3_env, shards=2, name="dask", scheduler=cluster.scheduler_address))
    fs = open_store(s3_env).get(PATH)
    record = get_record(fs, "dask")
    assert record.layout == "sharded" and [p["plan"]["shards"] for p in record.parts[:2]] == [
        [0, 1], [2, 3, 4]]  # fmt: skip
    single = faiss_ops.read_index(index_reader(fs, get_record(fs, "one")))
    merged = index_parts.load_merged_in_memory(fs, record)
    assert merged.ntotal == 640 and ids_per_list(merged) == ids_per_list(single)
