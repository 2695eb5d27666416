"""Fitted OOD detector state persisted beside the feature set it was fitted on.

A detector lives in the ID training split's feature-set group at ``detectors/<name>``,
``name`` being ``<detector>-<hash>`` of what changes its numbers (detector, options, feature
key, split, and for detectors that score through a head, the head's name). Its numpy state
(means, covariance, principal space, the kNN bank) are plain Zarr arrays; scalars and the
:class:`DetectorRecord` (what it was fitted from, with the shard generations it covers) are
the group's attributes, written last. A killed fit leaves a group without a record: never
reused, and replaced by the next fit. A detector whose shards were recomputed since is stale
and refitted, as a head would be refused.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import zarr

from bob_cache.errors import DetectorDamagedError
from bob_cache.stores import feature_set as feature_set_module
from bob_cache.stores.feature_set import FeatureSet
from bob_cache.stores.head_store import stale_reason
from bob_cache.stores.location import translate_write_errors

DETECTOR_GROUP = "detectors"
DETECTOR_FORMAT = 1
BANK_CHUNK_ROWS = 65_536


@dataclass
class DetectorRecord:
    """What a stored detector is and what it was fitted from (its attributes)."""

    name: str
    detector: str
    options: dict[str, Any]
    head: str  # the head it scores through ('' when it uses none)
    feature_key: str
    feature_set: str
    generations: dict[str, dict[str, str]]  # per set it was fitted from: shard → generation
    sets_created: dict[str, str]
    n_fit: int
    dim: int
    scalars: dict[str, Any] = field(default_factory=dict)  # the state's non-array entries
    arrays: list[str] = field(default_factory=list)  # the state's array entries
    created: str = ""
    format: int = DETECTOR_FORMAT

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def begin_detector(fs: FeatureSet, name: str) -> zarr.Group:
    """An empty group for detector ``name`` beside ``fs`` (one of that name is replaced)."""
    with translate_write_errors(fs.location, f"OOD detector '{name}' of '{fs.path}'"):
        parent = fs.group.require_group(DETECTOR_GROUP)
        if name in parent:
            del parent[name]
        return parent.create_group(name)


def bank_sink(group: zarr.Group) -> Callable[[int], zarr.Array]:
    """A kNN ``bank_sink`` that appends the bank to a ``bank`` array of ``group``."""

    def create(dim: int) -> zarr.Array:
        return group.create_array(
            "bank", shape=(0, dim), chunks=(BANK_CHUNK_ROWS, dim), dtype="float32",
            compressors=None, dimension_names=("row", "feature"),
        )  # fmt: skip

    return create


def finish_detector(
    fs: FeatureSet, group: zarr.Group, record: DetectorRecord, state: Mapping[str, Any]
) -> None:
    """Write ``state``'s arrays (those not written during the fit) and then the record."""
    with translate_write_errors(fs.location, f"OOD detector '{record.name}' of '{fs.path}'"):
        for key, value in state.items():
            if isinstance(value, zarr.Array):
                record.arrays.append(key)  # written by the fit (the kNN bank)
                feature_set_module.crash_point(f"detector-{key}")
            elif isinstance(value, np.ndarray):
                group.create_array(key, data=value, chunks=value.shape or (1,), compressors=None)
                record.arrays.append(key)
                feature_set_module.crash_point(f"detector-{key}")
            elif key not in ("dim", "n_fit"):
                record.scalars[key] = value.item() if isinstance(value, np.generic) else value
        group.attrs.update({"record": record.to_dict(), "complete": True})


def find_detector(fs: FeatureSet, name: str) -> DetectorRecord | None:
    """The record of complete detector ``name`` beside ``fs`` (None: absent or unfinished)."""
    try:
        attrs = dict(fs.group[f"{DETECTOR_GROUP}/{name}"].attrs)
    except KeyError:
        return None
    return DetectorRecord(**attrs["record"]) if attrs.get("complete") else None


def is_current(record: DetectorRecord, *, open_set: Callable[[str], FeatureSet | None]) -> bool:
    """Whether the rows ``record`` was fitted on are unchanged since."""
    return not stale_reason(record, open_set=open_set)  # type: ignore[arg-type]


def read_state(
    fs: FeatureSet, record: DetectorRecord, *, max_in_memory: int, refit: str
) -> dict[str, Any]:
    """The detector's state: arrays read (one above ``max_in_memory`` bytes stays a lazy Zarr
    array, read block by block), scalars, ``dim`` and ``n_fit``.

    Raises:
        DetectorDamagedError: an array is missing or holds NaN/inf (``refit`` names the fix).
    """
    state: dict[str, Any] = {**record.scalars, "dim": record.dim, "n_fit": record.n_fit}
    where = f"OOD detector '{record.name}' beside '{fs.path}'"
    for key in record.arrays:
        try:
            node = fs.group[f"{DETECTOR_GROUP}/{record.name}/{key}"]
            if not isinstance(node, zarr.Array):
                raise KeyError(key)
            big = node.nbytes > max_in_memory
            value = node if big else np.asarray(node[...])
            if not big and not np.isfinite(value).all():
                raise ValueError("it holds NaN/inf")
        except (KeyError, ValueError, OSError, zarr.errors.BaseZarrError) as exc:
            raise DetectorDamagedError(
                f"{where} is damaged: its '{key}' array cannot be read ({type(exc).__name__}: "
                f"{exc}). Refit it: {refit}."
            ) from exc
        state[key] = value
    return state
