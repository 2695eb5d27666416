"""A backbone's multi-scale feature pyramid, for the detection and segmentation heads.

Hierarchical models (ResNet, ConvNeXt, Swin, EfficientNet, ...) give one map per stride
through timm's ``forward_intermediates``; the pyramid takes the last map at each of the
strides 4, 8, 16 and 32 they have. Plain ViTs keep one stride throughout: their last map is
turned into four scales with deconvolutions and a pooling, the simple feature pyramid of
ViTDet (Li et al., 2022).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from bob_cache.errors import SpecError

STRIDES = (4, 8, 16, 32)
PYRAMID_FAMILIES = (
    "timm models with stage outputs (forward_intermediates): CNNs such as ResNet, ConvNeXt, "
    "EfficientNet and RegNet, hierarchical transformers such as Swin, and plain ViTs; and "
    "torchvision CNNs built from stages (tv: ResNet, MobileNet, EfficientNet, ConvNeXt, VGG)"
)


def pyramid_levels(reductions: list[int], *, name: str) -> tuple[list[int], bool]:
    """The stage indices that feed the pyramid (the last stage at each stride of
    :data:`STRIDES`), and whether the model is plain (one stride throughout, ViT-like), so
    that a simple pyramid must be built from its last map."""
    if len(set(reductions)) == 1:
        return [len(reductions) - 1], True
    levels = [
        max(i for i, r in enumerate(reductions) if r == s) for s in STRIDES if s in reductions
    ]
    if len(levels) < 2:
        raise SpecError(
            f"Backbone '{name}' has stage outputs at strides {sorted(set(reductions))} but a "
            f"pyramid needs at least two of {list(STRIDES)}. Pyramids come from {PYRAMID_FAMILIES}."
        )
    return levels, False


class TimmStages(nn.Module):
    """Stage maps of a timm model through ``forward_intermediates``."""

    def __init__(self, net: nn.Module, *, name: str) -> None:
        super().__init__()
        info = net.feature_info
        self.levels, self.plain = pyramid_levels([int(f["reduction"]) for f in info], name=name)
        self.channels = [int(info[i]["num_chs"]) for i in self.levels]
        if hasattr(net, "prune_intermediate_layers"):  # drop the head and unused blocks
            net.prune_intermediate_layers(self.levels, prune_norm=True, prune_head=True)
        self.net = net

    @staticmethod
    def accepts(net: nn.Module) -> bool:
        return bool(getattr(net, "feature_info", None)) and hasattr(net, "forward_intermediates")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = self.net.forward_intermediates(
            x, indices=self.levels, intermediates_only=True, output_fmt="NCHW"
        )
        return [m[0] if isinstance(m, tuple) else m for m in maps]


class SequentialStages(nn.Module):
    """Stage maps of a torchvision CNN run block by block: the blocks of ``features``
    (MobileNet, EfficientNet, ConvNeXt, VGG) or ResNet's stem and ``layer1``…``layer4``.
    Strides are measured with one forward pass on a blank image."""

    def __init__(self, net: nn.Module, *, name: str) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(_torchvision_blocks(net))
        # the whole network, unregistered: its parameters are those of ``blocks``
        object.__setattr__(self, "net", net)
        with torch.no_grad():
            x, shapes = torch.zeros(1, 3, 64, 64), []
            for block in self.blocks.eval():
                x = block(x)
                if x.ndim != 4 or x.shape[-1] != x.shape[-2]:  # not NCHW (e.g. Swin's NHWC)
                    raise _no_pyramid(name)
                shapes.append((x.shape[1], 64 // x.shape[-1]))
        self.levels, self.plain = pyramid_levels([r for _, r in shapes], name=name)
        self.channels = [int(shapes[i][0]) for i in self.levels]

    @staticmethod
    def accepts(net: nn.Module) -> bool:
        return bool(_torchvision_blocks(net))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        maps = []
        for i, block in enumerate(self.blocks[: self.levels[-1] + 1]):
            x = block(x)
            if i in self.levels:
                maps.append(x)
        return maps


STAGE_ADAPTERS: tuple[type[nn.Module], ...] = (TimmStages, SequentialStages)


def create_stages(net: nn.Module, *, name: str) -> nn.Module:
    """The first adapter that can read ``net``'s stages.

    Raises:
        SpecError: none can; the message names the families that give a pyramid.
    """
    for adapter in STAGE_ADAPTERS:
        if adapter.accepts(net):  # type: ignore[attr-defined]
            return adapter(net, name=name)
    raise _no_pyramid(name)


def _no_pyramid(name: str) -> SpecError:
    return SpecError(
        f"Backbone '{name}' cannot give a feature pyramid: it has no stage outputs. "
        f"Pyramids come from {PYRAMID_FAMILIES}. Fix: pick one of those (e.g. resnet50, "
        "convnext_tiny, swin_tiny_patch4_window7_224, vit_base_patch16_224, tv:mobilenet_v2)."
    )


def _torchvision_blocks(net: nn.Module) -> list[nn.Module]:
    features = getattr(net, "features", None)
    if isinstance(features, nn.Sequential):
        return list(features)
    names = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")
    if all(hasattr(net, n) for n in names):
        stem = nn.Sequential(*(getattr(net, n) for n in names[:4]))
        return [stem, *(getattr(net, n) for n in names[4:])]
    return []


class SimplePyramid(nn.Module):
    """ViTDet's simple feature pyramid: one stride-16 map → strides 4, 8, 16 and 32."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        half, quarter = channels // 2, channels // 4
        self.scales = nn.ModuleList(
            [
                nn.Sequential(
                    nn.ConvTranspose2d(channels, half, 2, stride=2),
                    nn.GroupNorm(group_count(half), half),
                    nn.GELU(),
                    nn.ConvTranspose2d(half, quarter, 2, stride=2),
                ),
                nn.ConvTranspose2d(channels, half, 2, stride=2),
                nn.Identity(),
                nn.MaxPool2d(2, stride=2),
            ]
        )
        self.out_channels = [quarter, half, channels, channels]

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return [scale(x) for scale in self.scales]


class PyramidBody(nn.Module):
    """The backbone as a module returning an ordered dict of maps (``"0"`` finest), the input
    torchvision's FPN and the segmentation head take.

    Args:
        net: a timm model, or a torchvision CNN.
        name: the backbone's name, for messages.
        frozen: keep the backbone's weights fixed (and its normalization in eval mode).
    """

    def __init__(self, net: nn.Module, *, name: str, frozen: bool = False) -> None:
        super().__init__()
        self.stages = create_stages(net, name=name)
        channels = self.stages.channels
        self.simple = SimplePyramid(channels[-1]) if self.stages.plain else None
        self.in_channels = self.simple.out_channels if self.simple is not None else channels
        self.frozen = frozen
        if frozen:
            self.stages.requires_grad_(False)

    @property
    def net(self) -> nn.Module:
        """The backbone network (for layer-wise learning rates)."""
        return self.stages.net

    def train(self, mode: bool = True) -> PyramidBody:
        super().train(mode)
        if self.frozen:
            self.stages.eval()
        return self

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.frozen):
            maps = self.stages(x)
        if self.simple is not None:
            maps = self.simple(maps[-1])
        return OrderedDict((str(i), m) for i, m in enumerate(maps))


def group_count(channels: int) -> int:
    return next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)
