"""Checksums on every backend: crc32c on every object, a digest per shard of the decoded
arrays, and reads that name damage instead of returning it as data."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from bob_cache.errors import DamagedDataError
from bob_cache.stores import verify_store
from bob_cache.stores.checksums import has_checksum
from bob_cache.stores.feature_set import COMMITS, ROW_ARRAYS
from bob_cache.stores.layout import StorageLayout
from tests.stores.conftest import Backend

from .test_contract import LAYOUT, create, put, request_for

ARRAYS = ("features", *ROW_ARRAYS)


def finished(b: Backend) -> Any:
    fs = create(b.open())
    for shard in range(3):
        put(fs, shard)
    return fs


def flip(fs: Any, shard: int, name: str) -> None:
    """Flip one bit in the middle of a stored object, as a bad disk or transfer would."""
    key = fs.object_keys(shard)[name]
    store, proto = fs.group.store, default_buffer_prototype()
    data = bytearray(sync(store.get(key, prototype=proto)).to_bytes())
    data[len(data) // 2] ^= 0x10
    sync(store.set(key, proto.buffer.from_bytes(bytes(data))))


def _crc32c(data: bytes) -> int:
    """CRC32C (Castagnoli, reflected polynomial 0x82F63B78), bit by bit: an implementation
    independent of the library the store uses."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
    return crc ^ 0xFFFFFFFF


def independent_digest(values: np.ndarray) -> str:
    """The README's definition, written out again: CRC32C of shape, kind and bytes."""
    head = repr(values.shape).encode()
    if values.dtype.kind in "OUT":
        body = b"str" + "\x1f".join(str(v) for v in values.ravel()).encode("utf-8")
    else:
        body = values.dtype.str.encode() + np.ascontiguousarray(values).tobytes()
    return f"crc32c:{_crc32c(head + body):08x}"


def test_every_object_carries_crc32c_and_each_shard_the_digest_of_its_arrays(
    backend: Backend,
) -> None:
    fs = finished(backend)
    assert all(has_checksum(fs.group[name]) for name in (*ARRAYS, COMMITS))
    for shard, record in enumerate(fs.commits()):
        start, stop = LAYOUT.shard_bounds(shard, fs.n_rows)
        for name in ARRAYS:
            stored = np.asarray(fs.group[name][start:stop])
            assert record["arrays"][name] == independent_digest(stored), (shard, name)
    [report] = verify_store(backend.open("r"))
    assert report.ok and report.checksums == "crc32c + shard digests"


@pytest.mark.parametrize("name", ["features", "labels", "ids"])
def test_a_flipped_bit_is_named_by_every_read_and_by_verify(backend: Backend, name: str) -> None:
    fs = finished(backend)
    clean = fs.array(name)[:]
    flip(fs, 1, name)
    with pytest.raises(DamagedDataError) as info:
        fs.array(name)[:]  # the whole array: the damaged shard is found and named
    message = " ".join(str(info.value).split())
    assert "Shard 1 (rows 4-7) of feature set 'toy/train/model.tag/k0'" in message
    assert f"'{name}' does not decode" in message and "verify" in message and "--repair" in message
    np.testing.assert_array_equal(fs.array(name)[:4], clean[:4])  # other shards still read
    [report] = verify_store(backend.open("a"), repair=True)
    assert report.damaged_shards == [1] and report.repaired
    put(fs, 1)  # what rerunning the extraction does
    np.testing.assert_array_equal(fs.array(name)[:], clean)
    assert verify_store(backend.open("r"))[0].ok


def test_a_flipped_digest_entry_is_damage_not_a_changed_image(backend: Backend) -> None:
    from bob_cache.pipelines.resume import _stored_digests

    fs = finished(backend)
    flip(fs, 0, "digest")
    with pytest.raises(DamagedDataError, match="Shard 0 .* is damaged"):
        _stored_digests(fs, 0, fs.commits()[0])  # what a resume reads first
    [report] = verify_store(backend.open("r"))
    assert report.damaged_shards == [0]


def test_a_missing_object_is_refused_before_any_read(backend: Backend) -> None:
    fs = finished(backend)
    key = fs.object_keys(2)["labels"]
    sync(fs.group.store.delete(key))
    with pytest.raises(DamagedDataError, match="the stored object of labels is missing"):
        fs.check_intact()
    assert fs.array("labels")[8:].tolist() == [-1, -1]  # what zarr alone would have read
    [report] = verify_store(backend.open("r"))
    assert report.damaged_shards == [2]


def test_a_set_from_before_checksums_opens_and_verify_says_it_has_none(backend: Backend) -> None:
    old = StorageLayout(LAYOUT.chunk_rows, LAYOUT.shard_rows, LAYOUT.compression, checksum=False)
    store = backend.open()
    fs = store.require(request_for(), old)
    for shard in range(3):
        put(fs, shard)
    for shard, record in enumerate(fs.commits()):  # records as format 2 wrote them
        fs.group[COMMITS][shard] = json.dumps({k: v for k, v in record.items() if k != "arrays"})
    storage = {k: v for k, v in fs.attrs["storage"].items() if k != "checksum"}
    assert storage == {"chunk_rows": 2, "shard_rows": 4, "compression": "zstd:3"}
    reopened = backend.open("r").feature_sets()[0]
    assert not has_checksum(reopened.group["features"])
    assert reopened.array("features")[:].shape == (10, 4)
    [report] = verify_store(backend.open("r"))
    assert report.ok and report.checksums == "none (written before checksums existed)"
    again = store.require(request_for(), LAYOUT)  # a writer asking for checksums resumes it
    assert again.key == fs.key
