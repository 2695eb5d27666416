"""Backbone metadata for the report: pretraining data is a name (never a path), random init
saw none, and parameter counts come from the architecture when nobody gives one."""

from __future__ import annotations

import socket

import pytest

from bob_cache.backbones.params import count_params, label_to_name
from bob_cache.pipelines.battle import backbone_metadata
from bob_cache.ranking.metadata import get_size_class, resolve_backbone_info
from bob_cache.suite import BackboneSpec

# torchvision's MobileNetV2 has 3,504,872 parameters; its classifier 1280 × 1000 + 1000.
MOBILENET_V2 = 3_504_872 - (1280 * 1000 + 1000)
VIT_TINY = 5_717_416 - (192 * 1000 + 1000)  # timm's vit_tiny_patch16_224 less its head


@pytest.fixture
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kw: object) -> None:
        raise AssertionError("a parameter count tried to reach the network")

    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_params_are_counted_from_the_architecture_without_weights(offline: None) -> None:
    count_params.cache_clear()
    assert count_params("tv:mobilenet_v2") == MOBILENET_V2 == 2_223_872
    assert count_params("vit_tiny_patch16_224") == VIT_TINY
    assert count_params("vit_tiny_patch16_224.augreg_in21k") == VIT_TINY  # a tag: same arch
    assert count_params("resnet50") == 23_508_032  # the registry's count, nothing built
    assert count_params("no_such_arch") is None and count_params("tv:no_such_model") is None
    count_params("tv:mobilenet_v2")
    assert count_params.cache_info().hits >= 1  # built once per name
    assert label_to_name("torchvision-mobilenet_v2.file-b0353104") == "tv:mobilenet_v2"
    assert label_to_name("vit_tiny_patch16_224.random-s0") == "vit_tiny_patch16_224"


def test_a_report_label_without_params_gets_the_models_count(offline: None) -> None:
    """MobileNetV2 and vit_tiny landed in size class "unknown" when nobody gave params."""
    mobilenet = resolve_backbone_info("torchvision-mobilenet_v2.file-b0353104")
    assert mobilenet.params == MOBILENET_V2 and get_size_class(mobilenet.params) == "small"
    vit = resolve_backbone_info("vit_tiny_patch16_224.random-s0", {"family": "ViT"})
    assert vit.params == VIT_TINY and vit.family == "ViT"
    assert resolve_backbone_info("no_such_arch.x").params is None


def test_a_random_init_backbone_has_no_pretraining_data() -> None:
    """Neither the registry (resnet18 is ImageNet-1k there) nor `data: none` makes it so."""
    bare = resolve_backbone_info("resnet18.random-s0")
    assert (bare.method, bare.data, bare.data_images) == ("random init", None, None)
    given = {"family": "ResNet", "method": "random init", "data": "none", "params": 11176512}
    said = resolve_backbone_info("resnet18.random-s0", given)
    assert (said.method, said.data, said.data_images) == ("random init", None, None)
    # metadata written by battles before the fix held the suite's folder joined to the name
    legacy = resolve_backbone_info("resnet18.random-s0", {**given, "data": "/x/suites/none"})
    assert legacy.data is None
    old = resolve_backbone_info("torchvision-mobilenet_v2.file-b0353104",
                                {"data": "/tmp/fresh/suites/ImageNet-1k"})  # fmt: skip
    assert (old.data, old.data_images) == ("ImageNet-1k", 1.28e6)


def test_the_battles_metadata_writer(offline: None) -> None:
    random = backbone_metadata(BackboneSpec(name="resnet18", label="rn18", random_init=True))
    assert random == {"label": "rn18", "name": "resnet18", "family": "ResNet",
                      "method": "random init", "data": None, "params": 11_176_512}  # fmt: skip
    said_none = backbone_metadata(
        BackboneSpec(name="vit_tiny_patch16_224", random_init=True, data="none", family="ViT")
    )
    assert (said_none["data"], said_none["params"]) == (None, VIT_TINY)
    tv = backbone_metadata(BackboneSpec(name="tv:mobilenet_v2", data="ImageNet-1k"))
    assert (tv["data"], tv["params"]) == ("ImageNet-1k", MOBILENET_V2)
    pretrained = backbone_metadata(BackboneSpec(name="resnet18"))  # the registry's entry
    assert (pretrained["method"], pretrained["data"]) == ("supervised", "ImageNet-1k")
