"""``--decode torch``: workers read files, the extraction device decodes and resizes."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bob_cache.backbones import create_backbone
from bob_cache.backbones.rebuild import embedder_from_provenance
from bob_cache.config import ExtractConfig
from bob_cache.data import parse_source
from bob_cache.data.device_decode import (
    DevicePreprocess,
    EncodedImageDataset,
    collate_encoded,
    tensor_steps,
)
from bob_cache.errors import SpecError
from bob_cache.stores import open_store
from tests.pipelines.test_extract import run


def cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_device_resize_matches_pil_for_jpeg_and_png(image_folder: Path) -> None:
    source = parse_source(str(image_folder))
    samples = source.splits["train"][:6]  # alternating PNG and JPEG
    bb = create_backbone("test_resnet", random_init=True, image_size=32)
    dataset = EncodedImageDataset(source, samples)
    items = [dataset[i] for i in range(len(samples))]
    assert [encoded for _, encoded, _, _, _ in items] == [s.id.endswith(".jpg") for s in samples]
    assert all(len(digest) == 32 for *_, digest in items)
    preprocess = DevicePreprocess(bb.data_config, torch.device("cpu"))
    encoded = collate_encoded(items)
    assert encoded.lengths[1] > 0 == encoded.lengths[0] and encoded.decoded[1] is None
    assert len(encoded.buffer) == sum(encoded.lengths)  # JPEGs travel as one buffer
    batch, errors = preprocess(encoded)
    reference = torch.stack([bb.transform()(source.open_image(s)) for s in samples])
    assert batch.shape == reference.shape and batch.dtype == torch.uint8 and errors == [""] * 6
    assert (batch.int() - reference.int()).abs().float().mean() < 2.0


def test_extraction_with_device_decode_has_its_own_key_and_close_features(
    image_folder: Path, tmp_path: Path
) -> None:
    odd = image_folder / "val" / "cat" / "wide.jpg"  # another size: its own resize group
    Image.open(image_folder / "val" / "cat" / "cat_01.jpg").resize((150, 90)).save(odd)
    bad = image_folder / "val" / "coffee" / "coffee_05.jpg"
    bad.write_bytes(bad.read_bytes()[:300])  # truncated: an invalid row, not a stop
    pil = run(image_folder, tmp_path / "s", split="val")
    dev = run(image_folder, tmp_path / "s", split="val", decode="torch")
    (pil_fs,) = [open_store(tmp_path / "s").get(f["group"]) for f in pil.feature_sets]
    (dev_fs,) = [open_store(tmp_path / "s").get(f["group"]) for f in dev.feature_sets]
    assert pil_fs.key != dev_fs.key and dev.rows_computed == 19
    assert dev_fs.attrs["spec"]["preprocessing"]["decode"] == "torch"  # a stable id
    ids = list(dev_fs.array("ids")[:])
    invalid = [ids[i] for i in np.flatnonzero(~dev_fs.array("valid")[:])]
    assert invalid == ["val/coffee/coffee_05.jpg"] and dev.invalid_rows == 1
    valid = dev_fs.array("valid")[:]
    sims = cosine(pil_fs.features[:][valid], dev_fs.features[:][valid])
    assert sims.min() > 0.98, sims.min()

    # an image query to this set is preprocessed the same way: its own row comes back
    embedder = embedder_from_provenance(dev_fs.attrs)
    assert embedder.decode == "torch"
    row = ids.index("val/cat/wide.jpg")
    vector = embedder.embed([Image.open(odd).convert("RGB")])
    assert cosine(vector, dev_fs.features[row : row + 1]).item() > 0.999


def test_bad_decode_mode_and_unsupported_transforms_are_refused() -> None:
    with pytest.raises(SpecError, match="Unknown --decode 'gpu'. Expected pil or torch"):
        ExtractConfig(data="builtin:digits", backbone="resnet18", decode="gpu")
    config = {
        "input_size": (3, 32, 32), "interpolation": "bicubic", "mean": (0.5,) * 3,
        "std": (0.5,) * 3, "crop_pct": 0.9, "crop_mode": "border",
    }  # fmt: skip
    with pytest.raises(SpecError, match="Use --decode pil"):
        tensor_steps(config)
