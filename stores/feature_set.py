"""One feature set: a Zarr v3 group of aligned per-row arrays plus full provenance.

Arrays (dimension ``sample`` along rows, all sharded alike so one shard is one object each):

- ``features`` (N × D, float16 by default; NaN rows where the image was unreadable), or in a
  dense set (``extract --dense``, attribute ``grid`` = ``[H, W]``) N × H × W × D grids
  (dimensions ``sample, y, x, feature``), read with ``array("features")``
- ``labels`` (N, int64, -1 unlabeled), ``ids`` (N, string) and ``digest`` (N, a hash of
  each image's bytes as read during extraction)
- ``valid`` (N, bool) and ``error`` (N, string: why a row is invalid, '' otherwise)
- ``shard_commit`` (one JSON record per shard, each its own object): written only after
  every array of that shard is stored. It names the shard's generation (new at every
  commit), its invalid rows, who wrote it (device, torch, timm) and a digest of each array's
  decoded values (``arrays``; :mod:`bob_cache.stores.checksums`).

Every object also ends with a crc32c checksum. Reads go through :meth:`FeatureSet.array`,
which turns a damaged object into one :class:`DamagedDataError` naming the set, the shard
and ``bob-cache verify --repair``; :meth:`FeatureSet.check_intact` finds committed shards
whose objects are missing (zarr would read them as fill values).

Writing rules (many writers, any crash point): the group's attributes are written once, at
an exclusive create, and never rewritten; completeness is derived from the commit records;
a shard is written whole, after its leftover objects are deleted, and committed last;
``uncommit`` clears records before it deletes data. So any prefix of any change leaves a
state that rerunning the same command repairs.
"""

from __future__ import annotations

import contextlib
import json
import socket
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync

from bob_cache.errors import DamagedDataError, FeatureOverflowError, SpecError, SpecMismatchError
from bob_cache.hashing import canonical_json
from bob_cache.provenance import utc_now
from bob_cache.stores.checksums import array_digest, checksummed
from bob_cache.stores.group_metadata import consolidate, create_group
from bob_cache.stores.guarded import GuardedArray, check_intact, damage_error
from bob_cache.stores.layout import StorageLayout
from bob_cache.stores.location import translate_write_errors

FORMAT_VERSION = 2
MARKER = "bob_cache"
DTYPES = ("float16", "float32")
ROW_ARRAYS = ("labels", "ids", "digest", "valid", "error")
COMMITS = "shard_commit"
WRITE_STEPS = ("clear", "features", *ROW_ARRAYS, "commit")


def crash_point(step: str) -> None:
    """Called between the steps of every multi-step write; tests inject failures here."""


@dataclass(frozen=True)
class FeatureSetRequest:
    """What the extraction stage asks the store for: identity, provenance and shape."""

    path: str
    key: str
    spec: dict[str, Any]
    provenance: dict[str, Any]
    n_rows: int
    dim: int
    dtype: str = "float16"
    grid: tuple[int, int] | None = None  # (H, W) of a dense set: one H × W × dim grid per row


@dataclass(frozen=True)
class ShardRows:
    """What one shard's rows hold besides features: labels, ids and content digests."""

    labels: np.ndarray
    ids: Sequence[str]
    digests: Sequence[str]
    errors: Sequence[str]


class FeatureSet:
    """A handle on one feature-set group."""

    def __init__(self, group: zarr.Group, *, location: str) -> None:
        self.group = group
        self.location = location
        self.attrs: dict[str, Any] = dict(group.attrs)

    # --- creation and validation -------------------------------------------------------
    @classmethod
    def require(
        cls,
        root: zarr.Group,
        request: FeatureSetRequest,
        layout: StorageLayout,
        *,
        label_shape: tuple[int, ...] = (),
        location: str,
    ) -> FeatureSet:
        """Open the feature set at ``request.path``, creating it if missing.

        Processes extracting disjoint shards of one set may race here: the group's
        attributes are created exclusively (the first writer's stay), arrays idempotently.
        An existing set must match the request's spec and layout exactly.
        """
        if request.dtype not in DTYPES:
            raise SpecError(
                f"Unknown storage dtype '{request.dtype}'. Expected one of {', '.join(DTYPES)}."
            )
        if request.grid is not None:  # recorded with the provenance, at the exclusive create
            request = replace(request, provenance={**request.provenance, "grid": [*request.grid]})
        with translate_write_errors(location, f"feature set '{request.path}' metadata"):
            group = create_group(root, request, layout, marker=_marker())
            fs = cls(group, location=location)
            fs._check_matches(request, layout)
            fs._create_arrays(request, layout, label_shape=label_shape)
        return fs

    def _check_matches(self, request: FeatureSetRequest, layout: StorageLayout) -> None:
        stored = {
            "format": self.format,
            "key": self.attrs.get("key"),
            "spec": self.attrs.get("spec"),
            "storage": _without_checksum(self.attrs.get("storage")),
            "n_rows": self.attrs.get("n_rows"),
            "dim": self.attrs.get("dim"),
            "grid": self.attrs.get("grid"),
        }
        wanted = {
            "format": FORMAT_VERSION,
            "key": request.key,
            "spec": request.spec,
            "storage": _without_checksum(layout.to_dict()),  # a set keeps what it was made with
            "n_rows": request.n_rows,
            "dim": request.dim,
            "grid": list(request.grid) if request.grid else None,
        }
        diffs = _diff(stored, wanted)
        if diffs:
            shown = "; ".join(f"{k}: stored {a!r}, requested {b!r}" for k, a, b in diffs[:4])
            raise SpecMismatchError(
                f"Feature set '{request.path}' already exists with a different spec or layout "
                f"({shown}). Nothing was written. Fix: rerun with the stored values (see "
                f"`bob-cache info {self.location} {request.path}`), pass --overwrite to replace "
                "it, or use another --store."
            )

    def _create_arrays(
        self,
        request: FeatureSetRequest,
        layout: StorageLayout,
        *,
        label_shape: tuple[int, ...] = (),
    ) -> None:
        n, row = request.n_rows, _row_shape(request.grid, request.dim)
        compressors = layout.compressors()
        rows = {
            "dimension_names": ("sample",),
            "chunks": (layout.shard_rows,),
            "compressors": compressors,
        }
        text = {**rows, "shape": (n,), "dtype": str}
        specs: dict[str, dict[str, Any]] = {
            "features": {
                "shape": (n, *row),
                "dtype": request.dtype,
                "chunks": (layout.chunk_rows, *row),
                "shards": (layout.shard_rows, *row),
                "compressors": compressors,
                "fill_value": np.nan,
                "dimension_names": ("sample", *("y", "x")[: len(row) - 1], "feature"),
            },
            "labels": {
                **rows,
                "shape": (n, *label_shape),
                "chunks": (layout.shard_rows, *label_shape),
                "dtype": "int64",
                "fill_value": -1,
                "dimension_names": ("sample", "label")[: 1 + len(label_shape)],
            },
            "ids": text,
            "digest": text,
            "valid": {**rows, "shape": (n,), "dtype": "bool", "fill_value": False},
            "error": text,
            COMMITS: {
                "shape": (layout.n_shards(n),),
                "dtype": str,
                "chunks": (1,),
                "dimension_names": ("shard",),
                "compressors": checksummed([]) if layout.checksum else None,
            },
        }
        existing = set(self.group.array_keys())
        for name, kwargs in specs.items():
            if name in existing:
                continue
            # A racing writer may create it first (with the same metadata).
            with contextlib.suppress(
                zarr.errors.ContainsArrayError, zarr.errors.ContainsGroupError
            ):
                self.group.create_array(name, **kwargs)

    # --- properties ---------------------------------------------------------------------
    @property
    def path(self) -> str:
        return self.group.path

    @property
    def key(self) -> str:
        return self.attrs["key"]

    @property
    def format(self) -> int:
        return int(self.attrs.get(MARKER, {}).get("format", 1))

    @property
    def n_rows(self) -> int:
        return int(self.attrs["n_rows"])

    @property
    def dim(self) -> int:
        return int(self.attrs["dim"])

    @property
    def grid(self) -> tuple[int, int] | None:
        """``(H, W)`` of a dense set's grids; None for one vector per row."""
        grid = self.attrs.get("grid")
        return (int(grid[0]), int(grid[1])) if grid else None

    @property
    def is_dense(self) -> bool:
        return self.grid is not None

    @property
    def row_shape(self) -> tuple[int, ...]:
        """One row's features: ``(dim,)``, or ``(H, W, dim)`` when dense."""
        return _row_shape(self.grid, self.dim)

    @property
    def layout(self) -> StorageLayout:
        return StorageLayout(**{"checksum": False, **self.attrs["storage"]})  # older: none

    @property
    def n_shards(self) -> int:
        return self.layout.n_shards(self.n_rows)

    @property
    def nbytes(self) -> int:
        """Bytes of all rows' features in memory, in their stored dtype (dense grids included)."""
        shape = (self.n_rows, *self.row_shape)
        return int(np.prod(shape)) * self.group["features"].dtype.itemsize

    @property
    def features(self) -> zarr.Array:
        """The N × D features; a dense set refuses (SpecError): read ``array("features")``."""
        if self.is_dense:
            raise SpecError(
                f"Feature set '{self.path}' holds dense grids (N×H×W×D = {self.n_rows}×"
                f"{'×'.join(map(str, self.row_shape))}), not one vector per image. Fix: use "
                "`bob-cache probe --method dense-linear`, or extract without --dense."
            )
        return self.array("features")

    @property
    def complete(self) -> bool:
        """Every shard committed (derived from the commit records, never stored)."""
        return all(r is not None for r in self.commits())

    @property
    def n_invalid(self) -> int:
        """Invalid rows among the committed shards."""
        return sum(r["invalid"] for r in self.commits() if r is not None)

    def array(self, name: str) -> GuardedArray:
        """A row-aligned array (``features``, ``labels``, ``ids``, ``valid``, ``error``...) whose
        reads name a damaged shard instead of failing with zarr's or a codec's error."""
        return GuardedArray(self, name)

    def damage(self, shards: Sequence[int], reason: str) -> DamagedDataError:
        """The error for damaged ``shards``: what, where, and the repair."""
        return damage_error(self, shards, reason)

    def check_intact(self) -> None:
        """Refuse a set where a committed shard's object is missing (see
        :func:`~bob_cache.stores.guarded.check_intact`)."""
        check_intact(self)

    # --- commit records -----------------------------------------------------------------
    def commits(self) -> list[dict[str, Any] | None]:
        """One record per shard (``None`` while uncommitted), read fresh from the store."""
        if self.format < 2:  # written before commit records: bool markers
            done = self.group["shard_committed"][:]
            return [{"generation": "format-1", "invalid": 0} if c else None for c in done]
        return [json.loads(r) if r else None for r in self.group[COMMITS][:]]

    def committed_shards(self) -> list[int]:
        return [i for i, r in enumerate(self.commits()) if r is not None]

    def missing_shards(self) -> list[int]:
        """Indices of shards that are not committed yet."""
        return [i for i, r in enumerate(self.commits()) if r is None]

    def generations(self) -> dict[int, str]:
        """``{shard: generation}`` of the committed shards (artifacts record these)."""
        return {i: r["generation"] for i, r in enumerate(self.commits()) if r is not None}

    def writers(self) -> list[dict[str, Any]]:
        """The distinct environments (device type, torch, timm) that committed shards."""
        seen: dict[str, dict[str, Any]] = {}
        for shard, r in enumerate(self.commits()):
            if r is not None and "writer" in r:
                entry = seen.setdefault(canonical_json(r["writer"]), {**r["writer"], "shards": []})
                entry["shards"].append(shard)
        return list(seen.values())

    # --- writing ------------------------------------------------------------------------
    def write_shard(
        self,
        shard: int,
        features: np.ndarray,
        rows: ShardRows,
        *,
        writer: dict[str, Any] | None = None,
    ) -> bool:
        """Store one whole shard (float32 features and its rows) and commit it.

        Leftover objects of the uncommitted shard (a killed writer's) are deleted first; the
        commit record is written last. A shard already committed is left as it is.

        Returns:
            True if this call wrote the shard, False if it was already committed.
        """
        start, stop = self.layout.shard_bounds(shard, self.n_rows)
        m = stop - start
        if features.shape != (m, *self.row_shape) or len(rows.errors) != m:
            raise ValueError(
                f"shard {shard} needs {(m, *self.row_shape)} features and {m} rows, got "
                f"{features.shape} and {len(rows.errors)}"
            )
        valid = np.array([not e for e in rows.errors], dtype=bool)
        dtype = self.group["features"].dtype
        values = {
            "features": cast_features(features, dtype, valid=valid, ids=rows.ids),
            "labels": np.asarray(rows.labels, dtype=np.int64),
            "ids": np.asarray(list(rows.ids), dtype=str),
            "digest": np.asarray(list(rows.digests), dtype=str),
            "valid": valid,
            "error": np.asarray(list(rows.errors), dtype=str),
        }
        record = {
            "arrays": {name: array_digest(value) for name, value in values.items()},
            "generation": uuid.uuid4().hex[:16],
            "invalid": int((~valid).sum()),
            "time": utc_now(),
            "host": socket.gethostname(),
            "writer": writer or {},
        }
        with translate_write_errors(
            self.location, f"shard {shard} (rows {start}-{stop - 1}) of '{self.path}'"
        ):
            if self.group[COMMITS][shard]:
                return False
            self._delete_objects(shard)
            crash_point("clear")
            for name, value in values.items():
                # Every array stores an object per committed shard, even one equal to the
                # fill value (verify checks that none is missing).
                target = self.group[name].with_config({"write_empty_chunks": True})
                target[start:stop] = value
                crash_point(name)
            self.group[COMMITS][shard] = json.dumps(record, sort_keys=True)
            crash_point("commit")
        return True

    def write_rows(
        self,
        features: np.ndarray,
        *,
        labels: np.ndarray,
        ids: Sequence[str],
        errors: Sequence[str] | None = None,
        digests: Sequence[str] | None = None,
        shards: Sequence[int] | None = None,
    ) -> None:
        """Write every row at once (features computed elsewhere), shard by shard; with
        ``shards``, only those."""
        errors = errors if errors is not None else [""] * self.n_rows
        digests = digests if digests is not None else [""] * self.n_rows
        for shard in range(self.n_shards) if shards is None else shards:
            a, b = self.layout.shard_bounds(shard, self.n_rows)
            rows = ShardRows(labels[a:b], ids[a:b], digests[a:b], errors[a:b])
            self.write_shard(shard, np.asarray(features[a:b], dtype=np.float32), rows)

    def finalize(self) -> bool:
        """When every shard is committed, consolidate the store's metadata (so xarray opens
        the set at once); returns completeness."""
        if not self.complete:
            return False
        with translate_write_errors(self.location, f"metadata of '{self.path}'"):
            consolidate(self.group.store, self.path)
        return True

    def uncommit(self, shards: Sequence[int]) -> None:
        """Forget ``shards`` so the next extraction recomputes them.

        Every commit record goes first, then the shards' objects (zarr reads an existing
        shard before rewriting it, so a corrupt one would block its own repair).
        """
        with translate_write_errors(self.location, f"shards {list(shards)} of '{self.path}'"):
            for shard in shards:
                self.group[COMMITS][shard] = ""
                crash_point("uncommit")
            for shard in shards:
                self._delete_objects(shard)
                crash_point("delete")

    def object_keys(self, shard: int) -> dict[str, str]:
        """The store key of each row-aligned array's object for ``shard``."""
        keys = {}
        for name in ("features", *ROW_ARRAYS):
            arr = self.group[name]
            chunk = arr.metadata.encode_chunk_key((shard,) + (0,) * (arr.ndim - 1))
            keys[name] = f"{arr.path}/{chunk}"
        return keys

    def _delete_objects(self, shard: int) -> None:
        for key in self.object_keys(shard).values():
            sync(self.group.store.delete(key))

    # --- reading ------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """One listing row: where it is, what it holds, and whether it is complete."""
        a = self.attrs
        commits = self.commits()
        done = [r for r in commits if r is not None]
        writers = self.writers()
        return {
            "group": self.path,
            "dataset": a["dataset"]["name"],
            "split": a["split"],
            "backbone": a["backbone"]["slug"],
            "layer": a["spec"]["layer"],
            "pool": a["spec"]["pool"],
            "key": a["key"],
            "rows": a["n_rows"],
            "dim": a["dim"],
            "grid": a.get("grid"),
            "dtype": a["spec"]["dtype"],
            "invalid": sum(r["invalid"] for r in done),
            "complete": len(done) == len(commits),
            "shards_committed": len(done),
            "shards": len(commits),
            "mixed": writers if len(writers) > 1 else None,
        }

    def invalid_rows(self) -> list[tuple[str, str]]:
        """``(id, reason)`` for every row whose image could not be used."""
        shards = [s for s, r in enumerate(self.commits()) if r is not None and r.get("invalid", 1)]
        out: list[tuple[str, str]] = []
        for shard in shards:
            start, stop = self.layout.shard_bounds(shard, self.n_rows)
            valid = self.group["valid"][start:stop]
            if valid.all():
                continue
            ids, errors = self.group["ids"][start:stop], self.group["error"][start:stop]
            out += [(str(ids[i]), str(errors[i])) for i in np.flatnonzero(~valid)]
        return out


def _without_checksum(storage: dict[str, Any] | None) -> dict[str, Any] | None:
    return None if storage is None else {k: v for k, v in storage.items() if k != "checksum"}


def _row_shape(grid: tuple[int, int] | None, dim: int) -> tuple[int, ...]:
    return (int(grid[0]), int(grid[1]), dim) if grid else (dim,)


def _marker() -> dict[str, Any]:
    return {MARKER: {"format": FORMAT_VERSION, "kind": "feature_set"}}


def cast_features(
    features: np.ndarray, dtype: np.dtype | str, *, valid: np.ndarray, ids: Sequence[str]
) -> np.ndarray:
    """Cast float32 rows (vectors or grids) to the storage dtype; invalid rows become NaN.

    Raises:
        FeatureOverflowError: a finite value is beyond the dtype's range (it would be inf).
    """
    target = np.dtype(dtype)
    with np.errstate(over="ignore"):  # overflow is detected just below
        out = features.astype(target)
    inf = np.isinf(out) & np.isfinite(features)
    overflow = inf.reshape(len(out), -1).any(axis=1) if len(out) else np.zeros(0, bool)
    overflow[~valid] = False
    if overflow.any():
        bad = np.flatnonzero(overflow)
        peak = float(np.abs(features[bad]).max())
        raise FeatureOverflowError(
            f"Features of {len(bad)} row(s) (e.g. '{ids[bad[0]]}') reach {peak:.4g}, beyond "
            f"{target.name}'s range (±{float(np.finfo(target).max):.4g}); storing them would "
            "give inf. Nothing of this shard was written. Fix: rerun with --dtype float32 "
            "(a new feature set), or choose a layer/pooling with smaller activations."
        )
    out[~valid] = np.nan
    return out


def _diff(
    stored: dict[str, Any], wanted: dict[str, Any], prefix: str = ""
) -> list[tuple[str, Any, Any]]:
    out: list[tuple[str, Any, Any]] = []
    for k in sorted(set(stored) | set(wanted)):
        a, b = stored.get(k), wanted.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _diff(a, b, f"{prefix}{k}.")
        elif canonical_json(a) != canonical_json(b):
            out.append((f"{prefix}{k}", a, b))
    return out
