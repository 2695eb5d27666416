"""Backbone registry, factory, outputs (layers × pooling) and weights choices."""

from __future__ import annotations

import pytest
import torch

from bob_cache.backbones import (
    create_backbone,
    get_backbone_entry,
    list_backbones,
    resolve_backbone_name,
)
from bob_cache.errors import BackboneUnavailableError, SpecError, UnknownBackboneError


def test_registry_covers_the_bob_field_and_flags_missing_weights() -> None:
    entries = {e.name: e for e in list_backbones()}
    for name in (
        "resnet50",
        "resnet101",
        "convnext_base_in22k",
        "swinv2_tiny",
        "vit_base_in21k",
        "dino_vit_small",
        "mae_vit_base",
        "clip_vit_base_laion2b",
        "clip_vit_base_openai",
        "sam_vit_base",
    ):
        assert entries[name].available, name
    missing = {n for n, e in entries.items() if not e.available}
    assert {"mocov3_vit_base", "vicreg_resnet50", "stable_diffusion_encoder"} <= missing
    assert all("not in timm" in entries[n].note for n in missing)


def test_catalog_params_and_dims_match_timm() -> None:
    """The listing's numbers are real: rebuild every available entry on the meta device."""
    import timm

    with torch.device("meta"):
        for entry in list_backbones():
            if not entry.available:
                continue
            model = timm.create_model(entry.model, pretrained=False, num_classes=0)
            params = sum(p.numel() for p in model.parameters())
            dim = model(torch.zeros(1, *model.pretrained_cfg["input_size"])).shape[-1]
            assert (params, dim) == (entry.params, entry.feature_dim), entry.name


def test_registry_names_resolve_before_timm_names() -> None:
    provider, model = resolve_backbone_name("resnet50")
    assert (provider.name, model) == ("timm", "resnet50.tv_in1k")
    assert resolve_backbone_name("convnext_tiny.fb_in22k")[1] == "convnext_tiny.fb_in22k"
    assert resolve_backbone_name("tv:mobilenet_v2")[0].name == "torchvision"


def test_unknown_backbone_suggests_close_matches() -> None:
    with pytest.raises(UnknownBackboneError, match=r"Did you mean 'resnet50'.*bob-cache backbones"):
        resolve_backbone_name("resnt50")
    with pytest.raises(UnknownBackboneError, match="Unknown backbone 'resnet50.no_such_tag'"):
        resolve_backbone_name("resnet50.no_such_tag")


def test_bob_entry_without_timm_weights_names_the_fix() -> None:
    with pytest.raises(BackboneUnavailableError, match="--weights FILE"):
        resolve_backbone_name("mocov3_vit_base")
    assert get_backbone_entry("mocov3_vit_base").family == "ViT"


def test_pretrained_download_failure_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))  # empty cache: nothing to load offline
    with pytest.raises(BackboneUnavailableError, match="--random-init"):
        create_backbone("test_resnet.r160_in1k")


def test_random_init_is_seeded_and_reproducible() -> None:
    x = torch.rand(2, 3, 32, 32)
    a = create_backbone("test_resnet", random_init=True, seed=1)(x)["final"]
    b = create_backbone("test_resnet", random_init=True, seed=1)(x)["final"]
    c = create_backbone("test_resnet", random_init=True, seed=2)(x)["final"]
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("arch", ["test_resnet", "test_vit", "test_convnext"])
def test_final_head_output_feeds_the_models_own_classifier(arch: str) -> None:
    bb = create_backbone(arch, random_init=True)
    x = torch.rand(2, *bb.data_config["input_size"])
    with torch.no_grad():
        feats = bb(x)["final"]
        assert torch.allclose(bb.head(feats), bb.model(x), atol=1e-5)
    assert feats.shape == (2, bb.model.num_features)


def test_layers_and_pooling_in_one_pass() -> None:
    bb = create_backbone(
        "test_vit", random_init=True, layers=["final", "-2", "blocks.1"], pool="token"
    )
    names = [o.name for o in bb.outputs]
    assert names == ["blocks.5:token", "blocks.4:token", "blocks.1:token"]  # final → last block
    x = torch.rand(2, *bb.data_config["input_size"])
    with torch.no_grad():
        out = bb(x)
        _final, inters = bb.model.forward_intermediates(
            x, indices=[5], norm=True, return_prefix_tokens=True
        )
    assert torch.allclose(out["blocks.5:token"], inters[0][1][:, 0])
    assert {t.shape for t in out.values()} == {(2, 64)}


def test_default_pooling_resolves_per_model() -> None:
    cnn = create_backbone("test_resnet", random_init=True, layers=["final", "layer3"])
    assert [(o.layer, o.pool) for o in cnn.outputs] == [("final", "head"), ("layer3", "avg")]
    vit = create_backbone("test_vit", random_init=True, layers=["blocks.2"])
    assert [(o.layer, o.pool) for o in vit.outputs] == [("blocks.2", "token")]
    assert cnn.output_dims() == {"final": 96, "layer3:avg": 192}


def test_bad_layer_and_pool_name_the_choices() -> None:
    with pytest.raises(
        SpecError, match="Expected 'final', an index from -5 to 4, or one of: act1, layer1"
    ):
        create_backbone("test_resnet", random_init=True, layers=["layer9"])
    with pytest.raises(SpecError, match="needs a model with a class token"):
        create_backbone("test_resnet", random_init=True, pool="token")
    with pytest.raises(SpecError, match="Expected one of: default, avg, token"):
        create_backbone("test_resnet", random_init=True, pool="max")
    with pytest.raises(SpecError, match="exclude each other"):
        create_backbone("test_resnet", random_init=True, weights="x.pth")


def test_image_size_overrides_preprocessing_and_builds_vits_at_that_size() -> None:
    vit = create_backbone("test_vit", random_init=True, image_size=64)
    assert vit.data_config["input_size"] == [3, 64, 64]
    assert vit.output_dims() == {"final": 64}
    assert create_backbone("test_resnet", random_init=True, image_size=48).data_config[
        "input_size"
    ] == [3, 48, 48]


def test_identity_and_slug_name_the_weights() -> None:
    bb = create_backbone("test_resnet.r160_in1k", random_init=True, seed=3)
    assert bb.slug == "test_resnet.random-s3"
    assert bb.identity()["weights"] == {"kind": "random", "tag": "random-s3", "seed": 3}
    assert bb.describe()["params"] == sum(p.numel() for p in bb.model.parameters()) - sum(
        p.numel() for p in bb.head.parameters()
    )


def test_uint8_transform_plus_batch_normalize_equals_timms_eval_transform() -> None:
    import skimage.data
    from PIL import Image
    from timm.data import create_transform

    bb = create_backbone("test_vit", random_init=True)
    image = Image.fromarray(skimage.data.astronaut())
    reference = create_transform(**bb.data_config, is_training=False)(image)
    u8 = bb.transform()(image)
    assert u8.dtype == torch.uint8 and u8.shape == reference.shape
    assert torch.equal(bb.normalize(u8.unsqueeze(0))[0], reference)
    assert torch.equal(bb.preprocess(image)[0], reference)


@pytest.mark.parametrize(
    ("name", "crop_pct", "interpolation", "resize"),
    [
        ("dino_vit_small", 0.875, "bicubic", 256),  # DINO's eval_linear.py
        ("mae_vit_base", 0.875, "bicubic", 256),  # MAE's main_linprobe.py
        ("clip_vit_base_openai", 1.0, "bicubic", 224),  # CLIP's Resize(224) + CenterCrop(224)
        ("clip_resnet50_openai", 1.0, "bicubic", 224),
        ("swinv2_tiny", 0.875, "bicubic", 292),  # Swin's Resize(int(256 / 224 * 256))
    ],
)
def test_registry_entries_get_their_weights_official_evaluation_recipe(
    name: str, crop_pct: float, interpolation: str, resize: int
) -> None:
    """timm's configs of these tags carry its generic crop 0.9, not the authors' recipe."""
    bb = create_backbone(name, random_init=True)
    assert (bb.data_config["crop_pct"], bb.data_config["interpolation"]) == (
        crop_pct,
        interpolation,
    )
    assert bb.transform().transforms[0].size == resize


@pytest.mark.parametrize(("name", "tv_model"), [("resnet50", "resnet50"), ("resnet18", "resnet18")])
def test_torchvision_weights_in_timm_keep_torchvisions_v1_recipe(name: str, tv_model: str) -> None:
    from torchvision.models import get_model_weights

    reference = get_model_weights(tv_model).IMAGENET1K_V1.transforms()
    bb = create_backbone(name, random_init=True)
    resize = bb.transform().transforms[0]
    assert (resize.size, bb.data_config["input_size"][1:]) == (reference.resize_size[0], [224, 224])
    assert bb.data_config["interpolation"] == reference.interpolation.value
    assert bb.data_config["mean"] == list(reference.mean)
