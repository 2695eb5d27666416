"""The store tests' backends: a local directory, zarr's in-memory store, an fsspec
``memory://`` URL, and S3 through a real moto server on loopback (``backend`` runs a test on
each; ``s3_server`` is the server)."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
from zarr.storage import MemoryStore

from bob_cache.stores import FeatureStore, open_store


@dataclass
class Backend:
    name: str
    open: Callable[..., FeatureStore]


@pytest.fixture(params=["local", "memory-store", "memory-url", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    kind = request.param
    if kind == "local":
        return Backend(kind, lambda mode="a": open_store(tmp_path / "store", mode=mode))
    if kind == "memory-store":
        store = MemoryStore()
        return Backend(kind, lambda mode="a": open_store(store, mode=mode))
    if kind == "memory-url":
        url = f"memory://bob-{uuid.uuid4().hex}"
        return Backend(kind, lambda mode="a": open_store(url, mode=mode))
    options = request.getfixturevalue("s3_server")
    url = f"s3://bob/{uuid.uuid4().hex}"
    return Backend(kind, lambda mode="a": open_store(url, mode=mode, storage_options=options))
