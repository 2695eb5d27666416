"""A local store opened by a relative path whose name recurs inside its keys (zarr 3.1's
LocalStore strips its root from listed keys by string replacement, which cut ``.../digest/c/0``
to ``.../digec/0`` for a store at ``st`` and read a committed shard as damaged)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from zarr.core.sync import sync

from bob_cache.stores import open_store
from bob_cache.stores.location import open_zarr_store
from tests.conftest import blobs, write_feature_sets


@pytest.mark.parametrize("name", ["st", "test", "./digits"])
def test_a_relative_store_named_like_its_keys_lists_them_whole(
    name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    x, y = blobs(40, dim=8)
    write_feature_sets(Path(name), {"test": (x, y)}, dataset="digits", shard_rows=16)
    fs = open_store(name).feature_sets()[0]
    fs.check_intact()  # every committed object is found
    keys = set(fs.object_keys(1).values())
    store = open_zarr_store(name, mode="r")

    async def listed(prefix: str) -> set[str]:
        return {k async for k in store.list_prefix(prefix)}

    assert keys <= sync(listed(fs.path))
    assert all(k.startswith(fs.path) for k in sync(listed("")) if "/c/" in k)
    np.testing.assert_allclose(fs.features[:], x, rtol=1e-6)
