"""Parameter counts of backbones, from the registry or from the architecture itself.

A count is of the feature extractor (the classifier head removed, as the registry's counts
are). Where the registry has none, the architecture is built on PyTorch's ``meta`` device
without weights (timm ``pretrained=False``, torchvision ``weights=None``): no download, no
memory for the parameters, a fraction of a second; each name is built once per process.
"""

from __future__ import annotations

from functools import cache
from typing import TYPE_CHECKING, Any

from bob_cache.errors import BobCacheError

if TYPE_CHECKING:
    from torch import nn

TORCHVISION_SLUG = "torchvision-"  # how a feature set's slug spells ``tv:`` names


@cache
def count_params(name: str, *, image_size: int | None = None) -> int | None:
    """Parameters of ``name`` (registry name, timm ``arch[.tag]`` or ``tv:<model>``) without
    its classifier head, or None when the name is unknown or cannot be built offline.

    ``image_size`` matters for architectures whose position embeddings follow the input
    (ViTs); the registry's counts are at the default size.
    """
    from bob_cache.backbones.registry import get_backbone_entry

    entry = get_backbone_entry(name)
    if entry is not None and entry.params is not None and image_size is None:
        return entry.params
    try:
        return _count_built(name, image_size=image_size)
    except (BobCacheError, RuntimeError, TypeError, ValueError, KeyError, AttributeError):
        return entry.params if entry is not None else None


def label_to_name(label: str) -> str:
    """The backbone name behind a feature set's slug: ``resnet18.random-s0`` → ``resnet18``,
    ``torchvision-mobilenet_v2.file-b0353104`` → ``tv:mobilenet_v2``."""
    arch = label.partition(".")[0]
    if arch.startswith(TORCHVISION_SLUG):
        return "tv:" + arch.removeprefix(TORCHVISION_SLUG)
    return arch


def _count_built(name: str, *, image_size: int | None) -> int | None:
    import torch

    from bob_cache.backbones.factory import PROVIDERS, split_provider
    from bob_cache.backbones.registry import get_backbone_entry

    entry = get_backbone_entry(name)
    kwargs = dict(entry.arch_kwargs) if entry is not None else {}
    if entry is not None:
        model, provider = entry.arch or entry.model, entry.provider
    else:
        provider, model = split_provider(name)
    if model is None or provider not in ("timm", "torchvision"):
        return None
    if not PROVIDERS.get(provider).has_model(model):
        return None
    with torch.device("meta"):
        net = _timm_net(model, image_size, kwargs) if provider == "timm" else _tv_net(model)
    return sum(p.numel() for p in net.parameters())


def _timm_net(model: str, image_size: int | None, kwargs: dict[str, Any]) -> nn.Module:
    import timm

    if image_size is not None:
        try:
            return timm.create_model(model, pretrained=False, num_classes=0, img_size=image_size,
                                     **kwargs)  # fmt: skip
        except TypeError:  # architectures without an img_size argument (CNNs)
            pass
    return timm.create_model(model, pretrained=False, num_classes=0, **kwargs)


def _tv_net(model: str) -> nn.Module:
    from torch import nn
    from torchvision.models import get_model

    net = get_model(model, weights=None)
    head = [n for n, m in net.named_modules() if isinstance(m, nn.Linear)][-1]  # as the provider
    parent, _, child = head.rpartition(".")
    setattr(net.get_submodule(parent) if parent else net, child, nn.Identity())
    return net
