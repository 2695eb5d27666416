"""Whether the service's feature set and index are still intact in the store.

The service answers from what it loaded at start (the index, ids, labels, validity), but
reads stored features for queries by id, and a damaged store means its next start fails or
its answers drift from the data. :class:`Integrity` says so: a listing check (every
committed shard's objects and every index chunk present, one listing per array) at most
every ``ttl`` seconds, plus any damage a query's read met (a failed crc32c, an object that
does not decode). Damage, once found, is reported until the service restarts: the repair
re-extracts the damaged shards, and the index loaded at start then has to be rebuilt.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from zarr.core.sync import sync

from bob_cache.errors import BobCacheError, DamagedDataError
from bob_cache.stores.guarded import check_intact
from bob_cache.stores.index_store import INDEX_GROUP, index_damage

HEALTH_TTL = 10.0  # seconds between two listing checks


class Integrity:
    """Damage of a searcher's set or index: the first one found, or None while intact.

    Args:
        searcher: the served :class:`~bob_cache.pipelines.query.Searcher`.
        ttl: seconds a listing check's answer is reused.
    """

    def __init__(self, searcher: Any, *, ttl: float = HEALTH_TTL) -> None:
        self.searcher, self.ttl = searcher, ttl
        self.problem: str | None = None
        self._checked = -float("inf")
        self._lock = threading.Lock()

    def seen(self, exc: DamagedDataError) -> None:
        """Record damage a query met (the first one is kept)."""
        with self._lock:
            self.problem = self.problem or _restart(str(exc))

    def check(self) -> str | None:
        """The damage found so far, after a listing check when the last one is stale."""
        with self._lock:
            if self.problem is None and time.monotonic() - self._checked >= self.ttl:
                self._checked = time.monotonic()
                self.problem = self._listed()
            return self.problem

    def _listed(self) -> str | None:
        fs = self.searcher.fs
        try:
            check_intact(fs)
            if self.searcher.index_folder is not None:  # served from the local merged copy
                check_disk_index(self.searcher.index_folder)
            elif not self.searcher.exact:
                check_index_objects(fs, self.searcher.record)
        except DamagedDataError as exc:
            return _restart(str(exc))
        except (BobCacheError, OSError):  # the store cannot be listed now: not damage
            self._checked = -float("inf")  # try again on the next call
        return None


def check_index_objects(fs: Any, record: Any) -> None:
    """Refuse an index whose stored chunks are not all there (one listing).

    Raises:
        DamagedDataError: naming the index, the missing chunks and the rebuild.
    """
    array = fs.group[f"{INDEX_GROUP}/{record.key or record.name}/data"]
    n_chunks = -(-int(array.shape[0]) // int(array.chunks[0]))
    prefix = f"{array.path}/c/"
    store = fs.group.store

    async def collect() -> set[str]:
        return {key async for key in store.list_prefix(prefix)}

    found = sync(collect())
    missing = [i for i in range(n_chunks) if f"{prefix}{i}" not in found]
    if missing:
        raise index_damage(fs, record, ", ".join(map(str, missing[:5])), "is missing")


def check_disk_index(folder: Any) -> None:
    """Refuse a merged on-disk index whose files went missing or changed size.

    Raises:
        DamagedDataError: naming the folder and the fix.
    """
    from bob_cache.retrieval.ondisk import OnDiskIndexError, read_marker

    try:
        read_marker(folder)
    except OnDiskIndexError as exc:
        raise DamagedDataError(str(exc)) from exc


def _restart(message: str) -> str:
    return f"{message} Then restart the service (it serves what it loaded at start)."
