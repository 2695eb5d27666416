"""IVF indexes merged into on-disk inverted lists and searched memory-mapped.

Parts are built as the sharded build builds them: copies of one trained, empty IVF index, each
populated with a contiguous range of rows (ids = row numbers). The merged index must answer
exactly as the same vectors added to one index in memory, open in near-constant time and
memory, and never be taken for whole when a merge was killed or ran out of disk.
"""

from __future__ import annotations

import errno
import multiprocessing
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import faiss
import numpy as np
import pytest

from bob_cache.errors import IndexMismatchError, StoreFullError
from bob_cache.retrieval import ondisk
from bob_cache.retrieval.ivf_lists import is_lists_only, with_quantizer, without_quantizer
from bob_cache.retrieval.ondisk import (
    INDEX_FILE,
    LISTS_FILE,
    MARKER,
    OnDiskIndexError,
    PartMismatchError,
    cache_folder,
    is_complete,
    merge_to_disk,
    open_on_disk,
)
from bob_cache.stores import feature_set as feature_set_module
from bob_cache.stores.atomic import STAGE_PREFIX

D = 32
BOUNDS = ((0, 700), (700, 1500), (1500, 2400))


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, no ``except Exception`` catches it."""


def clustered(n: int, d: int = D, *, seed: int = 0, centers: int = 20) -> np.ndarray:
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, d)).astype(np.float32) * 4
    return c[rng.integers(0, centers, n)] + rng.standard_normal((n, d)).astype(np.float32)


def trained_bytes(factory: str, x: np.ndarray, *, metric: int = faiss.METRIC_L2) -> bytes:
    index = faiss.index_factory(x.shape[1], factory, metric)
    index.train(x)
    return faiss.serialize_index(index).tobytes()


def populated(trained: bytes, x: np.ndarray, start: int, stop: int) -> Any:
    index = faiss.deserialize_index(np.frombuffer(trained, np.uint8))
    index.add_with_ids(x[start:stop], np.arange(start, stop, dtype=np.int64))
    return index


def parts_of(trained: bytes, x: np.ndarray, bounds: tuple[tuple[int, int], ...] = BOUNDS) -> list:
    return [faiss.serialize_index(populated(trained, x, a, b)).tobytes() for a, b in bounds]


def answers(index: Any, q: np.ndarray, *, nprobe: int = 8, k: int = 10) -> tuple:
    faiss.extract_index_ivf(index).nprobe = nprobe
    return index.search(q, k)


@pytest.fixture(scope="module")
def data() -> np.ndarray:
    return clustered(2400)


@pytest.fixture(scope="module")
def pq(data: np.ndarray) -> tuple[bytes, list[bytes]]:
    trained = trained_bytes("IVF16,PQ8x4np", data)
    return trained, parts_of(trained, data)


def crash_at(monkeypatch: pytest.MonkeyPatch, step: str) -> None:
    def point(name: str) -> None:
        if name == step:
            raise Killed(step)

    monkeypatch.setattr(feature_set_module, "crash_point", point)


# --- equal answers ------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("factory", "metric"),
    [
        ("IVF16,Flat", faiss.METRIC_L2),
        ("IVF16,SQ8", faiss.METRIC_INNER_PRODUCT),
        ("IVF16,PQ8x4np", faiss.METRIC_L2),
    ],
)
def test_memory_mapped_search_equals_one_index_in_memory(
    tmp_path: Path, data: np.ndarray, factory: str, metric: int
) -> None:
    trained = trained_bytes(factory, data, metric=metric)
    folder = merge_to_disk(trained, parts_of(trained, data), tmp_path / "ix", name="k")
    merged = open_on_disk(folder)
    whole = populated(trained, data, 0, len(data))  # every vector added to one index
    q = clustered(50, seed=1)
    d_disk, i_disk = answers(merged, q)
    d_mem, i_mem = answers(whole, q)
    assert merged.ntotal == whole.ntotal == len(data)
    np.testing.assert_array_equal(i_disk, i_mem)
    np.testing.assert_array_equal(d_disk, d_mem)
    lists = faiss.downcast_InvertedLists(faiss.extract_index_ivf(merged).invlists)
    assert isinstance(lists, faiss.OnDiskInvertedLists) and lists.read_only


def test_a_moved_folder_opens_without_writing_to_stdout(
    tmp_path: Path, data: np.ndarray, pq: tuple[bytes, list[bytes]], capfd: Any
) -> None:
    folder = merge_to_disk(*pq, tmp_path / "ix", name="k")
    expected = answers(open_on_disk(folder), data[:20])
    moved = tmp_path / "elsewhere" / "ix"
    moved.parent.mkdir()
    os.replace(folder, moved)
    got = answers(open_on_disk(moved), data[:20])  # lists found beside the index file
    np.testing.assert_array_equal(got[1], expected[1])
    assert capfd.readouterr().out == ""  # FAISS's progress lines go to stderr (--json safe)


def test_merging_frees_the_parts_mappings(tmp_path: Path, pq: tuple[bytes, list[bytes]]) -> None:
    folder = merge_to_disk(*pq, tmp_path / "ix", name="k")
    maps = Path("/proc/self/maps").read_text()
    assert str(folder) not in maps  # part files deleted and unmapped: their disk space freed
    assert not list(folder.glob(f"{STAGE_PREFIX}*"))


def _rss() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _timed_open(folder: Path) -> float:
    started = time.perf_counter()
    open_on_disk(folder)
    return time.perf_counter() - started


def test_opening_maps_the_lists_instead_of_reading_them(tmp_path: Path) -> None:
    x = clustered(100_000, 64, seed=3)
    trained = trained_bytes("IVF64,Flat", x[:5000])
    halves = ((0, 50_000), (50_000, 100_000))
    big = merge_to_disk(trained, parts_of(trained, x, halves), tmp_path / "big", name="big")
    small = merge_to_disk(trained, parts_of(trained, x, ((0, 1000),)), tmp_path / "s", name="s")
    lists_bytes = (big / LISTS_FILE).stat().st_size
    assert lists_bytes >= 100_000 * 64 * 4
    before = _rss()
    index = open_on_disk(big)
    grown = _rss() - before
    assert index.ntotal == 100_000
    assert grown < lists_bytes / 10, (grown, lists_bytes)  # page cache, not a copy
    t_small = min(_timed_open(small) for _ in range(3))
    t_big = min(_timed_open(big) for _ in range(3))
    assert t_big < 10 * t_small + 0.02, (t_big, t_small)  # 100× the rows, not 100× the time


# --- bad input ----------------------------------------------------------------------------
def test_a_folder_without_its_marker_is_refused_with_the_fix(
    tmp_path: Path, pq: tuple[bytes, list[bytes]]
) -> None:
    folder = merge_to_disk(*pq, tmp_path / "ix", name="k")
    (folder / MARKER).unlink()
    assert not is_complete(folder)
    with pytest.raises(OnDiskIndexError, match="no complete.json.*delete the folder"):
        open_on_disk(folder)
    with pytest.raises(OnDiskIndexError, match="not a complete on-disk index"):
        open_on_disk(tmp_path / "never-built")


def test_a_truncated_lists_file_is_refused_before_it_is_mapped(
    tmp_path: Path, pq: tuple[bytes, list[bytes]]
) -> None:
    folder = merge_to_disk(*pq, tmp_path / "ix", name="k")
    size = (folder / LISTS_FILE).stat().st_size
    os.truncate(folder / LISTS_FILE, size // 2)  # mapped as it is, a search would SIGBUS
    with pytest.raises(OnDiskIndexError, match=rf"{size // 2} bytes, expected {size}.*Rebuild"):
        open_on_disk(folder)
    assert not is_complete(folder, name="k")
    merge_to_disk(*pq, folder, name="k")  # calling again rebuilds it
    assert open_on_disk(folder).ntotal == 2400


@pytest.mark.parametrize(
    ("other", "what"),
    [
        ("IVF32,PQ8x4np", "nlist is 32, expected 16"),
        ("IVF16,PQ4x4np", "code size is 2, expected 4"),
        ("IVF16,PQ8x4np", "trained codebooks"),  # same shapes, trained on other data
        ("slim", "trained codebooks"),  # the same, stored as its lists alone
        ("dim", "dim is 16, expected 32"),
    ],
)
def test_parts_of_another_trained_index_are_refused_before_merging(
    tmp_path: Path, data: np.ndarray, pq: tuple[bytes, list[bytes]], other: str, what: str
) -> None:
    trained, parts = pq
    if other == "dim":
        x = data[:, :16]
        other_trained = trained_bytes("IVF16,PQ8x4np", x)
    else:
        x = clustered(2400, seed=7)
        other_trained = trained_bytes("IVF16,PQ8x4np" if other == "slim" else other, x)
    stranger_index = populated(other_trained, x, 0, 700)
    if other == "slim":
        with without_quantizer(stranger_index):
            stranger = faiss.serialize_index(stranger_index).tobytes()
    else:
        stranger = faiss.serialize_index(stranger_index).tobytes()
    folder = tmp_path / "ix"
    with pytest.raises(PartMismatchError, match=f"Part 1 .*{what}.*rebuild the parts") as err:
        merge_to_disk(trained, [parts[0], stranger, parts[2]], folder, name="k")
    assert isinstance(err.value, IndexMismatchError)
    assert not (folder / MARKER).exists() and not (folder / LISTS_FILE).exists()
    assert not list(folder.glob(f"{STAGE_PREFIX}*"))  # nor its staging folder


@pytest.mark.parametrize("metric", [faiss.METRIC_L2, faiss.METRIC_INNER_PRODUCT])
def test_parts_stored_as_their_lists_alone_answer_as_whole_parts(
    tmp_path: Path, data: np.ndarray, metric: int
) -> None:
    """A part serialized without its coarse quantizer (the sharded build's format) is smaller
    by the quantizer, merges on disk into the same index, and read back into a copy of the
    trained index answers as the whole part does (L2: IVF-PQ's precomputed table too)."""
    trained = trained_bytes("IVF64,PQ8x4np", data, metric=metric)
    whole, slim = [], []
    for a, b in BOUNDS:
        index = populated(trained, data, a, b)
        whole.append(faiss.serialize_index(index).tobytes())
        with without_quantizer(index):
            slim.append(faiss.serialize_index(index).tobytes())
        assert faiss.extract_index_ivf(index).quantizer.ntotal == 64  # put back afterwards
    empty = populated(trained, data, 0, 0)  # kept alive while its quantizer is read
    quantizer = len(faiss.serialize_index(faiss.extract_index_ivf(empty).quantizer))
    for w, s in zip(whole, slim, strict=True):
        assert len(w) - len(s) >= quantizer - 64  # the quantizer's floats are gone
    q = clustered(30, seed=3)
    a = open_on_disk(merge_to_disk(trained, whole, tmp_path / "whole", name="k"))
    b = open_on_disk(merge_to_disk(trained, slim, tmp_path / "slim", name="k"))
    np.testing.assert_array_equal(answers(a, q)[1], answers(b, q)[1])
    template = faiss.deserialize_index(np.frombuffer(trained, np.uint8))
    flags = faiss.IO_FLAG_SKIP_PRECOMPUTE_TABLE
    read = faiss.deserialize_index(np.frombuffer(slim[1], np.uint8), flags)
    assert is_lists_only(read)
    part = with_quantizer(read, template)
    del read  # the copy owns the lists now
    expected = populated(trained, data, *BOUNDS[1])
    np.testing.assert_array_equal(answers(part, q)[1], answers(expected, q)[1])
    np.testing.assert_allclose(answers(part, q)[0], answers(expected, q)[0], rtol=1e-5)
    assert template.ntotal == 0  # cloned, not changed
    old = faiss.deserialize_index(np.frombuffer(whole[1], np.uint8), flags)
    assert with_quantizer(old, template) is old  # a part stored whole is read as it is


def test_a_populated_or_non_ivf_trained_index_is_refused(
    tmp_path: Path, data: np.ndarray, pq: tuple[bytes, list[bytes]]
) -> None:
    flat = faiss.serialize_index(faiss.IndexFlatL2(D)).tobytes()
    with pytest.raises(PartMismatchError, match="needs an IVF kind.*--kind ivfpq"):
        merge_to_disk(flat, pq[1], tmp_path / "a", name="k")
    full = faiss.serialize_index(populated(pq[0], data, 0, 10)).tobytes()
    with pytest.raises(PartMismatchError, match="trained and empty"):
        merge_to_disk(full, pq[1], tmp_path / "b", name="k")


def test_cache_folder_is_under_the_env_root_and_distinct_per_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv(ondisk.CACHE_ENV, raising=False)
    default = cache_folder("ivfpq~abc")
    assert default.parent == Path.home() / ".cache" / "bob-cache" / "indexes"
    assert default.name.startswith("ivfpq~abc-")
    monkeypatch.setenv(ondisk.CACHE_ENV, str(tmp_path))
    a, b = cache_folder("set1/ivfpq~abc"), cache_folder("set2/ivfpq~abc")
    assert a.parent == b.parent == tmp_path and a != b
    assert cache_folder("x", root=tmp_path / "r").parent == tmp_path / "r"
    with pytest.raises(OnDiskIndexError, match="non-empty record key"):
        cache_folder("")


# --- kills, full disks, concurrent merges -------------------------------------------------
STEPS = (
    "ondisk-part", "ondisk-merge", "ondisk-write", f"commit-{INDEX_FILE}",
    f"commit-{LISTS_FILE}", f"commit-{MARKER}",
)  # fmt: skip


@pytest.mark.parametrize("step", STEPS)
def test_a_kill_at_any_step_leaves_no_whole_looking_index_and_a_rerun_finishes(
    tmp_path: Path,
    data: np.ndarray,
    pq: tuple[bytes, list[bytes]],
    monkeypatch: pytest.MonkeyPatch,
    step: str,
) -> None:
    folder = tmp_path / "ix"
    crash_at(monkeypatch, step)
    with pytest.raises(Killed):
        merge_to_disk(*pq, folder, name="k")
    monkeypatch.undo()
    assert is_complete(folder) == (step == f"commit-{MARKER}")  # only once the marker is in
    merge_to_disk(*pq, folder, name="k")  # the rerun
    reference = merge_to_disk(*pq, tmp_path / "reference", name="k")
    np.testing.assert_array_equal(
        answers(open_on_disk(folder), data[:30])[1], answers(open_on_disk(reference), data[:30])[1]
    )
    assert not list(folder.glob(f"{STAGE_PREFIX}*"))


@pytest.mark.parametrize("step", ["ondisk-unmark", f"commit-{INDEX_FILE}"])
def test_a_kill_while_replacing_an_index_never_mixes_old_and_new_files(
    tmp_path: Path,
    data: np.ndarray,
    pq: tuple[bytes, list[bytes]],
    monkeypatch: pytest.MonkeyPatch,
    step: str,
) -> None:
    trained, parts = pq
    folder = merge_to_disk(trained, parts[:1], tmp_path / "ix", name="old")
    crash_at(monkeypatch, step)
    with pytest.raises(Killed):
        merge_to_disk(trained, parts, folder, name="new")
    monkeypatch.undo()
    with pytest.raises(OnDiskIndexError, match="no complete.json"):
        open_on_disk(folder)  # the old marker went before any old file was replaced
    merge_to_disk(trained, parts, folder, name="new")
    assert open_on_disk(folder).ntotal == 2400 and is_complete(folder, name="new")


def test_a_complete_index_is_returned_without_reading_the_parts(
    tmp_path: Path, pq: tuple[bytes, list[bytes]]
) -> None:
    folder = merge_to_disk(*pq, tmp_path / "ix", name="k")

    def untouchable() -> Iterator[bytes]:
        raise AssertionError("parts read again")
        yield b""

    before = (folder / LISTS_FILE).stat().st_mtime_ns
    assert merge_to_disk(pq[0], untouchable(), folder, name="k") == folder
    assert (folder / LISTS_FILE).stat().st_mtime_ns == before


def test_a_full_disk_while_writing_parts_is_reported_and_a_rerun_finishes(
    tmp_path: Path, pq: tuple[bytes, list[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    write_bytes = Path.write_bytes

    def full_disk(self: Path, data: Any) -> int:
        if self.name == "part-00001.faiss":
            raise OSError(errno.ENOSPC, "No space left on device")
        return write_bytes(self, data)

    folder = tmp_path / "ix"
    with (
        monkeypatch.context() as mp,
        pytest.raises(StoreFullError, match="No space left.*run the same command again"),
    ):
        mp.setattr(Path, "write_bytes", full_disk)
        merge_to_disk(*pq, folder, name="k")
    assert not is_complete(folder) and not (folder / LISTS_FILE).exists()
    assert not list(folder.glob(f"{STAGE_PREFIX}*"))  # the failed run's part files went too
    merge_to_disk(*pq, folder, name="k")
    assert open_on_disk(folder).ntotal == 2400
    assert not list(folder.glob(f"{STAGE_PREFIX}*"))


def test_too_little_free_space_is_refused_before_the_mapped_merge(
    tmp_path: Path, pq: tuple[bytes, list[bytes]], monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "ix"
    monkeypatch.setattr(ondisk, "_free_bytes", lambda path: 1000)
    with pytest.raises(
        StoreFullError, match=r"needs 28\.1 KiB free.*1000 bytes are.*BOB_CACHE_INDEX_CACHE"
    ):
        merge_to_disk(*pq, folder, name="k")
    assert not is_complete(folder) and not (folder / LISTS_FILE).exists()
    monkeypatch.undo()
    merge_to_disk(*pq, folder, name="k")
    assert is_complete(folder, name="k")


def _merge_in_process(trained: bytes, parts: list[bytes], folder: str, ready: Any) -> None:
    # each part takes a while, so that the two merges overlap unless one waits for the other
    feature_set_module.crash_point = lambda step: time.sleep(0.2 * (step == "ondisk-part"))
    ready.wait()  # both processes imported: start together
    merge_to_disk(trained, parts, Path(folder), name="k")


def test_two_processes_merging_into_one_folder_leave_one_whole_index(
    tmp_path: Path, data: np.ndarray, pq: tuple[bytes, list[bytes]]
) -> None:
    ctx = multiprocessing.get_context("spawn")
    ready = ctx.Barrier(2)
    folder = tmp_path / "ix"
    args = (*pq, str(folder), ready)
    procs = [ctx.Process(target=_merge_in_process, args=args) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    reference = merge_to_disk(*pq, tmp_path / "reference", name="k")
    np.testing.assert_array_equal(
        answers(open_on_disk(folder), data[:30])[1], answers(open_on_disk(reference), data[:30])[1]
    )
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [".lock", INDEX_FILE, LISTS_FILE, MARKER]
    )
    shutil.rmtree(reference)
