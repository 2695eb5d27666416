"""Persistence: the Zarr feature store (local directory or any fsspec URL) and its checks.

Installed, this package imports as ``bob_cache.stores``.
"""

from bob_cache.stores.feature_set import DTYPES, FeatureSet, FeatureSetRequest, cast_features
from bob_cache.stores.feature_store import FeatureStore, feature_set_path, open_store
from bob_cache.stores.layout import StorageLayout, resolve_layout
from bob_cache.stores.location import open_zarr_store
from bob_cache.stores.verify import SetReport, verify_feature_set, verify_store

__all__ = [
    "DTYPES",
    "FeatureSet",
    "FeatureSetRequest",
    "FeatureStore",
    "SetReport",
    "StorageLayout",
    "cast_features",
    "feature_set_path",
    "open_store",
    "open_zarr_store",
    "resolve_layout",
    "verify_feature_set",
    "verify_store",
]
