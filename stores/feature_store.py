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
from bob_cache.stores.group_metadata import group_metadata_bytes
from bob_cache.stores.layout import StorageLayout
from bob_cache.stores.location import (
    StoreLike,
    open_zarr_store,
    put_exclusive,
    translate_remote_errors,
    translate_write_errors,
)
from bob_cache.stores.metadata_scan import (
    METADATA_DAMAGE,
    damaged_metadata_error,
    scan_hierarchy,
)

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
            if mode != "r":  # many writers may open a new store at once: create it exclusively
                with translate_write_errors(location, "the store's root group"):
                    put_exclusive(store, "zarr.json", group_metadata_bytes())
            # Consolidated metadata is for xarray; writers need the live hierarchy.
            self.root = zarr.open_group(
                store, mode="r" if mode == "r" else "r+", zarr_format=3, use_consolidated=False
            )
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as exc:
            raise StoreError(
                f"'{location}' is not a bob-cache feature store (no Zarr v3 root group). "
                "Check the path, or create a store with `bob-cache extract --store ...`."
            ) from exc

    def feature_sets(self) -> list[FeatureSet]:
        """Every feature set in the store, sorted by group path.

        Raises:
            DamagedDataError: a metadata file does not parse (named, with the fix).
        """
        try:
            nodes = self.root.members(max_depth=None)
        except METADATA_DAMAGE as exc:  # find which file, without reading the rest at once
            _, damaged = self.scan()
            if damaged:
                raise damaged_metadata_error(self.location, damaged) from exc
            raise
        found = [
            FeatureSet(node, location=self.location)
            for _, node in nodes
            if isinstance(node, zarr.Group) and MARKER in node.attrs
        ]
        return sorted(found, key=lambda fs: fs.path)

    def scan(self) -> tuple[list[FeatureSet], list[tuple[str, str]]]:
        """The feature sets whose metadata is whole, and each damaged metadata file with
        why (``ls`` and ``verify`` show both; see :mod:`bob_cache.stores.metadata_scan`)."""
        with translate_remote_errors(self.location):
            scan = scan_hierarchy(self.store, MARKER)
        sets = [FeatureSet(self.root[path], location=self.location) for path in scan.sets]
        return sets, scan.damaged

    def list(self) -> list[dict[str, Any]]:
        """One info row per feature set (see :meth:`FeatureSet.info`)."""
        return [fs.info() for fs in self.feature_sets()]

    def get(self, ref: str, *, split: str | None = None) -> FeatureSet:
        """The one feature set that ``ref`` (group path, or a key or path prefix) names.

        Train, val and test of one extraction share a key, so a key alone often matches
        several sets; ``split`` picks one of them.

        Raises:
            FeatureSetNotFoundError: nothing matches, or several do (listed, with the fix).
        """
        ref = ref.strip("/")
        if split is None and ref in self.root:
            node = self.root[ref]
            if isinstance(node, zarr.Group) and MARKER in node.attrs:
                return FeatureSet(node, location=self.location)
        sets = self.feature_sets()
        matches = [fs for fs in sets if fs.path == ref] or [
            fs for fs in sets if fs.key.startswith(ref) or fs.path.startswith(ref)
        ]
        chosen = [fs for fs in matches if split is None or fs.attrs.get("split") == split]
        if len(chosen) == 1:
            return chosen[0]
        where, see = f"in store '{self.location}'", f"(see `bob-cache ls {self.location}`)"
        if not matches:
            listing = ", ".join(fs.path for fs in sets[:8]) or "none"
            raise FeatureSetNotFoundError(
                f"'{ref}' matches no feature set {where}. The store holds: {listing}. "
                f"Pass a group path or a key prefix {see}."
            )
        splits = sorted({str(fs.attrs.get("split")) for fs in matches})
        if not chosen:
            raise FeatureSetNotFoundError(
                f"'{ref}' matches no feature set of split '{split}' {where}; its splits are "
                f"{', '.join(splits)}. Pass one of them to --split."
            )
        listing = ", ".join(f"{fs.path} (split {fs.attrs.get('split')})" for fs in chosen[:8])
        if split is None and len({fs.attrs.get("split") for fs in chosen}) > 1:
            fix = f"Pass --split NAME to pick one ({', '.join(splits)})."
        else:
            fix = f"Pass the full group path or a longer key {see}."
        raise FeatureSetNotFoundError(
            f"'{ref}' matches {len(chosen)} feature sets {where}: {listing}. {fix}"
        )

    def require(
        self,
        request: FeatureSetRequest,
        layout: StorageLayout,
        *,
        label_shape: tuple[int, ...] = (),
        overwrite: bool = False,
    ) -> FeatureSet:
        """Create the requested feature set, or reopen it (checked) to resume.

        Args:
            label_shape: trailing shape of one row's label (``()``; ``(C,)`` multi-label).
            overwrite: delete an existing set at the same path first.
        """
        if self.mode == "r":
            raise StoreError(f"Store '{self.location}' is open read-only.")
        if overwrite and request.path in self.root:
            with translate_write_errors(self.location, f"removal of '{request.path}'"):
                del self.root[request.path]
        return FeatureSet.require(
            self.root, request, layout, label_shape=label_shape, location=self.location
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
    name = str(location) if isinstance(location, (str, Path)) else repr(location)
    with translate_remote_errors(location if isinstance(location, (str, Path)) else ""):
        store = open_zarr_store(location, mode=mode, storage_options=storage_options)
        return FeatureStore(store, location=name, mode=mode)
