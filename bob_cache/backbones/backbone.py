"""The Backbone: a frozen feature extractor with its identity and preprocessing.

A Backbone maps a batch of preprocessed images to one ``(N, D)`` tensor per requested
output (layer + pooling) in a single forward pass. Its :meth:`identity` and
:attr:`data_config` are everything about the model that changes the numbers, and go into
the feature key.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torchvision.transforms import Compose

from bob_cache.backbones.weights import WeightsFile


@dataclass(frozen=True)
class WeightsChoice:
    """Where the parameters come from: the provider's pretrained tag, a file, or a seed."""

    kind: str  # "pretrained" | "file" | "random"
    file: WeightsFile | None = None
    seed: int | None = None

    def tag(self, pretrained_tag: str | None) -> str:
        """Label for group paths: pretrained tag, ``file-<sha8>`` or ``random-s<seed>``."""
        if self.kind == "file" and self.file is not None:
            return self.file.tag
        if self.kind == "random":
            return f"random-s{self.seed}"
        return pretrained_tag or "pretrained"

    def identity(self, pretrained_tag: str | None) -> dict[str, Any]:
        ident: dict[str, Any] = {"kind": self.kind, "tag": self.tag(pretrained_tag)}
        if self.file is not None:
            ident["sha256"] = self.file.sha256
        if self.seed is not None:
            ident["seed"] = self.seed
        return ident

    def describe(self, pretrained_tag: str | None) -> dict[str, Any]:
        info = self.identity(pretrained_tag)
        if self.file is not None:
            info["file"] = self.file.path.as_posix()
        return info


@dataclass(frozen=True)
class Output:
    """One requested output: a layer and how it is pooled.

    ``layer`` is ``final`` (the model's head, pre-logits) or a module name from the
    model's feature info (``layer3``, ``blocks.11``); ``index`` is its position there.
    """

    layer: str
    pool: str
    index: int | None = None

    @property
    def name(self) -> str:
        return self.layer if self.pool == "head" else f"{self.layer}:{self.pool}"


class Backbone(nn.Module):
    """Base class: subclasses implement :meth:`forward` for one provider."""

    def __init__(
        self,
        model: nn.Module,
        *,
        name: str,
        provider: str,
        arch: str,
        pretrained_tag: str | None,
        weights: WeightsChoice,
        data_config: dict[str, Any],
        outputs: list[Output],
        conversion: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.name = name
        self.provider = provider
        self.arch = arch
        self.pretrained_tag = pretrained_tag
        self.weights = weights
        self.data_config = data_config
        self.outputs = outputs
        self.conversion = conversion
        shape = (1, -1, 1, 1)
        self.register_buffer(
            "mean", torch.tensor(data_config["mean"]).view(shape), persistent=False
        )
        self.register_buffer("std", torch.tensor(data_config["std"]).view(shape), persistent=False)

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:  # pragma: no cover
        raise NotImplementedError

    @property
    def head(self) -> nn.Module | None:
        """The classifier that maps the ``final`` output to logits, when the model has one."""
        return None

    @property
    def slug(self) -> str:
        """Filesystem-safe label of architecture and weights, e.g. ``resnet50.tv_in1k``."""
        prefix = "" if self.provider == "timm" else f"{self.provider}-"
        return f"{prefix}{self.arch}.{self.weights.tag(self.pretrained_tag)}"

    def identity(self) -> dict[str, Any]:
        """Everything about the model itself that changes the numbers (with the converter
        and architecture options of an official checkpoint, when it was loaded from one)."""
        ident = {
            "provider": self.provider,
            "arch": self.arch,
            "weights": self.weights.identity(self.pretrained_tag),
        }
        if self.conversion is not None:
            ident["conversion"] = self.conversion
        return ident

    def describe(self) -> dict[str, Any]:
        """Provenance: identity plus human-facing details."""
        return {
            "name": self.name,
            "provider": self.provider,
            "arch": self.arch,
            "model": f"{self.arch}.{self.pretrained_tag}" if self.pretrained_tag else self.arch,
            "weights": self.weights.describe(self.pretrained_tag),
            "params": self.num_params(),
            **({"conversion": self.conversion} if self.conversion is not None else {}),
        }

    def num_params(self) -> int:
        """Parameters of the feature extractor (the classifier head excluded)."""
        head = {id(p) for p in self.head.parameters()} if self.head is not None else set()
        return sum(p.numel() for p in self.model.parameters() if id(p) not in head)

    def transform(self) -> Callable[[Any], torch.Tensor]:
        """PIL image → uint8 ``(C, H, W)`` tensor: the resize and crop of :attr:`data_config`.

        Scaling and normalization happen per batch in :meth:`normalize` (on the GPU when
        there is one), with the same float32 operations as timm's eval transform, so the
        result is bit-identical while workers pass 4× smaller uint8 tensors.
        """
        from timm.data.transforms import MaybePILToTensor

        return Compose([*eval_steps(self.data_config), MaybePILToTensor()])

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 ``(N, C, H, W)`` batch → float32, scaled to [0, 1] and normalized."""
        return images.float().div_(255).sub_(self.mean).div_(self.std)

    def preprocess(self, image: Any) -> torch.Tensor:
        """One PIL image → a normalized ``(1, C, H, W)`` batch on the backbone's device."""
        return self.normalize(self.transform()(image).unsqueeze(0).to(self.mean.device))

    @torch.no_grad()
    def output_shapes(self, device: torch.device | str = "cpu") -> dict[str, tuple[int, ...]]:
        """Each output's shape per row (``(D,)``, or ``(H, W, D)`` for a grid), from one forward
        pass on a blank image."""
        x = torch.zeros(1, *self.data_config["input_size"], device=device)
        with torch.inference_mode():
            return {name: tuple(int(n) for n in t.shape[1:]) for name, t in self(x).items()}

    def output_dims(self, device: torch.device | str = "cpu") -> dict[str, int]:
        """Feature dimension of each output (:meth:`output_shapes`' last axis)."""
        return {name: shape[-1] for name, shape in self.output_shapes(device).items()}


def eval_steps(data_config: dict[str, Any]) -> list[Any]:
    """The image steps (resize, crop) of timm's eval transform for ``data_config``, without
    its conversion to an array or tensor."""
    from timm.data import create_transform
    from timm.data.transforms import MaybePILToTensor, ToNumpy

    steps = create_transform(**data_config, is_training=False, use_prefetcher=True).transforms
    return [t for t in steps if not isinstance(t, (ToNumpy, MaybePILToTensor))]
