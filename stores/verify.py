"""``verify``: read every chunk of every feature set and report damage.

Damage is anything that would silently corrupt downstream results: an object that no
longer decodes or fails its crc32c, a committed shard with any array's object missing (zarr
would read fill values: NaN features, label -1), decoded values whose digest differs from
the one the shard's commit record holds, data that disagrees with itself, or row arrays of
the wrong shape. ``repair`` clears the commit records of damaged shards so that rerunning
the same ``bob-cache extract`` command recomputes exactly those. Sets written before
checksums existed are read the same way, and the report says they have none.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from zarr.core.sync import sync

from bob_cache.stores.checksums import array_digest, has_checksum
from bob_cache.stores.feature_set import ROW_ARRAYS, FeatureSet
from bob_cache.stores.feature_store import FeatureStore


@dataclass
class SetReport:
    """What verify found in one feature set."""

    group: str
    rows: int
    shards: int
    committed: int
    complete: bool
    damaged_shards: list[int] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    repaired: bool = False
    checksums: str = ""  # what protects the set: crc32c and/or shard digests, or none

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "ok": self.ok}


def verify_feature_set(fs: FeatureSet, *, repair: bool = False) -> SetReport:
    """Check one feature set chunk by chunk (see module docstring)."""
    layout, n = fs.layout, fs.n_rows
    committed = np.array([r is not None for r in fs.commits()], dtype=bool)
    report = SetReport(fs.path, n, len(committed), int(committed.sum()), bool(committed.all()))
    report.checksums = _protection(fs)
    for name, shape in (("features", (n, *fs.row_shape)), *((a, (n,)) for a in ROW_ARRAYS)):
        found = fs.array(name).shape  # labels may carry a label axis (multi-label sets)
        if found[: len(shape)] != shape or (name != "labels" and found != shape):
            report.problems.append(f"array '{name}' has shape {found}, expected {shape}")
    if report.problems:
        return report
    records = fs.commits()
    for shard in np.flatnonzero(committed):
        start, stop = layout.shard_bounds(int(shard), n)
        record = records[int(shard)] or {}
        problem = _missing_objects(fs, int(shard)) or _check_shard(fs, start, stop, record)
        if problem:
            report.damaged_shards.append(int(shard))
            report.problems.append(f"shard {shard} (rows {start}-{stop - 1}): {problem}")
    if repair and report.damaged_shards:
        fs.uncommit(report.damaged_shards)
        report.repaired = True
    return report


def verify_store(
    store: FeatureStore,
    *,
    group: str | None = None,
    split: str | None = None,
    repair: bool = False,
) -> list[SetReport]:
    """Verify every feature set (or the one ``group`` and ``split`` name)."""
    if group:
        return [verify_feature_set(store.get(group, split=split), repair=repair)]
    sets, damaged = store.scan()  # a damaged metadata file is reported, not a crash
    broken = [SetReport(key, 0, 0, 0, False, problems=[f"metadata does not parse: {why}"],
                        checksums="unknown") for key, why in damaged]  # fmt: skip
    return broken + [verify_feature_set(fs, repair=repair) for fs in sets]


def _missing_objects(fs: FeatureSet, shard: int) -> str:
    keys = fs.object_keys(shard) if fs.format >= 2 else {}
    missing = [name for name, key in keys.items() if not sync(fs.group.store.exists(key))]
    return f"committed but the stored object of {', '.join(missing)} is missing" if missing else ""


def _check_shard(fs: FeatureSet, start: int, stop: int, record: dict[str, Any]) -> str:
    try:  # the raw arrays: their own error says what failed
        features = fs.group["features"][start:stop]  # vectors, or grids of a dense set
        rows = {name: fs.group[name][start:stop] for name in ROW_ARRAYS}
    except Exception as exc:  # any decode/IO failure of a stored object is damage
        return f"unreadable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    expected = record.get("arrays") or {}
    changed = [k for k, v in {"features": features, **rows}.items()
               if k in expected and array_digest(v) != expected[k]]  # fmt: skip
    if changed:
        return f"decoded {', '.join(changed)} differ from the digest its commit record holds"
    valid = rows["valid"].astype(bool)
    if not np.isfinite(features[valid]).all():
        return "non-finite features in rows marked valid (missing or corrupt data)"
    if (rows["error"][valid] != "").any() or (rows["error"][~valid] == "").any():
        return "valid flags disagree with error messages"
    if (rows["ids"] == "").any():
        return "empty ids (missing row index)"
    return ""


def _protection(fs: FeatureSet) -> str:
    """``crc32c + shard digests``, one of them, or ``none`` (a set from before checksums)."""
    crc = all(has_checksum(fs.group[name]) for name in ("features", *ROW_ARRAYS))
    done = [r for r in fs.commits() if r is not None]
    digests = bool(done) and all("arrays" in r for r in done)
    parts = [p for p, on in (("crc32c", crc), ("shard digests", digests)) if on]
    return " + ".join(parts) or "none (written before checksums existed)"
