"""Converters: official checkpoint files of the BoB field → the keys of a timm architecture.

A converter takes the state dict as the official file holds it (read with ``weights_only``
and unwrapped from ``{"state_dict": ...}``) and returns it in the layout of the timm
architecture its registry entry names. It keeps the backbone, drops what the official file
is known to carry besides (projection heads, momentum encoders, depth decoders), and
:func:`load_official_checkpoint` refuses anything else, so a wrong file fails loudly
instead of loading half of it. Key layouts follow the official code: MoCo v3's
``convert_to_deit.py``, DPT/MiDaS's ``vit.py``, VICRegL's ``convnext.py`` and timm's own
``convnext.checkpoint_filter_fn``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

import torch
from torch import nn

from bob_cache.backbones.weights import WeightsFile, describe_mismatch, load_state_dict
from bob_cache.errors import CheckpointRequiredError, WeightsError
from bob_cache.registry import Registry, UnknownNameError

if TYPE_CHECKING:
    from bob_cache.backbones.registry import BackboneEntry

StateDict = dict[str, torch.Tensor]
Converter = Callable[[StateDict, str], StateDict]
"""``(state, expected) -> state``; ``expected`` names the official file for messages."""

CONVERTERS: Registry[Converter] = Registry("converter")


def register_converter(name: str) -> Callable[[Converter], Converter]:
    """Decorator: register a converter under ``name`` (what ``BackboneEntry.converter`` names)."""
    return CONVERTERS.register(name)


def get_converter(name: str) -> Converter:
    """The converter registered as ``name``."""
    if name not in CONVERTERS:
        known = ", ".join(list_converters())
        raise UnknownNameError(f"No checkpoint converter '{name}'. Registered: {known}.")
    return CONVERTERS.get(name)


def list_converters() -> list[str]:
    """Names of the registered converters."""
    return sorted(CONVERTERS)


def describe_checkpoint(entry: BackboneEntry) -> str:
    """``the official <name> checkpoint <file> (<url>)``, for messages."""
    return f"the official {entry.name} checkpoint {entry.checkpoint} ({entry.source_url})"


def checkpoint_required(entry: BackboneEntry) -> CheckpointRequiredError:
    """The error for an official-checkpoint entry used without ``--weights``."""
    return CheckpointRequiredError(
        f"{entry.name} has no timm weights; download the official checkpoint "
        f"{entry.checkpoint} ({entry.source_url}) and pass --weights FILE "
        f"(it is converted to {_target(entry)} on load), or use "
        "random weights (--random-init; `finetune --mode random-init`)."
    )


def load_official_checkpoint(model: nn.Module, weights: WeightsFile, entry: BackboneEntry) -> None:
    """Convert ``weights`` with ``entry``'s converter and load it into ``model``, strictly.

    Every parameter and buffer of ``model`` must come from the file, with its shape; a key
    the converter neither mapped nor dropped is an error.

    Raises:
        WeightsError: the file is not the checkpoint the entry expects.
    """
    expected = describe_checkpoint(entry)
    state = get_converter(str(entry.converter))(load_state_dict(weights), expected)
    target = model.state_dict()
    missing = [k for k in target if k not in state]
    unexpected = [k for k in state if k not in target]
    wrong_shape = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(target[k].shape)}"
        for k in target
        if k in state and state[k].shape != target[k].shape
    ]
    if missing or unexpected or wrong_shape:
        raise WeightsError(
            f"'{weights.path.name}' does not fit {entry.name} ({_target(entry)} after "
            f"conversion): {describe_mismatch(missing, unexpected, wrong_shape)}. Expected "
            f"{expected}; pass that file with --weights (ViTs also need the default "
            "--image-size)."
        )
    model.load_state_dict(state, strict=True)


def select_keys(
    state: StateDict, *, keep: str, expected: str, drop: Iterable[str] = ()
) -> StateDict:
    """The tensors under prefix ``keep`` (prefix removed), without those under ``drop``.

    Raises:
        WeightsError: no key starts with ``keep``, or a key is under neither prefix.
    """
    dropped = tuple(drop)
    kept: StateDict = {}
    stray: list[str] = []
    for key, value in state.items():
        if dropped and key.startswith(dropped):
            continue
        if key.startswith(keep):
            kept[key[len(keep) :]] = value
        else:
            stray.append(key)
    if not kept:
        raise WeightsError(
            f"The weights file is not {expected}: it has no keys starting with '{keep}' "
            f"(its keys begin {_sample(state)}). Pass the official file with --weights."
        )
    if stray:
        raise WeightsError(
            f"The weights file is not {expected}: {len(stray)} key(s) are neither under "
            f"'{keep}' nor known extras of that file ({_sample(stray)}). Pass the official "
            "file with --weights."
        )
    return kept


def _target(entry: BackboneEntry) -> str:
    return f"timm '{entry.arch}'" if entry.provider == "timm" else f"'{entry.arch}'"


def _sample(keys: Iterable[str], n: int = 3) -> str:
    items = list(keys)
    return ", ".join(items[:n]) + (" ..." if len(items) > n else "") if items else "(none)"


@register_converter("torchvision_resnet")
def convert_torchvision_resnet(state: StateDict, expected: str) -> StateDict:
    """DINO and VICReg ResNet-50 trunks: torchvision key names (which timm's ResNet shares),
    no ``fc``; taken as they are."""
    return select_keys(state, keep="", expected=expected)


@register_converter("mocov3")
def convert_mocov3(state: StateDict, expected: str) -> StateDict:
    """MoCo v3 ``*.pth.tar``: ``module.base_encoder.*`` without its projector (``head`` of a
    ViT, ``fc`` of a ResNet), as ``convert_to_deit.py`` keeps it; the momentum encoder and
    the predictor are dropped."""
    drop = (
        "module.base_encoder.head.",
        "module.base_encoder.fc.",
        "module.momentum_encoder.",
        "module.predictor.",
    )
    return select_keys(state, keep="module.base_encoder.", drop=drop, expected=expected)


@register_converter("midas_dpt")
def convert_midas_dpt(state: StateDict, expected: str) -> StateDict:
    """MiDaS / DPT checkpoints: ``pretrained.model.*`` is the timm ViT; its ImageNet head,
    the readout projections (``pretrained.act_postprocess*``) and the depth decoder
    (``scratch.*``) are dropped."""
    drop = ("pretrained.model.head.", "pretrained.act_postprocess", "scratch.")
    return select_keys(state, keep="pretrained.model.", drop=drop, expected=expected)


_CONVNEXT_RENAMES = (
    (r"^downsample_layers\.0\.", "stem."),
    (r"^downsample_layers\.(\d+)\.", r"stages.\1.downsample."),
    (r"^stages\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2."),
    (r"\.dwconv\.", ".conv_dw."),
    (r"\.pwconv(\d)\.", r".mlp.fc\1."),
    (r"^norm\.", "norm_pre."),
)


@register_converter("vicregl_convnext")
def convert_vicregl_convnext(state: StateDict, expected: str) -> StateDict:
    """VICRegL ConvNeXt (Facebook's ConvNeXt layout, no head) → timm ConvNeXt built with
    ``head_norm_first``: keys renamed as timm's ``convnext.checkpoint_filter_fn`` does, the
    final LayerNorm (VICRegL normalizes every position, then averages) becomes ``norm_pre``,
    and blocks trained without layer scale get ``gamma = 1`` (an exact identity)."""
    if not any(k.startswith("downsample_layers.0.") for k in state):
        raise WeightsError(
            f"The weights file is not {expected}: it has no ConvNeXt stem "
            f"'downsample_layers.0.*' (its keys begin {_sample(state)})."
        )
    out: StateDict = {}
    for key, value in state.items():
        for pattern, repl in _CONVNEXT_RENAMES:
            key = re.sub(pattern, repl, key)
        out[key] = value
    for key in [k for k in out if k.endswith(".mlp.fc2.bias")]:
        out.setdefault(key.removesuffix("mlp.fc2.bias") + "gamma", torch.ones_like(out[key]))
    return out
