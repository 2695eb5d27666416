"""The top-level Python API shown in the README."""

from __future__ import annotations

from pathlib import Path

import numpy as np

import bob_cache


def test_readme_python_api_flow(tmp_path: Path) -> None:
    from bob_cache import ExtractConfig, extract, open_store

    store_dir = str(tmp_path / "bob-store")
    summary = extract(
        ExtractConfig(
            data="builtin:digits", backbone="test_resnet", random_init=True, image_size=32,
            split="val", limit=20, store=store_dir, workers=0, quiet=True,
        )
    )  # fmt: skip
    fs = open_store(store_dir).get(summary.feature_sets[0]["group"])
    X, y = fs.features[:], fs.array("labels")[:]
    assert X.shape == (20, 96) and X.dtype == np.float16 and np.isfinite(X).all()
    assert y.min() >= 0 and y.max() <= 9


def test_lazy_exports_resolve() -> None:
    for name in bob_cache.__all__:
        assert getattr(bob_cache, name) is not None
    assert bob_cache.__version__ == "0.1.0"
