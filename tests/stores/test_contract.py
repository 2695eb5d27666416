"""The feature-store contract, run against every backend.

Backends: a local directory (the default), zarr's in-memory store, an fsspec ``memory://``
URL, and S3 through a real moto server on loopback. Each test states one promise the
store makes to the stages and users that read it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import xarray as xr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from bob_cache.errors import FeatureOverflowError, FeatureSetNotFoundError, SpecMismatchError
from bob_cache.stores import (
    FeatureSetRequest,
    FeatureStore,
    open_store,
    resolve_layout,
    verify_store,
)
from bob_cache.stores.feature_set import ShardRows
from tests.stores.conftest import Backend

N, D = 10, 4
LAYOUT = resolve_layout(chunk_rows=2, shard_rows=4)  # 3 shards: rows 0-3, 4-7, 8-9
IDS = [f"img/{i:02d}.png" for i in range(N)]
LABELS = np.arange(N) % 3


def request_for(
    key: str = "k0", *, spec: dict[str, Any] | None = None, dim: int = D, dtype: str = "float16"
) -> FeatureSetRequest:
    return FeatureSetRequest(
        path=f"toy/train/model.tag/{key}",
        key=key,
        spec=spec or {"layer": "final", "pool": "head", "dtype": dtype},
        provenance={
            "dataset": {"name": "toy", "class_names": ["a", "b", "c"]},
            "split": "train",
            "backbone": {"slug": "model.tag"},
        },
        n_rows=N,
        dim=dim,
        dtype=dtype,
    )


def create(store: FeatureStore, **kwargs: Any):
    return store.require(request_for(**kwargs), LAYOUT)


def rows(shard: int) -> np.ndarray:
    start, stop = LAYOUT.shard_bounds(shard, N)
    return np.arange(start, stop, dtype=np.float32)[:, None] * np.ones((1, D), np.float32) + 0.5


def shard_rows(shard: int, errors: list[str] | None = None) -> ShardRows:
    start, stop = LAYOUT.shard_bounds(shard, N)
    return ShardRows(
        labels=LABELS[start:stop],
        ids=IDS[start:stop],
        digests=[f"d{i}" for i in range(start, stop)],
        errors=errors or [""] * (stop - start),
    )


def put(fs: Any, shard: int, values: np.ndarray | None = None, errors: list[str] | None = None):
    return fs.write_shard(
        shard, rows(shard) if values is None else values, shard_rows(shard, errors)
    )


def test_new_feature_set_has_the_documented_arrays_and_attributes(backend: Backend) -> None:
    fs = create(backend.open())
    assert fs.features.shape == (N, D) and fs.features.dtype == np.float16
    assert fs.features.metadata.dimension_names == ("sample", "feature")
    assert fs.features.shards == (4, D) and fs.features.chunks == (2, D)
    put(fs, 1)
    assert list(fs.array("ids")[4:8]) == IDS[4:8]  # rows are written with their shard
    assert fs.array("labels")[4:8].tolist() == LABELS[4:8].tolist()
    assert fs.attrs["storage"] == {"chunk_rows": 2, "shard_rows": 4, "compression": "zstd:3",
                                   "checksum": True}  # fmt: skip
    assert fs.attrs["bob_cache"]["format"] == 2 and fs.complete is False
    assert not {"complete", "n_invalid", "rows_listed"} & set(fs.attrs)  # never stored
    assert fs.missing_shards() == [0, 2]


def test_shards_commit_one_by_one_and_a_reopened_store_resumes(backend: Backend) -> None:
    fs = create(backend.open())
    put(fs, 1)
    again = create(backend.open())  # a new process reopening the same set
    assert again.missing_shards() == [0, 2]
    assert again.finalize() is False
    put(again, 0)
    put(again, 2)
    assert again.finalize() is True
    reread = backend.open(mode="r").get("k0")
    assert reread.complete and reread.n_invalid == 0
    np.testing.assert_array_equal(
        reread.features[:], np.concatenate([rows(s) for s in range(3)]).astype(np.float16)
    )


def test_invalid_rows_are_nan_with_their_reason(backend: Backend) -> None:
    fs = create(backend.open())
    put(fs, 0, errors=["", "OSError: image file is truncated", "", ""])
    assert np.isnan(fs.features[1]).all() and np.isfinite(fs.features[0]).all()
    assert fs.array("valid")[:4].tolist() == [True, False, True, True]
    assert fs.invalid_rows() == [("img/01.png", "OSError: image file is truncated")]


def test_overflowing_float16_is_refused_and_earlier_shards_survive(backend: Backend) -> None:
    fs = create(backend.open())
    put(fs, 0)
    huge = rows(1)
    huge[2, 1] = 1e6
    with pytest.raises(
        FeatureOverflowError, match=r"'img/06.png'.*float16's range.*--dtype float32"
    ):
        put(fs, 1, huge)
    assert fs.missing_shards() == [1, 2]
    np.testing.assert_array_equal(fs.features[:4], rows(0).astype(np.float16))


def test_float32_storage_keeps_large_values(backend: Backend) -> None:
    fs = create(backend.open(), dtype="float32")
    big = rows(0) * 1e6
    put(fs, 0, big)
    np.testing.assert_array_equal(fs.features[:4], big)


@pytest.mark.parametrize(
    ("change", "field"),
    [({"spec": {"layer": "other"}}, "spec.layer"), ({"dim": 8}, "dim")],
)
def test_a_different_spec_is_refused_and_nothing_changes(
    backend: Backend, change: dict, field: str
) -> None:
    store = backend.open()
    fs = create(store)
    put(fs, 0)
    with pytest.raises(SpecMismatchError, match=rf"{field}: stored .*--overwrite"):
        create(store, **change)
    assert create(store).missing_shards() == [1, 2]


def test_a_different_layout_is_refused(backend: Backend) -> None:
    store = backend.open()
    create(store)
    other = resolve_layout(chunk_rows=1, shard_rows=4)
    with pytest.raises(SpecMismatchError, match="storage.chunk_rows: stored 2, requested 1"):
        store.require(request_for(), other)


def test_overwrite_replaces_the_set(backend: Backend) -> None:
    store = backend.open()
    put(create(store), 0)
    fresh = store.require(request_for(), LAYOUT, overwrite=True)
    assert fresh.missing_shards() == [0, 1, 2]


def test_listing_and_lookup_by_path_or_key_prefix(backend: Backend) -> None:
    store = backend.open()
    create(store, key="abc111")
    create(store, key="abc222")
    listing = store.list()
    assert [r["key"] for r in listing] == ["abc111", "abc222"]
    assert set(listing[0]) >= {
        "group",
        "dataset",
        "split",
        "backbone",
        "key",
        "rows",
        "dim",
        "invalid",
        "complete",
    }
    assert store.get("abc2").key == "abc222"
    assert store.get("toy/train/model.tag/abc111").key == "abc111"
    with pytest.raises(FeatureSetNotFoundError, match="matches 2 feature sets.*longer key"):
        store.get("abc")
    with pytest.raises(FeatureSetNotFoundError, match="matches no feature set.*holds: toy/train"):
        store.get("zzz")


def _chunk_key(fs: Any, array: str, shard: int) -> str:
    suffix = f"c/{shard}/0" if array == "features" else f"c/{shard}"
    return f"{fs.path}/{array}/{suffix}"


def test_verify_finds_corrupt_and_missing_objects_and_repair_uncommits(backend: Backend) -> None:
    store = backend.open()
    fs = create(store)
    for shard in range(3):
        put(fs, shard)
    fs.finalize()
    assert all(r.ok for r in verify_store(store))
    zstore = store.store
    sync(
        zstore.set(
            _chunk_key(fs, "features", 0), default_buffer_prototype().buffer.from_bytes(b"garbage")
        )
    )
    sync(zstore.delete(_chunk_key(fs, "features", 2)))
    (report,) = verify_store(backend.open(mode="r"))
    assert report.damaged_shards == [0, 2]
    assert "unreadable" in report.problems[0]
    assert "the stored object of features is missing" in report.problems[1]
    verify_store(backend.open(), repair=True)
    reopened = backend.open().get("k0")
    assert reopened.missing_shards() == [0, 2] and not reopened.complete


def test_xarray_opens_a_feature_set(tmp_path: Path) -> None:
    fs = create(open_store(tmp_path / "store", mode="a"))
    put(fs, 0)
    ds = xr.open_zarr(tmp_path / "store", group=fs.path, consolidated=False)
    assert ds["features"].dims == ("sample", "feature")


def test_a_finished_set_opens_in_xarray_from_consolidated_metadata(tmp_path: Path) -> None:
    import warnings

    store = open_store(tmp_path / "store", mode="a")
    fs = create(store)
    for shard in range(3):
        put(fs, shard)
    assert fs.finalize()
    create(store, key="k1")  # a set created later stays visible to bob-cache
    assert [f.key for f in open_store(tmp_path / "store").feature_sets()] == ["k0", "k1"]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "failed to open with consolidated metadata"
        ds = xr.open_zarr(tmp_path / "store", group=fs.path)
    assert ds["features"].dims == ("sample", "feature")
    assert ds["ids"].dims == ("sample",) and str(ds["ids"].values[3]) == "img/03.png"
    assert ds.attrs["dataset"]["class_names"] == ["a", "b", "c"]


def test_an_index_stored_beside_a_set_round_trips_and_is_not_a_feature_set(
    backend: Backend,
) -> None:
    from bob_cache.retrieval import faiss_ops
    from bob_cache.retrieval.kinds import get_kind
    from bob_cache.stores.index_store import (
        IndexRecord,
        check_index,
        index_reader,
        index_writer,
        list_indexes,
    )

    fs = create(backend.open())
    for shard in range(3):
        put(fs, shard)
    fs.finalize()
    index = faiss_ops.create_index(get_kind("flat"), D, "l2", {})
    index.add_with_ids(rows(0), np.arange(4))
    record = IndexRecord(
        name="flat", kind="flat", metric="l2", params={}, feature_key=fs.key,
        feature_set=fs.path, feature_set_created=fs.attrs["created"], shards=[0], rows=4, dim=D,
        generations={"0": fs.generations()[0]},
    )  # fmt: skip
    with index_writer(fs, record) as sink:
        faiss_ops.write_index(index, sink)
    store = backend.open("r")
    again = store.get(fs.path)
    assert [r.name for r in list_indexes(again)] == ["flat"]
    assert check_index(again, list_indexes(again)[0]) == [1, 2]  # shards not indexed yet
    [stored] = list_indexes(again)
    assert stored.bytes == again.group[f"indexes/{stored.key}/data"].shape[0] > 0
    loaded = faiss_ops.read_index(index_reader(again, stored))
    assert loaded.search(rows(0)[2:3], 1)[1].tolist() == [[2]]
    assert [f.path for f in store.feature_sets()] == [fs.path]
    assert all(r.ok for r in verify_store(store))
