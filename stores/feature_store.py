"""The feature store: one Zarr hierarchy holding many feature sets.

Feature sets live at ``{dataset}/{split}/{backbone}/{key}``, where ``key`` hashes everything
that changes the numbers (backbone and weights, preprocessing, layer, pooling, precision,
storage dtype, dataset content). Train, val and test of one extraction share a key.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import zarr
from zarr.abc.store import Store

from bob_cache.errors import FeatureSetNotFoundError, SpecError, StoreError
from bob_cache.stores.feature_set import MARKER, FeatureSet, FeatureSetRequest
from bob_cache.stores.layout import StorageLayout
from bob_cache.stores.location import StoreLike, open_zarr_store, translate_write_errors

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]*$")


def check_name(value: str, what: str) -> str:
    """Group path components must be plain names (no slashes, no leading dots)."""
    if not _NAME.match(value):
        raise SpecError(
            f"{what} '{value}' cannot name a store group. Use letters, digits and . _ + - "
            "(starting with a letter or digit), e.g. via --name."
        )
    return value


def feature_set_path(dataset: str, split: str, backbone: str, key: str) -> str:
    """The group path of a feature set."""
    parts = [
        check_name(dataset, "Dataset name"),
        check_name(split, "Split name"),
        check_name(backbone, "Backbone label"),
        key,
    ]
    return "/".join(parts)


class FeatureStore:
    """A store opened for reading (``mode='r'``) or reading and writing (``mode='a'``)."""

    def __init__(self, store: Store, *, location: str, mode: str) -> None:
        self.store = store
        self.location = location
        self.mode = mode
        try:
            self.root = zarr.open_group(store, mode="r" if mode == "r" else "a", zarr_format=3)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
            raise StoreError(
                f"'{location}' is not a bob-cache feature store (no Zarr v3 root group). "
                "Check the path, or create a store with `bob-cache extract --store ...`."
            ) from exc

    def feature_sets(self) -> list[FeatureSet]:
        """Every feature set in the store, sorted by group path."""
        found = [
            FeatureSet(node, location=self.location)
            for _, node in self.root.members(max_depth=None)
            if isinstance(node, zarr.Group) and MARKER in node.attrs
        ]
        return sorted(found, key=lambda fs: fs.path)

    def list(self) -> list[dict[str, Any]]:
        """One info row per feature set (see :meth:`FeatureSet.info`)."""
        return [fs.info() for fs in self.feature_sets()]

    def get(self, ref: str) -> FeatureSet:
        """Open a feature set by group path or by (a unique prefix of) its key."""
        ref = ref.strip("/")
        if (
            ref in self.root
            and isinstance(self.root[ref], zarr.Group)
            and MARKER in self.root[ref].attrs
        ):
            return FeatureSet(self.root[ref], location=self.location)
        sets = self.feature_sets()
        matches = [fs for fs in sets if fs.key.startswith(ref) or fs.path.startswith(ref)]
        if len(matches) == 1:
            return matches[0]
        listing = ", ".join(fs.path for fs in (matches or sets)[:8]) or "none"
        reason = "matches several feature sets" if matches else "matches no feature set"
        raise FeatureSetNotFoundError(
            f"'{ref}' {reason} in store '{self.location}'. "
            f"{'Candidates' if matches else 'The store holds'}: {listing}. "
            f"Pass a full group path or a longer key (see `bob-cache ls {self.location}`)."
        )

    def require(
        self,
        request: FeatureSetRequest,
        layout: StorageLayout,
        *,
        labels: Any,
        ids: Any,
        overwrite: bool = False,
    ) -> FeatureSet:
        """Create the requested feature set, or reopen it (checked) to resume."""
        if self.mode == "r":
            raise StoreError(f"Store '{self.location}' is open read-only.")
        if overwrite and request.path in self.root:
            with translate_write_errors(self.location, f"removal of '{request.path}'"):
                del self.root[request.path]
        return FeatureSet.require(
            self.root, request, layout, labels=labels, ids=ids, location=self.location
        )


def open_store(
    location: StoreLike, *, mode: str = "r", storage_options: dict[str, Any] | None = None
) -> FeatureStore:
    """Open a feature store.

    Args:
        location: local directory, fsspec URL (``s3://bucket/prefix``) or a zarr Store.
        mode: ``r`` to read an existing store, ``a`` to create or extend one.
        storage_options: fsspec options for URLs (e.g. ``{"endpoint_url": ...}``).
    """
    if mode not in ("r", "a"):
        raise ValueError(f"mode must be 'r' or 'a', not {mode!r}")
    store = open_zarr_store(location, mode=mode, storage_options=storage_options)
    name = str(location) if isinstance(location, (str, Path)) else repr(location)
    return FeatureStore(store, location=name, mode=mode)
