"""Retrieval indexes persisted beside their feature set.

An index lives in the feature set's group at ``indexes/<name>``: the serialized FAISS index
as a chunked ``uint8`` array (so every store backend, local or ``s3://``, holds it) and
attributes recording what it was built from (feature key, the set's creation time, the
shards it covers and their commit generations), how (kind, metric, parameters) and what it
measured (recall). The attributes are written last, so a killed build leaves no index that
looks complete.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import zarr

from bob_cache.errors import IndexMismatchError, IndexNotFoundError, StaleIndexError
from bob_cache.stores.feature_set import FeatureSet
from bob_cache.stores.location import translate_write_errors

INDEX_GROUP = "indexes"
INDEX_FORMAT = 1
_CHUNK_BYTES = 64 * 2**20


@dataclass
class IndexRecord:
    """What an index holds and how it was built (its group attributes)."""

    name: str
    kind: str
    metric: str
    params: dict[str, Any]
    feature_key: str
    feature_set: str
    feature_set_created: str
    shards: list[int]
    rows: int
    dim: int
    generations: dict[str, str] = field(default_factory=dict)
    search_param: str | None = None
    search_value: int | None = None
    recall: float = 1.0
    target_recall: float = 1.0
    recall_k: int = 10
    recall_queries: int = 0
    bytes: int = 0
    build_seconds: float = 0.0
    reason: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""
    format: int = INDEX_FORMAT

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextmanager
def index_writer(fs: FeatureSet, record: IndexRecord) -> Iterator[Callable[[bytes], int]]:
    """Store an index as ``indexes/<record.name>``: yields a sink that takes the serialized
    bytes piece by piece (appended chunk by chunk, never held whole); on a clean exit the
    record (with ``bytes`` filled in) is written last, marking the index complete."""
    what = f"index '{record.name}' of '{fs.path}'"
    with translate_write_errors(fs.location, what):
        parent = fs.group.require_group(INDEX_GROUP)
        if record.name in parent:
            del parent[record.name]
        group = parent.create_group(record.name)
        array = group.create_array(
            "data", shape=(0,), dtype="uint8", chunks=(_CHUNK_BYTES,), compressors=None,
            dimension_names=("byte",),
        )  # fmt: skip
        sink = _ChunkSink(array)
        yield sink
        sink.close()
        record.bytes = sink.total
        group.attrs.update({"record": record.to_dict(), "complete": True})


class _ChunkSink:
    """Buffers writes and appends whole chunks to a growing 1-D ``uint8`` array."""

    def __init__(self, array: zarr.Array) -> None:
        self.array, self.buffer, self.total = array, bytearray(), 0

    def __call__(self, data: bytes) -> int:
        self.buffer += data
        if len(self.buffer) >= _CHUNK_BYTES:
            view = memoryview(self.buffer)
            whole = len(self.buffer) - len(self.buffer) % _CHUNK_BYTES
            self._append(view[:whole])
            rest = bytes(view[whole:])
            view.release()
            self.buffer = bytearray(rest)
        return len(data)

    def close(self) -> None:
        if self.buffer:
            self._append(memoryview(self.buffer))
            self.buffer = bytearray()

    def _append(self, data: memoryview) -> None:
        self.array.append(np.frombuffer(data, dtype=np.uint8))
        self.total += len(data)


def list_indexes(fs: FeatureSet) -> list[IndexRecord]:
    """Records of the complete indexes beside ``fs``, newest first."""
    if INDEX_GROUP not in fs.group:
        return []
    parent = fs.group[INDEX_GROUP]
    records = [
        IndexRecord(**node.attrs["record"])
        for _, node in parent.groups()
        if node.attrs.get("complete") and "record" in node.attrs
    ]
    return sorted(records, key=lambda r: r.created, reverse=True)


def get_record(fs: FeatureSet, name: str | None) -> IndexRecord:
    """The record of index ``name`` (default: the newest) beside ``fs``."""
    records = list_indexes(fs)
    if not records:
        raise IndexNotFoundError(
            f"Feature set '{fs.path}' has no retrieval index. Build one with `bob-cache index "
            f"build --store {fs.location} --dataset {fs.attrs['dataset']['name']} --backbone "
            f"{fs.attrs['backbone']['slug']} --split {fs.attrs['split']}`."
        )
    if name is None:
        return records[0]
    for record in records:
        if record.name == name:
            return record
    raise IndexNotFoundError(
        f"No index named '{name}' beside '{fs.path}'. It has: "
        f"{', '.join(r.name for r in records)}. Pass one of them with --index."
    )


def index_reader(fs: FeatureSet, name: str) -> Callable[[int], bytes]:
    """``read(n) → up to n bytes`` of index ``name``'s serialized data, one stored chunk in
    memory at a time (``b""`` at the end)."""
    return _ChunkSource(fs.group[f"{INDEX_GROUP}/{name}/data"])


class _ChunkSource:
    """Reads a 1-D ``uint8`` array sequentially, one of its chunks in memory at a time."""

    def __init__(self, array: zarr.Array) -> None:
        self.array, self.size, self.step = array, int(array.shape[0]), int(array.chunks[0])
        self.pos, self.start, self.chunk = 0, 0, b""

    def __call__(self, n: int) -> bytes:
        if self.pos >= self.size:
            return b""
        if not self.start <= self.pos < self.start + len(self.chunk):
            self.start = self.pos - self.pos % self.step
            self.chunk = self.array[self.start : self.start + self.step].tobytes()
        out = self.chunk[self.pos - self.start : self.pos - self.start + n]
        self.pos += len(out)
        return out


def check_index(fs: FeatureSet, record: IndexRecord) -> list[int]:
    """Refuse an index that does not belong to ``fs`` or went stale; return the committed
    shards it does not cover yet (``index update`` adds them).

    Raises:
        IndexMismatchError: built from another feature set.
        StaleIndexError: the set was re-extracted, or some indexed shard was uncommitted or
            recomputed since (its commit generation differs from the recorded one).
    """
    if record.feature_key != fs.key:
        raise IndexMismatchError(
            f"Index '{record.name}' was built from feature set {record.feature_key} "
            f"('{record.feature_set}'), not from '{fs.path}' (key {fs.key}); its rows would "
            "point at the wrong images. Query the set it was built from, or build an index "
            "for this one with `bob-cache index build`."
        )
    generations = fs.generations()
    committed = set(generations)
    recomputed = sorted(
        s for s in record.shards if generations.get(s) != record.generations.get(str(s))
    )
    if record.feature_set_created != fs.attrs.get("created") or recomputed:
        if record.feature_set_created != fs.attrs.get("created"):
            why = "the feature set was re-created (--overwrite)"
        elif not record.generations:
            why = "it was built before indexes recorded shard generations"
        else:
            why = f"shards {recomputed[:5]} were uncommitted or recomputed"
        raise StaleIndexError(
            f"Index '{record.name}' of '{fs.path}' is stale: {why} after it was built. "
            "Rebuild it with `bob-cache index build ... --force`."
        )
    return sorted(committed - set(record.shards))


def group_exists(fs: FeatureSet, name: str) -> bool:
    return INDEX_GROUP in fs.group and name in fs.group[INDEX_GROUP]


def open_group(fs: FeatureSet, name: str) -> zarr.Group:
    return fs.group[f"{INDEX_GROUP}/{name}"]
