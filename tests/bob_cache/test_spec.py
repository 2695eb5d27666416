"""Feature keys: everything that changes the numbers changes the key; nothing else does."""

from __future__ import annotations

import pytest

from bob_cache.backbones import create_backbone
from bob_cache.spec import feature_key, feature_spec


def key(backbone_kwargs: dict | None = None, **overrides: object) -> str:
    bb = create_backbone("test_resnet", **{"random_init": True, **(backbone_kwargs or {})})
    args = {
        "precision": "fp32",
        "dtype": "float16",
        "dataset_fingerprint": "abc",
        "limit": None,
        **overrides,
    }
    return feature_key(feature_spec(bb, bb.outputs[0], **args))


def test_key_is_stable_across_processes_and_instances() -> None:
    assert key() == key()
    assert len(key()) == 12


@pytest.mark.parametrize(
    ("backbone_kwargs", "overrides"),
    [
        ({"seed": 1}, {}),
        ({"image_size": 64}, {}),
        ({"pool": "avg"}, {}),
        ({"layers": ["layer3"]}, {}),
        ({}, {"precision": "bf16"}),
        ({}, {"dtype": "float32"}),
        ({}, {"dataset_fingerprint": "abd"}),
        ({}, {"limit": 100}),
    ],
)
def test_each_numeric_ingredient_changes_the_key(backbone_kwargs: dict, overrides: dict) -> None:
    assert key(backbone_kwargs, **overrides) != key()
