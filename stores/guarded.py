"""Reading a feature set without ever taking damage for data.

A committed shard's object may be missing (zarr would read fill values: NaN features,
label -1) or damaged (a failed crc32c, a codec that cannot decode). :func:`check_intact`
finds missing objects with one listing per array, before any read; :class:`GuardedArray`
turns a damaged read into one :class:`~bob_cache.errors.DamagedDataError` that names the set,
the shard and ``bob-cache verify --repair``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from zarr.core.sync import sync

from bob_cache.errors import DamagedDataError

if TYPE_CHECKING:
    from bob_cache.stores.feature_set import FeatureSet

# What reading a damaged object raises: crc32c mismatch (ValueError), codecs' own errors.
DAMAGE = (ValueError, RuntimeError, EOFError, TypeError)


class GuardedArray:
    """A feature set's zarr array whose reads turn a damaged object into
    :class:`DamagedDataError` naming the shard; anything else passes through (``shape``,
    ``dtype``, ``ndim``, ...)."""

    def __init__(self, fs: FeatureSet, name: str) -> None:
        from bob_cache.stores.metadata_scan import METADATA_DAMAGE, damaged_metadata_error

        self._fs, self._name = fs, name
        try:
            self._array = fs.group[name]
        except METADATA_DAMAGE as exc:
            key = f"{fs.path}/{name}/zarr.json"
            reason = f"{type(exc).__name__}: {_first_line(exc)}"
            raise damaged_metadata_error(fs.location, [(key, reason)]) from exc

    def __getattr__(self, attr: str) -> Any:
        return getattr(self._array, attr)

    def __len__(self) -> int:
        return len(self._array)

    def __getitem__(self, key: Any) -> Any:
        try:
            return self._array[key]
        except DAMAGE as exc:
            raise self._locate(exc) from exc

    def get_orthogonal_selection(self, selection: Any) -> Any:
        try:
            return self._array.get_orthogonal_selection(selection)
        except DAMAGE as exc:
            raise self._locate(exc) from exc

    def _locate(self, exc: Exception) -> DamagedDataError:
        """Try each committed shard alone to name the damaged ones (only after a failure)."""
        fs, bad = self._fs, []
        for shard in fs.committed_shards():
            start, stop = fs.layout.shard_bounds(shard, fs.n_rows)
            try:
                self._array[start:stop]
            except DAMAGE:
                bad.append(shard)
        reason = f"'{self._name}' does not decode ({type(exc).__name__}: {_first_line(exc)})"
        return damage_error(fs, bad or [0], reason)


def damage_error(fs: FeatureSet, shards: Sequence[int], reason: str) -> DamagedDataError:
    """The error for damaged ``shards`` of ``fs``: what, where, and the repair."""
    first = shards[0]
    start, stop = fs.layout.shard_bounds(first, fs.n_rows)
    more = f" (and {len(shards) - 1} more shard(s))" if len(shards) > 1 else ""
    return DamagedDataError(
        f"Shard {first} (rows {start}-{stop - 1}){more} of feature set '{fs.path}' in "
        f"'{fs.location}' is damaged: {reason}. Nothing was read from it. Fix: "
        f"`bob-cache verify {fs.location} --repair`, then rerun the extraction command to "
        "recompute the damaged shards."
    )


def check_intact(fs: FeatureSet) -> None:
    """Refuse ``fs`` when a committed shard's object is missing: one listing per array.

    Raises:
        DamagedDataError: naming the first such shard.
    """
    committed = fs.committed_shards()
    if fs.format < 2 or not committed:
        return
    listed: dict[str, set[str]] = {}
    missing: dict[int, list[str]] = {}
    for shard in committed:
        start, stop = fs.layout.shard_bounds(shard, fs.n_rows)
        if stop <= start:  # an empty set's one shard stores no object
            continue
        for name, key in fs.object_keys(shard).items():
            prefix = key.rsplit("/c/", 1)[0] + "/c/"
            if prefix not in listed:
                listed[prefix] = set(_list(fs.group.store, prefix))
            if key not in listed[prefix]:
                missing.setdefault(shard, []).append(name)
    if missing:
        shards = sorted(missing)
        names = ", ".join(missing[shards[0]])
        raise damage_error(fs, shards, f"the stored object of {names} is missing")


def _first_line(exc: Exception) -> str:
    return str(exc).splitlines()[0] if str(exc) else "no details"


def _list(store: Any, prefix: str) -> list[str]:
    async def collect() -> list[str]:
        return [key async for key in store.list_prefix(prefix)]

    return sync(collect())
