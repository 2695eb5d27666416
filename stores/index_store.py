"""Retrieval indexes persisted beside their feature set.

An index lives in the feature set's group at ``indexes/<name>~<version>``: the serialized
FAISS index as a chunked ``uint8`` array (so every store backend, local or ``s3://``, holds
it) and attributes recording what it was built from (feature key, the set's creation time,
the shards it covers and their commit generations), how (kind, metric, parameters) and what
it measured (recall). A build writes a new version and its attributes last, and only then
deletes the older versions of that name: a kill or a full disk at any step leaves the
previous index whole (or none) and an incomplete version that readers ignore and the next
build of the same name removes, so the same command finishes the work.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import zarr

from bob_cache.errors import (
    DamagedDataError,
    IndexMismatchError,
    IndexNotFoundError,
    StaleIndexError,
    StoreError,
)
from bob_cache.stores import feature_set as feature_set_module
from bob_cache.stores.checksums import checksummed
from bob_cache.stores.feature_set import FeatureSet
from bob_cache.stores.guarded import DAMAGE
from bob_cache.stores.location import translate_write_errors

INDEX_GROUP = "indexes"
VERSION_SEP = "~"
INDEX_FORMAT = 1
_CHUNK_BYTES = 64 * 2**20


class ShardedLayoutError(StoreError, ValueError):
    """A sharded index was opened as one blob (:func:`index_reader`)."""


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
    rerank: dict[str, dict[str, Any]] = field(default_factory=dict)  # per --rerank depth
    bytes: int = 0
    build_seconds: float = 0.0
    reason: str = ""
    versions: dict[str, str] = field(default_factory=dict)
    created: str = ""
    format: int = INDEX_FORMAT
    key: str = ""  # the group holding this version (``name~version``; ``name`` before)
    layout: str = "single"  # single: one ``data`` blob; sharded: ``trained`` + ``parts/<k>``
    parts: list[dict[str, Any]] = field(default_factory=list)  # sharded: each part's commit

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
        record.key = f"{record.name}{VERSION_SEP}{uuid.uuid4().hex[:12]}"
        group = parent.create_group(record.key)
        sink = _ChunkSink(blob_array(group, "data"))
        yield sink
        sink.close()
        feature_set_module.crash_point("index-data")
        record.bytes = sink.total
        group.attrs.update({"record": record.to_dict(), "complete": True})
        feature_set_module.crash_point("index-record")
        prune_versions(fs, record)


def blob_array(group: zarr.Group, name: str) -> Callable[[int], zarr.Array]:
    """``create(chunk_bytes) → array``: a new, empty 1-D ``uint8`` array ``name`` in
    ``group``, crc32c per chunk (what :class:`_ChunkSink` writes into)."""

    def create(chunk_bytes: int) -> zarr.Array:
        return group.create_array(
            name, shape=(0,), dtype="uint8", chunks=(max(chunk_bytes, 1),),
            compressors=checksummed([]), dimension_names=("byte",),
        )  # fmt: skip

    return create


class _ChunkSink:
    """Buffers writes and appends whole chunks to a growing 1-D ``uint8`` array.

    The array is created at the first chunk, or at :meth:`close` when everything written is
    smaller than one chunk: then its chunk is exactly that size (zarr pads the last chunk to
    the chunk size, so a small index would otherwise take :data:`_CHUNK_BYTES` of storage).
    """

    def __init__(self, create: Callable[[int], zarr.Array]) -> None:
        self.create, self.array = create, None
        self.buffer, self.total = bytearray(), 0

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
        if self.array is None:
            self.array = self.create(len(self.buffer))
        if self.buffer:
            self._append(memoryview(self.buffer))
            self.buffer = bytearray()

    def _append(self, data: memoryview) -> None:
        if self.array is None:
            self.array = self.create(_CHUNK_BYTES)
        self.array.append(np.frombuffer(data, dtype=np.uint8))
        self.total += len(data)


def list_indexes(fs: FeatureSet) -> list[IndexRecord]:
    """Records of the complete indexes beside ``fs`` (the newest version of each name),
    newest first."""
    if INDEX_GROUP not in fs.group:
        return []
    newest: dict[str, IndexRecord] = {}
    for key, node in fs.group[INDEX_GROUP].groups():
        if node.attrs.get("complete") and "record" in node.attrs:
            record = IndexRecord(**{**node.attrs["record"], "key": key})
            if record.name not in newest or record.created > newest[record.name].created:
                newest[record.name] = record
    return sorted(newest.values(), key=lambda r: r.created, reverse=True)


def prune_versions(fs: FeatureSet, record: IndexRecord) -> None:
    """Delete every other group of ``record``'s name: older versions, killed attempts."""
    with translate_write_errors(fs.location, f"old versions of index '{record.name}'"):
        parent = fs.group[INDEX_GROUP]
        for key in _versions_of(parent, record.name):
            if key != record.key:
                del parent[key]
                feature_set_module.crash_point("index-cleanup")


def _versions_of(parent: zarr.Group, name: str) -> list[str]:
    """Every group of index ``name``: its versions (complete or not) and an unversioned one."""
    return [k for k, _ in parent.groups() if k == name or k.startswith(f"{name}{VERSION_SEP}")]


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


def index_reader(fs: FeatureSet, record: IndexRecord) -> Callable[[int], bytes]:
    """``read(n) → up to n bytes`` of the index ``record`` describes, one stored chunk in
    memory at a time (``b""`` at the end).

    A chunk that fails its crc32c or does not decode raises :class:`DamagedDataError`
    naming the index, the chunk and the rebuild (never a codec's own error). A sharded index
    (``record.layout == "sharded"``) has no single blob: it raises
    :class:`ShardedLayoutError` (read it with :mod:`bob_cache.stores.index_parts`).
    """
    if record.layout != "single":
        raise ShardedLayoutError(
            f"Index '{record.name}' of '{fs.path}' is stored in {len(record.parts)} parts "
            "(built with --shards); it is read through bob_cache.stores.index_parts, not as "
            "one blob. If this command cannot read it yet, rebuild it in one piece with "
            f"`bob-cache index build ... --kind {record.kind} --name {record.name} --force` "
            "(without --shards)."
        )
    array = fs.group[f"{INDEX_GROUP}/{record.key or record.name}/data"]
    return _ChunkSource(array, lambda chunk, why: index_damage(fs, record, chunk, why))


def index_damage(fs: FeatureSet, record: IndexRecord, chunks: str, why: str) -> DamagedDataError:
    """The error for a damaged index: which, where, what, and the command that rebuilds it."""
    return DamagedDataError(
        f"Index '{record.name}' of feature set '{fs.path}' in '{fs.location}' is damaged: "
        f"the stored object of its chunk(s) {chunks} {why}. Fix: rebuild it with `bob-cache "
        f"index build --store {fs.location} --dataset {fs.attrs['dataset']['name']} "
        f"--backbone {fs.attrs['backbone']['slug']} --split {fs.attrs['split']} --kind "
        f"{record.kind} --name {record.name} --force`."
    )


class _ChunkSource:
    """Reads a 1-D ``uint8`` array sequentially, one of its chunks in memory at a time."""

    def __init__(self, array: zarr.Array, damaged: Callable[[str, str], DamagedDataError]) -> None:
        self.array, self.size, self.step = array, int(array.shape[0]), int(array.chunks[0])
        self.pos, self.start, self.chunk = 0, 0, b""
        self.damaged = damaged

    def __call__(self, n: int) -> bytes:
        if self.pos >= self.size:
            return b""
        if not self.start <= self.pos < self.start + len(self.chunk):
            self.start = self.pos - self.pos % self.step
            try:
                self.chunk = self.array[self.start : self.start + self.step].tobytes()
            except DAMAGE as exc:
                why = f"does not decode ({type(exc).__name__}: {str(exc).splitlines()[0]})"
                raise self.damaged(str(self.start // self.step), why) from exc
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


def index_exists(fs: FeatureSet, name: str) -> bool:
    """Whether a complete index of that name is stored (a killed build's is not)."""
    return any(r.name == name for r in list_indexes(fs))
