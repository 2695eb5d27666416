"""Finding damaged metadata: a ``zarr.json`` that no longer parses.

zarr reads a hierarchy's metadata all at once, so one truncated ``zarr.json`` makes the
whole listing fail without naming the file. :func:`scan_hierarchy` walks the store one
folder at a time instead, parsing each node's metadata itself, and returns the feature-set
groups that are whole and every metadata file that is not (with why), so ``ls`` and
``verify`` list the rest and every other command names the damaged file.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from bob_cache.errors import DamagedDataError

METADATA = "zarr.json"
# What zarr raises reading a damaged metadata document.
METADATA_DAMAGE = (ValueError, KeyError, TypeError)


@dataclass
class Scan:
    """Feature-set groups whose metadata is whole, and the damaged metadata files."""

    sets: list[str] = field(default_factory=list)
    damaged: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)


def scan_hierarchy(store: Any, marker: str) -> Scan:
    """Walk ``store`` from its root: groups carrying ``marker`` are feature sets; their
    arrays' metadata is parsed too (a set with a damaged array is listed as damaged)."""
    scan = Scan()
    pending = [""]
    while pending:
        prefix = pending.pop()
        for child in sorted(_children(store, prefix)):
            path = f"{prefix}{child}"
            doc = _document(store, f"{path}/{METADATA}", scan)
            if doc is None or doc.get("node_type") != "group":
                continue
            if marker in (doc.get("attributes") or {}):
                if _arrays_whole(store, path, scan):
                    scan.sets.append(path)
            else:
                pending.append(f"{path}/")
    scan.sets.sort()
    return scan


def damaged_metadata_error(location: str, damaged: list[tuple[str, str]]) -> DamagedDataError:
    """One message naming the damaged metadata file(s) and what to do."""
    key, reason = damaged[0]
    group = key.rsplit("/", 1)[0]
    more = f" (and {len(damaged) - 1} more)" if len(damaged) > 1 else ""
    return DamagedDataError(
        f"The metadata file '{location.rstrip('/')}/{key}'{more} is damaged ({reason}). "
        f"`bob-cache ls {location}` and `bob-cache verify {location}` list the rest. Fix: "
        f"delete the feature set that holds it ('{_set_of(group)}') and rerun its extraction "
        "command (`bob-cache info` of another split of it shows the command)."
    )


def _set_of(group: str) -> str:
    """The feature-set group a metadata key belongs to (its array's parent, or itself)."""
    parts = group.split("/")
    return "/".join(parts[:4]) if len(parts) >= 4 else group


def _arrays_whole(store: Any, path: str, scan: Scan) -> bool:
    whole = True
    for child in _children(store, f"{path}/"):
        key = f"{path}/{child}/{METADATA}"
        if sync(store.exists(key)) and _document(store, key, scan) is None:
            whole = False
    return whole


def _document(store: Any, key: str, scan: Scan) -> dict[str, Any] | None:
    """The parsed metadata at ``key``: None when absent, or damaged (then recorded)."""
    data = sync(store.get(key, prototype=default_buffer_prototype()))
    if data is None:
        return None
    try:
        doc = json.loads(data.to_bytes())
        if not isinstance(doc, dict) or "node_type" not in doc:
            raise ValueError("not a Zarr v3 metadata document")
    except ValueError as exc:  # JSONDecodeError included
        scan.damaged.append((key, f"{type(exc).__name__}: {str(exc).splitlines()[0]}"))
        return None
    return doc


def _children(store: Any, prefix: str) -> list[str]:
    async def collect() -> list[str]:
        return [name async for name in store.list_dir(prefix)]

    return [c for c in sync(collect()) if c != METADATA]
