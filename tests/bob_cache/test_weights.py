"""Local checkpoints: real published predictions, safe loading, and clear mismatches."""

from __future__ import annotations

import collections
from pathlib import Path

import pytest
import torch
from PIL import Image

from bob_cache.backbones import create_backbone
from bob_cache.errors import WeightsError


@pytest.mark.parametrize(("image", "expected"), [("chelsea", {285, 281, 282}), ("coffee", {967})])
def test_local_checkpoint_gives_the_published_imagenet_predictions(
    mobilenet_weights: Path, image: str, expected: set[int]
) -> None:
    """torchvision's MobileNetV2 (top-1 71.9%) calls Chelsea a cat and the coffee an espresso."""
    import skimage.data

    bb = create_backbone("tv:mobilenet_v2", weights=mobilenet_weights)
    assert bb.weights.file.sha256.startswith("b0353104")  # torchvision names files by hash
    x = bb.preprocess(Image.fromarray(getattr(skimage.data, image)()))
    with torch.no_grad():
        feats = bb(x)["final"]
        top1 = int(bb.head(feats).argmax())
    assert feats.shape == (1, 1280)
    assert top1 in expected


def test_checkpoint_for_another_architecture_is_refused(mobilenet_weights: Path) -> None:
    with pytest.raises(
        WeightsError, match=r"does not fit architecture 'test_resnet'.*Check that --backbone"
    ):
        create_backbone("test_resnet", weights=mobilenet_weights)


def test_unreadable_and_missing_files(tmp_path: Path) -> None:
    garbage = tmp_path / "broken.pth"
    garbage.write_bytes(b"this is not a checkpoint")
    with pytest.raises(
        WeightsError, match="Cannot read weights file .*re-save just the state_dict"
    ):
        create_backbone("test_resnet", weights=garbage)
    with pytest.raises(WeightsError, match="does not exist"):
        create_backbone("test_resnet", weights=tmp_path / "absent.pth")


def test_pickled_code_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.pth"
    torch.save({"state_dict": collections.Counter(a=1)}, path)  # not a plain tensor dict
    with pytest.raises(WeightsError):
        create_backbone("test_resnet", weights=path)


def test_wrapped_prefixed_and_headless_checkpoints_load(tmp_path: Path) -> None:
    """DDP 'module.' prefixes, {'state_dict': ...} wrappers and missing heads are common."""
    src = create_backbone("test_resnet", random_init=True, seed=5)
    state = {f"module.{k}": v for k, v in src.model.state_dict().items() if not k.startswith("fc.")}
    path = tmp_path / "wrapped.pth"
    torch.save({"state_dict": state, "epoch": 3}, path)
    loaded = create_backbone("test_resnet", weights=path)
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x)["final"], src(x)["final"])
    assert loaded.slug.startswith("test_resnet.file-")


def test_safetensors_checkpoint_loads(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    src = create_backbone("test_convnext", random_init=True, seed=7)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in src.model.state_dict().items()}, str(path))
    loaded = create_backbone("test_convnext", weights=path)
    x = torch.rand(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x)["final"], src(x)["final"])


def test_torchvision_checkpoint_gets_the_recipe_its_weights_were_evaluated_with(
    mobilenet_weights: Path,
) -> None:
    """The offline file is IMAGENET1K_V1 (resize 256, crop 224), not DEFAULT's V2 (resize 232)."""
    import skimage.data
    from torchvision.models import MobileNet_V2_Weights

    reference = MobileNet_V2_Weights.IMAGENET1K_V1.transforms()
    assert (reference.resize_size, reference.crop_size) == ([256], [224])
    bb = create_backbone("tv:mobilenet_v2", weights=mobilenet_weights)
    cfg = bb.data_config
    assert bb.pretrained_tag == "IMAGENET1K_V1"
    assert cfg["input_size"] == [3, 224, 224] and cfg["crop_pct"] == 224 / 256
    assert cfg["interpolation"] == reference.interpolation.value == "bilinear"
    assert (cfg["mean"], cfg["std"]) == (list(reference.mean), list(reference.std))
    image = Image.fromarray(skimage.data.astronaut())
    resize = bb.transform().transforms[0]
    assert resize.size == 256
    assert torch.equal(bb.preprocess(image)[0], reference(image))


def test_unknown_torchvision_checkpoint_falls_back_to_the_default_recipe(
    mobilenet_weights: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    from torchvision.models import MobileNet_V2_Weights

    resaved = tmp_path / "finetuned.pth"  # same tensors, new bytes: not a published file
    torch.save(torch.load(mobilenet_weights, weights_only=True), resaved)
    with caplog.at_level("WARNING", logger="bob_cache.backbones.torchvision_provider"):
        bb = create_backbone("tv:mobilenet_v2", weights=resaved)
    assert bb.pretrained_tag is None
    assert "finetuned.pth is none of torchvision's published" in caplog.text
    default = MobileNet_V2_Weights.DEFAULT.transforms()
    assert bb.data_config["crop_pct"] == default.crop_size[0] / default.resize_size[0]
    random = create_backbone("tv:mobilenet_v2", random_init=True)
    assert random.pretrained_tag == MobileNet_V2_Weights.DEFAULT.name
