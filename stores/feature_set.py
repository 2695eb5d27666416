"""One feature set: a Zarr v3 group of aligned per-row arrays plus full provenance.

Arrays (dimension ``sample`` along rows):

- ``features`` (N × D, float16 by default; NaN rows where the image was unreadable)
- ``labels`` (N, int64, -1 unlabeled) and ``ids`` (N, string), written when the set is created
- ``valid`` (N, bool) and ``error`` (N, string: why a row is invalid, '' otherwise)
- ``shard_committed`` (one bool per shard, each its own object): set only after every array
  of that shard is stored, so a killed run resumes exactly at the first missing shard.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import zarr
from zarr.core.sync import sync

from bob_cache.errors import FeatureOverflowError, SpecError, SpecMismatchError
from bob_cache.hashing import canonical_json
from bob_cache.provenance import utc_now
from bob_cache.stores.layout import StorageLayout
from bob_cache.stores.location import translate_write_errors

FORMAT_VERSION = 1
MARKER = "bob_cache"
DTYPES = ("float16", "float32")
_ROW_ARRAYS = ("labels", "ids", "valid", "error")


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
        labels: np.ndarray,
        ids: Sequence[str],
        location: str,
    ) -> FeatureSet:
        """Open the feature set at ``request.path``, creating it if missing.

        Creation is idempotent, so processes extracting disjoint shards of the same set may
        race here. An existing set must match the request's spec and layout exactly.
        """
        if request.dtype not in DTYPES:
            raise SpecError(
                f"Unknown storage dtype '{request.dtype}'. Expected one of {', '.join(DTYPES)}."
            )
        with translate_write_errors(location, f"feature set '{request.path}' metadata"):
            group = _require_group(root, request, layout)
            fs = cls(group, location=location)
            fs._check_matches(request, layout)
            fs._create_arrays(request, layout, label_shape=np.shape(labels)[1:])
            if not fs.attrs.get("rows_listed"):
                fs.group["labels"][:] = np.asarray(labels, dtype=np.int64)
                fs.group["ids"][:] = np.asarray(list(ids), dtype=str)
                fs._update_attrs(rows_listed=True)
        return fs

    def _check_matches(self, request: FeatureSetRequest, layout: StorageLayout) -> None:
        stored = {
            "key": self.attrs.get("key"),
            "spec": self.attrs.get("spec"),
            "storage": self.attrs.get("storage"),
            "n_rows": self.attrs.get("n_rows"),
            "dim": self.attrs.get("dim"),
        }
        wanted = {
            "key": request.key,
            "spec": request.spec,
            "storage": layout.to_dict(),
            "n_rows": request.n_rows,
            "dim": request.dim,
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
        n, d = request.n_rows, request.dim
        compressors = layout.compressors()
        rows = {
            "dimension_names": ("sample",),
            "chunks": (layout.shard_rows,),
            "compressors": compressors,
        }
        specs: dict[str, dict[str, Any]] = {
            "features": {
                "shape": (n, d),
                "dtype": request.dtype,
                "chunks": (layout.chunk_rows, d),
                "shards": (layout.shard_rows, d),
                "compressors": compressors,
                "fill_value": np.nan,
                "dimension_names": ("sample", "feature"),
            },
            "labels": {
                **rows,
                "shape": (n, *label_shape),
                "chunks": (layout.shard_rows, *label_shape),
                "dtype": "int64",
                "fill_value": -1,
                "dimension_names": ("sample", "label")[: 1 + len(label_shape)],
            },
            "ids": {**rows, "shape": (n,), "dtype": str},
            "valid": {**rows, "shape": (n,), "dtype": "bool", "fill_value": False},
            "error": {**rows, "shape": (n,), "dtype": str},
            "shard_committed": {
                "shape": (layout.n_shards(n),),
                "dtype": "bool",
                "chunks": (1,),
                "fill_value": False,
                "dimension_names": ("shard",),
                "compressors": None,
            },
        }
        existing = set(self.group.array_keys())
        for name, kwargs in specs.items():
            if name in existing:
                continue
            with contextlib.suppress(zarr.errors.ContainsArrayError):  # a racing process won
                self.group.create_array(name, **kwargs)

    # --- properties ---------------------------------------------------------------------
    @property
    def path(self) -> str:
        return self.group.path

    @property
    def key(self) -> str:
        return self.attrs["key"]

    @property
    def n_rows(self) -> int:
        return int(self.attrs["n_rows"])

    @property
    def dim(self) -> int:
        return int(self.attrs["dim"])

    @property
    def complete(self) -> bool:
        return bool(self.attrs.get("complete"))

    @property
    def layout(self) -> StorageLayout:
        return StorageLayout(**self.attrs["storage"])

    @property
    def features(self) -> zarr.Array:
        return self.group["features"]

    def array(self, name: str) -> zarr.Array:
        """A row-aligned array: ``features``, ``labels``, ``ids``, ``valid`` or ``error``."""
        return self.group[name]

    # --- writing ------------------------------------------------------------------------
    def missing_shards(self) -> list[int]:
        """Indices of shards that are not committed yet."""
        return np.flatnonzero(~self.group["shard_committed"][:]).tolist()

    def write_shard(self, shard: int, features: np.ndarray, errors: Sequence[str]) -> None:
        """Store one whole shard (float32 features, one error string per row) and commit it."""
        start, stop = self.layout.shard_bounds(shard, self.n_rows)
        if features.shape != (stop - start, self.dim):
            raise ValueError(
                f"shard {shard} needs {(stop - start, self.dim)} features, got {features.shape}"
            )
        valid = np.array([not e for e in errors], dtype=bool)
        stored = cast_features(
            features, self.features.dtype, valid=valid, ids=self._ids(start, stop)
        )
        with translate_write_errors(
            self.location, f"shard {shard} (rows {start}-{stop - 1}) of '{self.path}'"
        ):
            self.features[start:stop] = stored
            self.group["valid"][start:stop] = valid
            self.group["error"][start:stop] = np.asarray(list(errors), dtype=str)
            self.group["shard_committed"][shard] = True

    def finalize(self) -> bool:
        """Mark the set complete once every shard is committed; returns completeness."""
        if self.missing_shards():
            return False
        if not self.complete:
            n_invalid = int((~self.group["valid"][:]).sum())
            with translate_write_errors(self.location, f"completion of '{self.path}'"):
                self._update_attrs(complete=True, n_invalid=n_invalid, completed=utc_now())
        return True

    def uncommit(self, shards: Sequence[int]) -> None:
        """Forget ``shards`` so the next extraction recomputes them.

        Their stored objects are deleted (zarr reads an existing shard before rewriting it,
        so a corrupt one would block its own repair) and labels/ids are listed again.
        """
        with translate_write_errors(self.location, f"shards {list(shards)} of '{self.path}'"):
            for shard in shards:
                self.group["shard_committed"][shard] = False
                for name in ("features", *_ROW_ARRAYS):
                    arr = self.group[name]
                    key = arr.metadata.encode_chunk_key((shard,) + (0,) * (arr.ndim - 1))
                    sync(arr.store.delete(f"{arr.path}/{key}"))
            self._update_attrs(complete=False, n_invalid=None, completed=None, rows_listed=False)

    def _update_attrs(self, **values: Any) -> None:
        self.group.attrs.update(values)
        self.attrs.update(values)

    def _ids(self, start: int, stop: int) -> np.ndarray:
        return self.group["ids"][start:stop]

    # --- reading ------------------------------------------------------------------------
    def info(self) -> dict[str, Any]:
        """One listing row: where it is, what it holds, and whether it is complete."""
        a = self.attrs
        n_shards = self.layout.n_shards(self.n_rows)
        # A complete set has every marker set: skip reading them (one object per shard).
        committed = n_shards if a.get("complete") else int(self.group["shard_committed"][:].sum())
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
            "dtype": a["spec"]["dtype"],
            "invalid": a.get("n_invalid"),
            "complete": bool(a.get("complete")),
            "shards_committed": committed,
            "shards": n_shards,
        }

    def invalid_rows(self) -> list[tuple[str, str]]:
        """``(id, reason)`` for every row whose image could not be used."""
        valid = self.group["valid"][:]
        committed = np.repeat(self.group["shard_committed"][:], self.layout.shard_rows)[
            : self.n_rows
        ]
        rows = np.flatnonzero(~valid & committed)
        if not len(rows):
            return []
        ids, errors = self.group["ids"][:], self.group["error"][:]
        return [(str(ids[i]), str(errors[i])) for i in rows]


def cast_features(
    features: np.ndarray, dtype: np.dtype | str, *, valid: np.ndarray, ids: Sequence[str]
) -> np.ndarray:
    """Cast float32 rows to the storage dtype; invalid rows become NaN.

    Raises:
        FeatureOverflowError: a finite value is beyond the dtype's range (it would be inf).
    """
    target = np.dtype(dtype)
    with np.errstate(over="ignore"):  # overflow is detected just below
        out = features.astype(target)
    overflow = np.isinf(out) & np.isfinite(features)
    overflow[~valid] = False
    if overflow.any():
        bad = np.flatnonzero(overflow.any(axis=1))
        peak = float(np.abs(features[bad]).max())
        raise FeatureOverflowError(
            f"Features of {len(bad)} row(s) (e.g. '{ids[bad[0]]}') reach {peak:.4g}, beyond "
            f"{target.name}'s range (±{float(np.finfo(target).max):.4g}); storing them would "
            "give inf. Nothing of this shard was written. Fix: rerun with --dtype float32 "
            "(a new feature set), or choose a layer/pooling with smaller activations."
        )
    out[~valid] = np.nan
    return out


def _require_group(
    root: zarr.Group, request: FeatureSetRequest, layout: StorageLayout
) -> zarr.Group:
    attrs = {
        MARKER: {"format": FORMAT_VERSION, "kind": "feature_set"},
        "key": request.key,
        "spec": request.spec,
        "storage": layout.to_dict(),
        "n_rows": request.n_rows,
        "dim": request.dim,
        **request.provenance,
        "created": utc_now(),
        "rows_listed": False,
        "complete": False,
        "n_invalid": None,
        "completed": None,
    }
    if request.path in root:
        return root[request.path]
    try:
        return root.create_group(request.path, attributes=attrs)
    except zarr.errors.ContainsGroupError:  # another process created it first
        return root[request.path]


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
