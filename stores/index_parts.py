"""A sharded index beside its feature set: a trained, empty index and its populated parts,
each a committed blob, and the reading API the serving side uses.

Inside the version group ``indexes/<name>~<version>`` (see :mod:`index_store`):

- attribute ``build``: the build's identity (feature key, shard generations, kind, params,
  metric, seed, part count), written when the group is created. Rerunning the same command
  finds the unfinished version by it (:func:`find_version`) and finishes it.
- ``trained``: the trained, empty FAISS index (coarse quantizer and codebooks), serialized
  as a chunked ``uint8`` array (crc32c per chunk, like ``data`` of a single index).
- ``parts/<k>``: the trained index with part ``k``'s rows added (a contiguous range of store
  shards, or the rows held out for tuning), serialized the same way but with an empty coarse
  quantizer in place of the trained one, which every part shares
  (:mod:`bob_cache.retrieval.ivf_lists`; parts of earlier builds hold it and read as well).
- each blob's ``commit`` attribute, written after its bytes: what it holds (its ``plan``: the
  store shards and their generations, or the row numbers), ``rows`` and ``bytes``. A blob
  without one is a killed writer's: nobody reads it, and the next writer of it deletes it.
- the group's ``record`` (``layout="sharded"``, ``parts`` = the parts' commits) and
  ``complete``, written last of all: until then no reader takes the version for an index.

Reading (for query/serve and the on-disk merge): :func:`trained_reader` and
:func:`part_reader` stream one blob (``read(n) → bytes``, for ``faiss.PyCallbackIOReader``),
:func:`read_trained` and :func:`iter_parts` give whole blobs' bytes (one part in memory at a
time, e.g. for ``faiss.deserialize_index``), :func:`load_trained` the trained index,
:func:`load_part` one part as a FAISS index (its lists in a copy of the trained index), and
:func:`load_merged_in_memory` the whole index in memory (parts merged into the trained index
with ``merge_from``), for small sharded indexes.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import zarr

from bob_cache.errors import DamagedDataError
from bob_cache.hashing import canonical_json
from bob_cache.stores import feature_set as feature_set_module
from bob_cache.stores.feature_set import FeatureSet
from bob_cache.stores.index_store import (
    INDEX_GROUP,
    VERSION_SEP,
    IndexRecord,
    _ChunkSink,
    _ChunkSource,
    _versions_of,
    blob_array,
    index_damage,
    prune_versions,
)
from bob_cache.stores.location import translate_write_errors

TRAINED = "trained"
PARTS = "parts"
COMMIT = "commit"
Sink = Callable[[bytes], int]


# --- versions -------------------------------------------------------------------------------
def find_version(fs: FeatureSet, name: str, build: dict[str, Any]) -> str | None:
    """The key of an unfinished version of index ``name`` built as ``build`` (None: none)."""
    if INDEX_GROUP not in fs.group:
        return None
    parent = fs.group[INDEX_GROUP]
    wanted = canonical_json(build)
    for key in sorted(_versions_of(parent, name)):
        attrs = parent[key].attrs
        if not attrs.get("complete") and canonical_json(attrs.get("build")) == wanted:
            return key
    return None


def create_version(fs: FeatureSet, name: str, build: dict[str, Any]) -> str:
    """A new, empty version group of index ``name`` recording ``build``; returns its key."""
    key = f"{name}{VERSION_SEP}{uuid.uuid4().hex[:12]}"
    with translate_write_errors(fs.location, f"index '{name}' of '{fs.path}'"):
        fs.group.require_group(INDEX_GROUP).create_group(key, attributes={"build": build})
    feature_set_module.crash_point("index-version")
    return key


def version_group(fs: FeatureSet, key: str) -> zarr.Group:
    return fs.group[f"{INDEX_GROUP}/{key}"]


def commit_record(fs: FeatureSet, record: IndexRecord) -> None:
    """Write ``record`` into its version group (marking it complete), then remove the other
    versions of its name. An update rewrites the record in place: a reader sees the old
    record (whose parts are all still there) or the new one."""
    with translate_write_errors(fs.location, f"index '{record.name}' of '{fs.path}'"):
        group = version_group(fs, record.key)
        group.attrs.update({"record": record.to_dict(), "complete": True})
        feature_set_module.crash_point("index-record")
    prune_versions(fs, record)


# --- blobs ----------------------------------------------------------------------------------
def blob_commit(parent: zarr.Group, name: str) -> dict[str, Any] | None:
    """The commit of blob ``name`` in ``parent`` (None: absent or uncommitted)."""
    if name not in parent:
        return None
    return parent[name].attrs.get(COMMIT)


def part_commits(fs: FeatureSet, key: str) -> dict[int, dict[str, Any]]:
    """``{k: commit}`` of the committed parts in version ``key``."""
    group = version_group(fs, key)
    if PARTS not in group:
        return {}
    parts = group[PARTS]
    found = {int(name): parts[name].attrs.get(COMMIT) for name, _ in parts.arrays()}
    return {k: c for k, c in sorted(found.items()) if c is not None}


def write_blob(
    fs: FeatureSet,
    parent: zarr.Group,
    name: str,
    write: Callable[[Sink], None],
    *,
    commit: dict[str, Any],
    step: str,
) -> dict[str, Any]:
    """Store blob ``name`` in ``parent``: a leftover is deleted, ``write(sink)`` streams the
    bytes in, and the commit (with ``bytes`` added) is written last; returns the commit.

    Crash points ``<step>-clear``, ``<step>-data``, ``<step>-commit`` follow each step.
    """
    with translate_write_errors(fs.location, f"{parent.path}/{name} of '{fs.path}'"):
        if name in parent:
            del parent[name]
        feature_set_module.crash_point(f"{step}-clear")
        sink = _ChunkSink(blob_array(parent, name))
        write(sink)
        sink.close()
        feature_set_module.crash_point(f"{step}-data")
        done = {**commit, "bytes": sink.total}
        parent[name].attrs.update({COMMIT: done})
        feature_set_module.crash_point(f"{step}-commit")
    return done


def delete_blob(fs: FeatureSet, parent: zarr.Group, name: str) -> None:
    with translate_write_errors(fs.location, f"{parent.path}/{name} of '{fs.path}'"):
        if name in parent:
            del parent[name]


def drop_stray_parts(fs: FeatureSet, record: IndexRecord) -> None:
    """Delete the parts of ``record``'s version that its record does not list (what a killed
    update left)."""
    group = version_group(fs, record.key)
    if PARTS not in group:
        return
    listed = {str(p["part"]) for p in record.parts}
    for name, _ in list(group[PARTS].arrays()):
        if name not in listed:
            delete_blob(fs, group[PARTS], name)


# --- reading (the serving side's API) -------------------------------------------------------
def trained_reader(fs: FeatureSet, record: IndexRecord) -> Callable[[int], bytes]:
    """``read(n) → bytes`` of the trained, empty index of a sharded ``record``."""
    return _reader(fs, record, TRAINED)


def part_reader(fs: FeatureSet, record: IndexRecord, part: int) -> Callable[[int], bytes]:
    """``read(n) → bytes`` of part ``part`` (a number in ``record.parts``)."""
    return _reader(fs, record, part_path(part))


def read_trained(fs: FeatureSet, record: IndexRecord) -> bytes:
    """The serialized trained index (``faiss.deserialize_index`` takes it as a uint8 array)."""
    return _read_all(trained_reader(fs, record))


def iter_parts(fs: FeatureSet, record: IndexRecord) -> Iterator[tuple[int, bytes]]:
    """``(k, serialized part)`` for each part of ``record`` in order, one in memory at a time.

    Merging them in this order (``merge_from`` or ``merge_ondisk``) gives every inverted list
    its ids in the order a single-process build adds them.
    """
    for part in part_numbers(record):
        yield part, _read_all(part_reader(fs, record, part))


def part_numbers(record: IndexRecord) -> list[int]:
    return [int(p["part"]) for p in record.parts]


def load_part(fs: FeatureSet, record: IndexRecord, part: int, trained: Any) -> Any:
    """Part ``part`` as a FAISS index: its lists in a copy of ``trained`` (the empty trained
    index, e.g. from :func:`load_trained`)."""
    from bob_cache.retrieval import faiss_ops, ivf_lists

    stored = faiss_ops.read_index(part_reader(fs, record, part), ivf_lists.read_flags())
    return ivf_lists.with_quantizer(stored, trained)


def load_trained(fs: FeatureSet, record: IndexRecord) -> Any:
    """The trained, empty index of a sharded ``record`` as a FAISS index."""
    from bob_cache.retrieval import faiss_ops

    return faiss_ops.read_index(trained_reader(fs, record))


def part_path(part: int) -> str:
    return f"{PARTS}/{part}"


def load_merged_in_memory(fs: FeatureSet, record: IndexRecord) -> Any:
    """The whole sharded index in memory: each part's inverted lists merged, in order, into
    the trained index (``IndexIVF.merge_from``); one part is read at a time besides it.

    Equal to the index a single-process build of the same parts would hold. Memory is the
    whole index: for indexes too large for that, serve the parts from disk instead.
    """
    from bob_cache.extras import import_faiss

    index = load_trained(fs, record)
    template = import_faiss().clone_index(index)  # stays empty: each part's lists go in a copy
    for part in part_numbers(record):
        index.merge_from(load_part(fs, record, part, template), 0)
    return index


def _reader(fs: FeatureSet, record: IndexRecord, path: str) -> Callable[[int], bytes]:
    return blob_reader(
        fs, record.key, path,
        damaged=lambda chunks, why: index_damage(fs, record, f"{path}:{chunks}", why),
    )  # fmt: skip


def blob_reader(
    fs: FeatureSet,
    key: str,
    path: str,
    *,
    damaged: Callable[[str, str], DamagedDataError] | None = None,
) -> Callable[[int], bytes]:
    """``read(n) → bytes`` of blob ``path`` (``trained``, ``parts/<k>``) of version ``key``,
    finished or not (the build reads its own blobs before the record exists)."""
    damaged = damaged or (lambda chunks, why: _build_damage(fs, key, f"{path}:{chunks}", why))
    full = f"{INDEX_GROUP}/{key}/{path}"
    if full not in fs.group:
        raise damaged("*", "is missing")
    return _ChunkSource(fs.group[full], damaged)


def load_blob(fs: FeatureSet, key: str, path: str, flags: int = 0) -> Any:
    """Blob ``path`` of version ``key`` as a FAISS index (as stored: a part holds its lists
    alone, see :mod:`bob_cache.retrieval.ivf_lists`)."""
    from bob_cache.retrieval import faiss_ops

    return faiss_ops.read_index(blob_reader(fs, key, path), flags)


def _build_damage(fs: FeatureSet, key: str, chunks: str, why: str) -> DamagedDataError:
    return DamagedDataError(
        f"Index version '{key}' of feature set '{fs.path}' in '{fs.location}' is damaged: the "
        f"stored object of its chunk(s) {chunks} {why}. Fix: rebuild it with the same `bob-cache "
        "index build` command and --force."
    )


def _read_all(read: Callable[[int], bytes]) -> bytes:
    pieces = []
    while piece := read(1 << 24):
        pieces.append(piece)
    return b"".join(pieces)
