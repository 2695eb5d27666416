"""Warming a served index: the on-disk lists and the --rerank vector copy paged into the
process in the background when they fit in memory, skipped with the reason when they do not,
stoppable, a failure reported rather than raised, and the state in the service's /health."""

from __future__ import annotations

import errno
import mmap
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest

from bob_cache.pipelines.query import QueryConfig, Searcher
from bob_cache.pipelines.serve import create_app
from bob_cache.retrieval import ondisk, warm
from bob_cache.retrieval.warm import Region, Warmer
from tests.loadtest import serve_in_thread
from tests.pipelines.test_query_sharded import sharded  # noqa: F401  (the module fixture)


def searcher(store: Path, cache: Path, **extra) -> Searcher:
    return Searcher.open(QueryConfig(str(store), "toy", "model", index_cache=str(cache), **extra))


def resident(path: Path) -> int:
    """Bytes of ``path`` in this process's page tables (its mappings' RSS)."""
    maps = psutil.Process().memory_maps(grouped=True)
    return sum(m.rss for m in maps if Path(m.path) == Path(path).resolve())


def test_the_lists_and_the_vector_copy_are_paged_in_whole(
    sharded: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    s = searcher(sharded, tmp_path / "cache", rerank=50)
    warmer = s.warmer()
    lists, vectors = warmer.regions
    assert Path(lists.name) == s.index_folder / ondisk.LISTS_FILE
    assert lists.size == (s.index_folder / ondisk.LISTS_FILE).stat().st_size
    assert vectors.name == str(s.reranker.path) and vectors.size == s.reranker.vectors.nbytes
    before = resident(Path(vectors.name))
    assert before < vectors.size // 2  # nothing read yet: the rows are paged in on demand
    assert warmer.start().wait(30) and warmer.status()["done_bytes"] == warmer.total
    assert warmer.status()["how"] == "page tables"
    assert resident(Path(vectors.name)) >= vectors.size
    assert resident(Path(lists.name)) >= lists.size - mmap.PAGESIZE


def test_an_in_memory_index_and_a_set_too_big_for_memory_are_skipped_with_the_reason(
    sharded: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    big = searcher(sharded, tmp_path / "cache", rerank=50).warmer(available=10_000)
    big.start()
    assert big.state == "skipped" and big.done == 0
    assert "exceed 80% of the memory" in big.reason and "restart" in big.reason
    assert "(9.8 KiB)" in big.reason and "how" not in big.status()
    plain = Warmer([]).start()
    assert plain.state == "skipped" and "in-memory index" in plain.reason


def test_warming_stops_between_chunks_and_a_failed_madvise_is_reported(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    page = mmap.PAGESIZE
    block = mmap.mmap(-1, 8 * page)
    address = np.frombuffer(block, np.uint8).ctypes.data
    region = Region("anonymous", address, 8 * page, owner=block)
    monkeypatch.setattr(warm, "CHUNK", page)
    calls: list[int] = []
    warmer = Warmer([region], available=1 << 40)

    def one_then_stop(at: int, length: int, advice: int) -> int:
        calls.append(length)
        warmer._stop.set()
        return 0

    monkeypatch.setattr(warm, "_madvise", one_then_stop)
    warmer.start().wait(10)
    assert warmer.state == "stopped" and warmer.done == page and calls == [page]

    monkeypatch.setattr(warm, "_madvise", lambda *a: errno.ENOMEM)
    failed = Warmer([region], available=1 << 40).start()
    assert not failed.wait(10) and failed.state == "failed"
    assert "madvise on anonymous" in failed.reason and "served from disk" in failed.reason
    assert "--no-warm" in failed.reason

    def broken(*a: object) -> int:
        raise ValueError("not an OSError")

    monkeypatch.setattr(warm, "_madvise", broken)
    other = Warmer([region], available=1 << 40).start()
    assert not other.wait(10) and other.state == "failed" and "not an OSError" in other.reason


def test_a_second_start_does_not_page_in_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    block = mmap.mmap(-1, 4 * mmap.PAGESIZE)
    address = np.frombuffer(block, np.uint8).ctypes.data
    region = Region("anonymous", address, 4 * mmap.PAGESIZE, owner=block)
    w = Warmer([region], available=1 << 40)
    assert w.start().start().wait(10) and w.start().state == "warm"
    assert w.done == w.total


def test_an_older_kernel_gets_read_ahead_instead(monkeypatch: pytest.MonkeyPatch) -> None:
    block = mmap.mmap(-1, 4 * mmap.PAGESIZE)
    address = np.frombuffer(block, np.uint8).ctypes.data
    asked: list[int] = []

    def no_populate(at: int, length: int, advice: int) -> int:
        asked.append(advice)
        return errno.EINVAL if advice == warm.MADV_POPULATE_READ else 0

    monkeypatch.setattr(warm, "_madvise", no_populate)
    w = Warmer([Region("anonymous", address, 4 * mmap.PAGESIZE, owner=block)], available=1 << 40)
    assert w.start().wait(10) and w.status()["how"] == "read-ahead"
    assert asked == [warm.MADV_POPULATE_READ, warm.MADV_WILLNEED]


def test_the_service_warms_at_start_and_health_shows_it(
    sharded: Path,  # noqa: F811
    tmp_path: Path,
) -> None:
    s = searcher(sharded, tmp_path / "cache", rerank=50)
    with serve_in_thread(create_app(s, load_model=False, health_ttl=0)) as url:
        for _ in range(100):
            state = httpx.get(f"{url}/health").json()["warm"]
            if state["state"] != "warming":
                break
            time.sleep(0.1)
        assert state["state"] == "warm" and state["done_bytes"] == state["bytes"] > 0
    with serve_in_thread(create_app(s, load_model=False, health_ttl=0, warm=False)) as url:
        state = httpx.get(f"{url}/health").json()["warm"]
        assert state["state"] == "off" and "--no-warm" in state["reason"] and "how" not in state


def test_sizes_are_written_for_people() -> None:
    assert [warm.size_text(n) for n in (512, 1_636_800, 16_080_000_000)] == [
        "512 bytes", "1.6 MiB", "15.0 GiB",
    ]  # fmt: skip
