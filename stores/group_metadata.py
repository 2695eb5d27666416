"""Zarr group metadata the store writes itself: exclusive creation and consolidation.

A feature set's group (its attributes: the full provenance) is created with one exclusive
write, so of many writers racing to create it the first one's attributes stay and nobody
rewrites them. Parent groups are created the same way (their metadata is identical).
Consolidated metadata at the store's root lets ``xarray.open_zarr(store, group=...)`` open a
finished set fast; the store's own code always reads the live hierarchy.
"""

from __future__ import annotations

import json
import warnings
from typing import TYPE_CHECKING, Any

import zarr
from zarr.core.buffer import default_buffer_prototype
from zarr.core.group import GroupMetadata

from bob_cache.provenance import utc_now
from bob_cache.stores.layout import StorageLayout
from bob_cache.stores.location import put_exclusive

if TYPE_CHECKING:
    from bob_cache.stores.feature_set import FeatureSetRequest


def consolidate(store: Any, path: str, *, attempts: int = 3) -> None:
    """Consolidate the store root's metadata so ``xarray.open_zarr(store, group=path)`` opens
    the set fast. Writers may race here: each retries until its own set is included."""
    for _ in range(attempts):
        with warnings.catch_warnings():  # consolidated metadata is not in the v3 spec yet
            warnings.simplefilter("ignore")
            zarr.consolidate_metadata(store, zarr_format=3)
            root = zarr.open_group(store, mode="r", use_consolidated=True)
        meta = root.metadata.consolidated_metadata
        if meta is not None and path in meta.flattened_metadata:
            return


def create_group(
    root: zarr.Group, request: FeatureSetRequest, layout: StorageLayout, *, marker: dict[str, Any]
) -> zarr.Group:
    """Create the feature set's group exclusively (a racing writer's attributes are kept) and
    open it."""
    attrs = {
        **marker,
        "key": request.key,
        "spec": request.spec,
        "storage": layout.to_dict(),
        "n_rows": request.n_rows,
        "dim": request.dim,
        **request.provenance,
        "created": utc_now(),
    }
    parent = request.path.rpartition("/")[0]
    if parent:
        _require_plain_group(root, parent)
    body = group_metadata_bytes(json.loads(json.dumps(attrs, default=str)))
    put_exclusive(root.store, f"{_join(root.path, request.path)}/zarr.json", body)
    return zarr.open_group(root.store, path=_join(root.path, request.path), mode="r+",
                           use_consolidated=False)  # fmt: skip


def _require_plain_group(root: zarr.Group, path: str) -> None:
    parts = path.split("/")
    body = group_metadata_bytes()
    for i in range(1, len(parts) + 1):
        put_exclusive(root.store, f"{_join(root.path, '/'.join(parts[:i]))}/zarr.json", body)


def group_metadata_bytes(attributes: dict[str, Any] | None = None) -> bytes:
    """The ``zarr.json`` of a Zarr v3 group with ``attributes``."""
    meta = GroupMetadata(attributes=attributes or {})
    return meta.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes()


def _join(*parts: str) -> str:
    return "/".join(p.strip("/") for p in parts if p.strip("/"))
