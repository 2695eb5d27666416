"""IVF indexes served from local disk: inverted lists merged into one memory-mapped file.

A sharded build leaves one trained, empty IVF index and many populated parts (the same
quantizer, ids = row numbers). :func:`merge_to_disk` merges the parts' inverted lists into one
``lists.ivfdata`` file with FAISS's ``merge_ondisk`` (``OnDiskInvertedLists``; each part read
memory-mapped, one part's bytes in memory at a time) and writes ``index.faiss``, which holds
the quantizer and the lists' offsets and names the ``.ivfdata`` file. :func:`open_on_disk`
maps the lists read-only: opening reads only ``index.faiss`` (O(nlist)), and the memory a
search uses is the page cache, shared by every process serving the same folder.

A folder is an index only once its completion marker (``complete.json``, written last) is
there. Files are built in a hidden staging folder inside the destination, synced, and renamed
into place; a previous index's marker is removed before its files are replaced. A kill at any
step, or a full disk, leaves no marker over a half index, and calling :func:`merge_to_disk`
again finishes the work. The cache root is ``$BOB_CACHE_INDEX_CACHE`` (default
``~/.cache/bob-cache/indexes``), see :func:`cache_folder`.
"""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import hashlib
import json
import os
import re
import shutil
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from bob_cache.errors import IndexMismatchError, StoreError, StoreFullError
from bob_cache.extras import import_faiss
from bob_cache.provenance import utc_now
from bob_cache.retrieval.warm import Region
from bob_cache.stores.atomic import (
    STAGE_PREFIX,
    crash_point,
    full_disk_is_reported,
    remove_leftovers,
    start_staging,
)
from bob_cache.units import size_text

CACHE_ENV = "BOB_CACHE_INDEX_CACHE"
INDEX_FILE = "index.faiss"
LISTS_FILE = "lists.ivfdata"
MARKER = "complete.json"
LOCK = ".lock"
ONDISK_FORMAT = 1
_HEADROOM = 1.02  # free space wanted over the merged lists' exact size
_REBUILD = "Rebuild it (rerun the command that merged it) or delete the folder"


class OnDiskIndexError(StoreError, ValueError):
    """A merged on-disk index folder that is incomplete, damaged or not an index."""


class PartMismatchError(IndexMismatchError):
    """A populated part that was not built from the trained index it is merged into."""


def default_cache_root() -> Path:
    """``$BOB_CACHE_INDEX_CACHE``, else ``~/.cache/bob-cache/indexes``."""
    env = os.environ.get(CACHE_ENV)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "bob-cache" / "indexes"


def cache_folder(record_key: str, *, root: Path | None = None) -> Path:
    """The local folder that holds the merged index of ``record_key``.

    Pass a key unique across stores (e.g. ``f"{record.feature_key}/{record.key}"``): the
    folder name is its readable part plus a digest of the whole key.
    """
    if not record_key:
        raise OnDiskIndexError("An on-disk index needs a non-empty record key.")
    slug = re.sub(r"[^A-Za-z0-9._~-]+", "_", record_key).strip("._")[:80] or "index"
    digest = hashlib.sha256(record_key.encode()).hexdigest()[:16]
    return (root or default_cache_root()) / f"{slug}-{digest}"


# --- merging ------------------------------------------------------------------------------
@full_disk_is_reported("a merged on-disk index", "run the same command again")
def merge_to_disk(trained: bytes, parts: Iterable[bytes], folder: Path, *, name: str) -> Path:
    """Merge populated IVF ``parts`` over the ``trained`` (empty) index into ``folder``.

    Args:
        trained: the serialized trained, empty IVF index.
        parts: serialized populated IVF indexes (same quantizer and codes; ids = row numbers),
            consumed one at a time.
        folder: the destination (see :func:`cache_folder`); created if needed.
        name: the index record key, written in the completion marker. A complete folder of
            the same name is returned as it is (``parts`` left unread).

    Returns:
        ``folder``, ready for :func:`open_on_disk`.

    Raises:
        PartMismatchError: a part of another dimension, list count, code size or training.
        StoreFullError: not enough free disk (nothing is left under the final names).
    """
    faiss = import_faiss()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    with _locked(folder):
        if _is_current(folder, name):
            remove_leftovers(folder, STAGE_PREFIX)  # what a merge killed at its end left
            return folder
        stage = start_staging(folder)  # removes what a killed merge left behind
        try:
            _merge_in(faiss, stage, trained, parts, folder=folder, name=name)
        except Exception:  # an error, not a kill: the staging folder goes now
            shutil.rmtree(stage, ignore_errors=True)
            raise
    return folder


def _merge_in(
    faiss: Any, stage: Path, trained: bytes, parts: Iterable[bytes], *, folder: Path, name: str
) -> None:
    """Merge in ``stage`` and commit to ``folder`` (see :func:`merge_to_disk`)."""
    index = _trained_ivf(faiss, trained)
    names, digests = _write_parts(faiss, index, parts, stage)
    _check_free_space(faiss, names, stage)
    _merge_ondisk(faiss, index, names, stage / LISTS_FILE)
    crash_point("ondisk-merge")
    ondisk = faiss.downcast_InvertedLists(faiss.extract_index_ivf(index).invlists)
    lists = ondisk.filename = str((folder / LISTS_FILE).absolute())  # where it is read
    data = faiss.serialize_index(index)
    ntotal, dim = int(index.ntotal), int(index.d)
    del index, ondisk  # unmaps the lists: their pages are flushed by the fsync below
    for path in names:
        path.unlink()
    (stage / INDEX_FILE).write_bytes(data.tobytes())
    marker = _marker(name, stage, digests, ntotal=ntotal, dim=dim, lists=lists)
    (stage / MARKER).write_text(json.dumps(marker, indent=1), encoding="utf-8")
    for path in (stage / INDEX_FILE, stage / LISTS_FILE, stage / MARKER):
        _fsync(path)
    crash_point("ondisk-write")
    _commit(stage, folder)


def _merge_ondisk(faiss: Any, index: Any, parts: list[Path], ivfdata: Path) -> None:
    """``faiss.contrib.ondisk.merge_ondisk``, with the parts' lists freed afterwards.

    The contrib function disowns each part's memory-mapped lists, so their mappings (and the
    disk space of the deleted part files) stay held until the process exits; here the parts
    stay owned and alive until ``merge_from_multiple`` has copied them.
    """
    opened = [faiss.read_index(str(p), _part_flags(faiss)) for p in parts]
    lists = faiss.InvertedListsPtrVector()
    for part in opened:
        lists.push_back(faiss.extract_index_ivf(part).invlists)
    ivf = faiss.extract_index_ivf(index)
    merged = faiss.OnDiskInvertedLists(ivf.nlist, ivf.code_size, str(ivfdata))
    with _c_stdout_to_stderr():  # OnDiskInvertedLists prints "resizing ..." on stdout
        ntotal = merged.merge_from_multiple(lists.data(), lists.size(), False)
    index.ntotal = ivf.ntotal = ntotal
    ivf.replace_invlists(merged, True)
    merged.this.disown()  # the index owns (and frees) the merged lists
    del lists, opened


def _trained_ivf(faiss: Any, trained: bytes) -> Any:
    """The trained, empty IVF index serialized in ``trained``."""
    index = faiss.deserialize_index(np.frombuffer(trained, dtype=np.uint8))
    try:
        ivf = faiss.extract_index_ivf(index)
    except RuntimeError as exc:
        raise PartMismatchError(
            f"An on-disk index needs an IVF kind (ivf, ivfsq, ivfpq); got {type(index).__name__}. "
            "Build the index with --kind ivfpq, ivfsq or ivf."
        ) from exc
    if not ivf.is_trained or index.ntotal:
        raise PartMismatchError(
            f"The trained index must be trained and empty (is_trained={ivf.is_trained}, "
            f"ntotal={index.ntotal}). Pass the index as it was before any part was added."
        )
    if "IVFPQR" in type(ivf).__name__:
        raise PartMismatchError("IVFPQR indexes cannot be merged on disk. Use --kind ivfpq.")
    return index


def _write_parts(
    faiss: Any, trained: Any, parts: Iterable[bytes], stage: Path
) -> tuple[list[Path], list[dict[str, Any]]]:
    """Write each part into ``stage`` and check it against ``trained`` (memory-mapped)."""
    expected = _fingerprint(faiss, trained)
    names, digests = [], []
    for i, part in enumerate(parts):
        path = stage / f"part-{i:05d}.faiss"
        path.write_bytes(part)
        index = faiss.read_index(str(path), _part_flags(faiss))
        _check_part(faiss, index, expected, i)
        digests.append({"sha256": hashlib.sha256(part).hexdigest(), "rows": int(index.ntotal)})
        names.append(path)
        del index, part
        crash_point("ondisk-part")
    if not names:
        raise PartMismatchError("No populated parts to merge. Build the index's parts first.")
    return names, digests


def _part_flags(faiss: Any) -> int:
    """Parts are memory-mapped, and IVF-PQ's precomputed table (made from the quantizer,
    which a part stored as lists alone lacks) is not computed for them."""
    return int(faiss.IO_FLAG_MMAP | faiss.IO_FLAG_SKIP_PRECOMPUTE_TABLE)


def _fingerprint(faiss: Any, index: Any) -> dict[str, Any]:
    """What a part must share with the trained index: layout and every trained array (the
    coarse quantizer too, unless the part was stored as its lists alone: see
    :mod:`bob_cache.retrieval.ivf_lists`)."""
    from bob_cache.retrieval.ivf_lists import is_lists_only

    ivf = faiss.downcast_index(faiss.extract_index_ivf(index))  # IndexIVFPQ, not IndexIVF
    codebooks = []
    if isinstance(ivf, faiss.IndexIVFPQ):
        codebooks.append(faiss.vector_to_array(ivf.pq.centroids))
    if isinstance(ivf, faiss.IndexIVFScalarQuantizer):
        codebooks.append(faiss.vector_to_array(ivf.sq.trained))
    codes = hashlib.sha256(b"".join(np.asarray(a).tobytes() for a in codebooks)).hexdigest()
    quantizer = None if is_lists_only(index) else faiss.serialize_index(ivf.quantizer)
    return {
        "type": type(ivf).__name__, "dim": int(ivf.d), "nlist": int(ivf.nlist),
        "code size": int(ivf.code_size), "metric": int(ivf.metric_type), "training": codes,
        "quantizer": None if quantizer is None else hashlib.sha256(quantizer).hexdigest(),
    }  # fmt: skip


def _check_part(faiss: Any, index: Any, expected: dict[str, Any], i: int) -> None:
    try:
        found = _fingerprint(faiss, index)
    except RuntimeError as exc:
        raise PartMismatchError(
            f"Part {i} is not an IVF index ({type(index).__name__}). Rebuild the parts from "
            "the trained index."
        ) from exc
    for key, want in expected.items():
        if key == "quantizer" and found[key] is None:
            continue  # stored as its lists alone: the trained index brings the quantizer
        if found[key] != want:
            what = {"training": "trained codebooks", "quantizer": "coarse quantizer"}.get(key, key)
            raise PartMismatchError(
                f"Part {i} does not fit the trained index: its {what} is {found[key]}, "
                f"expected {want}. Every part must be built by adding vectors to a copy of "
                "the same trained index; rebuild the parts (or the whole index)."
            )


def _check_free_space(faiss: Any, parts: list[Path], stage: Path) -> None:
    """Refuse before merging when the merged lists would not fit: OnDiskInvertedLists writes
    them through a memory map, where a full disk is a SIGBUS, not an error."""
    need = 0
    for path in parts:
        ivf = faiss.extract_index_ivf(faiss.read_index(str(path), _part_flags(faiss)))
        need += int(ivf.ntotal) * (int(ivf.code_size) + 8)  # codes + int64 ids
    free = _free_bytes(stage)
    if need * _HEADROOM > free:
        raise StoreFullError(
            f"Merging needs {size_text(need)} free on {stage.parent} and {size_text(free)} are. "
            "Nothing was left under the index's final names. Free some space, or point "
            f"${CACHE_ENV} at a larger disk, then run the same command again."
        )


def _free_bytes(path: Path) -> int:
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _marker(
    name: str, stage: Path, parts: list[dict[str, Any]], *, ntotal: int, dim: int, lists: str
) -> dict[str, Any]:
    files = {f: (stage / f).stat().st_size for f in (INDEX_FILE, LISTS_FILE)}
    return {
        "format": ONDISK_FORMAT, "name": name, "ntotal": ntotal, "dim": dim, "parts": parts,
        "bytes": files, "lists": lists, "created": utc_now(),
    }  # fmt: skip


def _commit(stage: Path, folder: Path) -> None:
    """Rename the staged files into ``folder``, the marker last; any old marker goes first."""
    old = folder / MARKER
    if old.exists():
        old.unlink()
        _fsync(folder)
        crash_point("ondisk-unmark")
    for name in (INDEX_FILE, LISTS_FILE):
        os.replace(stage / name, folder / name)
        crash_point(f"commit-{name}")
    _fsync(folder)
    os.replace(stage / MARKER, folder / MARKER)
    _fsync(folder)
    crash_point(f"commit-{MARKER}")
    shutil.rmtree(stage, ignore_errors=True)


def _is_current(folder: Path, name: str) -> bool:
    """Whether ``folder`` already holds the complete, undamaged index ``name``."""
    try:
        return read_marker(folder)["name"] == name
    except OnDiskIndexError:
        return False


# --- opening ------------------------------------------------------------------------------
def read_marker(folder: Path) -> dict[str, Any]:
    """The completion marker of ``folder``, after checking its files are whole.

    Raises:
        OnDiskIndexError: no marker (an unfinished merge), or a file missing or truncated.
    """
    folder = Path(folder)
    try:
        marker = json.loads((folder / MARKER).read_text(encoding="utf-8"))
        sizes = {f: int(marker["bytes"][f]) for f in (INDEX_FILE, LISTS_FILE)}
    except FileNotFoundError:
        raise OnDiskIndexError(
            f"'{folder}' is not a complete on-disk index (no {MARKER}: its merge did not "
            f"finish). {_REBUILD}."
        ) from None
    except (ValueError, KeyError, TypeError) as exc:
        raise OnDiskIndexError(f"'{folder / MARKER}' is malformed ({exc}). {_REBUILD}.") from None
    for file, size in sizes.items():
        found = (folder / file).stat().st_size if (folder / file).is_file() else None
        if found != size:
            raise OnDiskIndexError(
                f"'{folder / file}' is {'missing' if found is None else f'{found} bytes'}, "
                f"expected {size} bytes (truncated or replaced). {_REBUILD}."
            )
    return marker


def is_complete(folder: Path, *, name: str | None = None) -> bool:
    """Whether ``folder`` holds a complete on-disk index (of record key ``name``, if given)."""
    try:
        marker = read_marker(folder)
    except OnDiskIndexError:
        return False
    return name is None or marker["name"] == name


def open_on_disk(folder: Path) -> Any:
    """The merged index in ``folder``, its lists memory-mapped read-only.

    Opening reads ``index.faiss`` only (quantizer and list offsets): its time and memory do
    not grow with the number of vectors; searches page the lists in through the page cache.

    Raises:
        OnDiskIndexError: an unfinished, truncated or unreadable index folder.
    """
    faiss = import_faiss()
    folder = Path(folder)
    marker = read_marker(folder)
    path, flags = folder / INDEX_FILE, faiss.IO_FLAG_READ_ONLY
    lists = str((folder / LISTS_FILE).absolute())
    try:
        if marker.get("lists") == lists:
            index = faiss.read_index(str(path), flags)
        else:  # the folder was moved: FAISS finds the lists beside the index file (and says so)
            with _c_stdout_to_stderr():
                index = faiss.read_index(str(path), flags | faiss.IO_FLAG_ONDISK_SAME_DIR)
    except RuntimeError as exc:
        raise OnDiskIndexError(f"'{path}' cannot be read ({exc}). {_REBUILD}.") from None
    if int(index.ntotal) != int(marker["ntotal"]):
        raise OnDiskIndexError(
            f"'{path}' holds {index.ntotal} vectors, its marker says {marker['ntotal']}. "
            f"{_REBUILD}."
        )
    return index


def mapped_lists(index: Any) -> Region | None:
    """The memory-mapped inverted lists of an index from :func:`open_on_disk` (None when its
    lists are in memory), for :class:`~bob_cache.retrieval.warm.Warmer`."""
    faiss = import_faiss()
    ivf = faiss.try_extract_index_ivf(index)
    lists = faiss.downcast_InvertedLists(ivf.invlists) if ivf is not None else None
    if not isinstance(lists, faiss.OnDiskInvertedLists) or lists.ptr is None:
        return None
    return Region(lists.filename, int(lists.ptr), int(lists.totsize), owner=index)


# --- small helpers ------------------------------------------------------------------------
@contextlib.contextmanager
def _locked(folder: Path) -> Iterator[None]:
    """One merge per folder at a time (a second waits, then finds the index complete)."""
    with open(folder / LOCK, "a+b") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


@contextlib.contextmanager
def _c_stdout_to_stderr() -> Iterator[None]:
    """Send what C code prints on stdout to stderr meanwhile (FAISS's on-disk lists print
    progress lines that would corrupt a command's ``--json`` output)."""
    libc = ctypes.CDLL(None)
    sys.stdout.flush()
    libc.fflush(None)
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        yield
    finally:
        libc.fflush(None)
        os.dup2(saved, 1)
        os.close(saved)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
