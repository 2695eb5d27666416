"""The networks fine-tuned over a backbone: a classifier, torchvision's two-stage detectors
(Faster and Mask R-CNN) on an FPN over the backbone's pyramid, and an FPN semantic head."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from bob_cache.finetune.pyramid import PyramidBody, group_count

FPN_CHANNELS = 256


class Classifier(nn.Module):
    """A backbone with a new linear head; ``frozen`` trains the head only.

    timm models get their own classifier reset to ``num_classes``; other networks (torchvision
    backbones, whose head bob-cache replaced by an identity) get a Linear layer on their
    pooled output.
    """

    def __init__(self, net: nn.Module, *, num_classes: int, frozen: bool = False) -> None:
        super().__init__()
        self.net = net
        self.head: nn.Module | None = None
        if hasattr(net, "reset_classifier"):
            net.reset_classifier(num_classes)
        else:
            with torch.no_grad():
                dim = net.eval()(torch.zeros(1, 3, 64, 64)).shape[-1]
            self.head = nn.Linear(dim, num_classes)
        self.frozen = frozen
        if frozen:
            net.requires_grad_(False)
            self.classifier.requires_grad_(True)

    @property
    def classifier(self) -> nn.Module:
        return self.head if self.head is not None else self.net.get_classifier()

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if self.frozen:  # normalization statistics stay the pretrained ones
            self.net.eval()
            self.classifier.train(mode)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.net(x)
        return self.head(out) if self.head is not None else out


class Normalized(nn.Module):
    """uint8 batches in, the wrapped network on normalized float input."""

    def __init__(self, model: nn.Module, mean: list[float], std: list[float]) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(mean).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, -1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x.float().div(255).sub(self.mean).div(self.std))


class FPNBackbone(nn.Module):
    """Pyramid body + torchvision's FPN (with a max-pooled extra level, as Mask R-CNN uses)."""

    def __init__(self, body: PyramidBody, *, extra_level: bool = True) -> None:
        super().__init__()
        from torchvision.ops import FeaturePyramidNetwork
        from torchvision.ops.feature_pyramid_network import LastLevelMaxPool

        self.body = body
        self.fpn = FeaturePyramidNetwork(
            body.in_channels, FPN_CHANNELS, extra_blocks=LastLevelMaxPool() if extra_level else None
        )
        self.out_channels = FPN_CHANNELS

    def forward(self, x: torch.Tensor) -> OrderedDict[str, torch.Tensor]:
        return self.fpn(self.body(x))


def create_detector(
    body: PyramidBody,
    *,
    num_classes: int,
    masks: bool,
    image_size: int,
    mean: list[float],
    std: list[float],
) -> nn.Module:
    """Faster R-CNN (``masks=False``) or Mask R-CNN over ``body``'s FPN.

    Images are resized to ``image_size`` squared (torchvision's ``fixed_size``), so plain ViTs
    see the grid they were built for. Anchors: two sizes per level, 4 and 8 times its stride,
    three aspect ratios; ``num_classes`` counts the background. Below torchvision's 800-pixel
    reference the proposal and RoI-sampling budgets shrink with the image area (to a floor),
    so small images do not spend their time on thousands of empty proposals.
    """
    from torchvision.models.detection import FasterRCNN, MaskRCNN
    from torchvision.models.detection.anchor_utils import AnchorGenerator
    from torchvision.ops import MultiScaleRoIAlign

    backbone = FPNBackbone(body)
    levels = len(body.in_channels)
    strides = [4 * 2**i for i in range(levels + 1)]
    anchors = AnchorGenerator(
        sizes=tuple((4 * s, 8 * s) for s in strides),
        aspect_ratios=((0.5, 1.0, 2.0),) * len(strides),
    )
    names = [str(i) for i in range(levels)]
    kwargs: dict[str, Any] = dict(
        num_classes=num_classes,
        min_size=image_size,
        max_size=image_size,
        fixed_size=(image_size, image_size),
        image_mean=mean,
        image_std=std,
        rpn_anchor_generator=anchors,
        box_roi_pool=MultiScaleRoIAlign(names, output_size=7, sampling_ratio=2),
        **proposal_budgets(image_size),
    )
    if masks:
        kwargs["mask_roi_pool"] = MultiScaleRoIAlign(names, output_size=14, sampling_ratio=2)
        return MaskRCNN(backbone, **kwargs)
    return FasterRCNN(backbone, **kwargs)


def proposal_budgets(image_size: int, *, reference: int = 800) -> dict[str, int]:
    """torchvision's RPN and RoI budgets scaled by ``(image_size / reference)²``, floored."""
    scale = min(1.0, (image_size / reference) ** 2)
    defaults = {  # torchvision's defaults, and the floor of each
        "rpn_pre_nms_top_n_train": (2000, 256), "rpn_pre_nms_top_n_test": (1000, 256),
        "rpn_post_nms_top_n_train": (2000, 128), "rpn_post_nms_top_n_test": (1000, 128),
        "box_batch_size_per_image": (512, 64),
    }  # fmt: skip
    return {k: max(floor, round(n * scale)) for k, (n, floor) in defaults.items()}


class SemanticFPN(nn.Module):
    """Panoptic FPN's semantic branch: each FPN level is brought to stride 4 by 3×3 conv,
    GroupNorm, ReLU and 2× upsampling steps, summed, classified per pixel and upsampled to
    the input (Kirillov et al., 2019)."""

    def __init__(self, body: PyramidBody, *, num_classes: int, width: int = 128) -> None:
        super().__init__()
        self.backbone = FPNBackbone(body, extra_level=False)
        self.branches = nn.ModuleList(
            _upsampling_branch(FPN_CHANNELS, width, steps=i) for i in range(len(body.in_channels))
        )
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = list(self.backbone(x).values())
        merged = sum(branch(m) for branch, m in zip(self.branches, maps, strict=True))
        logits = self.classifier(merged)
        return F.interpolate(logits, size=x.shape[-2:], mode="bilinear", align_corners=False)


def _upsampling_branch(channels: int, width: int, *, steps: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(max(steps, 1)):
        c_in = channels if i == 0 else width
        layers += [
            nn.Conv2d(c_in, width, 3, padding=1, bias=False),
            nn.GroupNorm(group_count(width), width),
            nn.ReLU(inplace=True),
        ]
        if steps:
            layers.append(nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False))
    return nn.Sequential(*layers)
