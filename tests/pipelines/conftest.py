"""Fixtures of the query and serving tests: a feature set with no index and one unreadable
image, and tiny PNGs whose headers claim huge sizes (decompression bombs)."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import pytest
from PIL import Image

from tests.conftest import TINY, run_cli, write_image_folder

BROKEN_ID = "cat/cat_broken.jpg"


@pytest.fixture(scope="session")
def unindexed_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An extracted image folder (10 rows, one of them an unreadable image) with no index."""
    root = tmp_path_factory.mktemp("unindexed-store")
    photos = write_image_folder(root / "photos", splits=("",), per_class=3)
    (photos / BROKEN_ID).write_bytes(b"\xff\xd8\xff this is not a JPEG")
    store = root / "store"
    done = run_cli("extract", "--data", photos, "--store", store, "--dtype", "float32",
                   "--split-fractions", "1,0,0", *TINY)  # a collection: all indexed  # fmt: skip
    assert done.returncode == 0, done.stderr
    return store


@pytest.fixture(scope="session")
def blank_png() -> Callable[[int, int], bytes]:
    """``blank_png(width, height)``: a real one-colour PNG, a few KB even at 20000 × 20000
    (1-bit pixels compress ~1000:1), that decodes to ``width × height`` RGB pixels."""
    cache: dict[tuple[int, int], bytes] = {}

    def make(width: int, height: int) -> bytes:
        if (width, height) not in cache:
            out = io.BytesIO()
            Image.new("1", (width, height)).save(out, format="PNG")
            cache[width, height] = out.getvalue()
        return cache[width, height]

    return make
