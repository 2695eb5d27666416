"""Pooling of intermediate feature maps into one vector (or one grid) per image.

Intermediate outputs arrive in timm's normalized form: an ``(N, C, H, W)`` map, optionally
with ``(N, P, C)`` prefix (class/register) tokens. A pooling turns that into ``(N, C)``, or,
for ``grid`` (``extract --dense``), keeps every position as an ``(N, H, W, C)`` grid (channels
last; a ViT's patch tokens without its prefix tokens).
``default`` is not a pooling of its own: for the final layer it means the model's own head
(pre-logits); for intermediate layers it resolves to ``token`` on models with a class
token whose head pools by token, else ``avg``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from bob_cache.config import GRID
from bob_cache.errors import SpecError
from bob_cache.registry import Registry

PoolFn = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]

POOLS: Registry[PoolFn] = Registry("pooling", error=SpecError)
POOL_CHOICES = ("default", "avg", "token", GRID)


def register_pool(name: str) -> Callable[[PoolFn], PoolFn]:
    """Decorator: register a pooling function under ``name``."""
    return POOLS.register(name)


@register_pool("avg")
def pool_avg(spatial: torch.Tensor, prefix: torch.Tensor | None) -> torch.Tensor:
    """Mean over all spatial positions (patch tokens for ViTs; prefix tokens excluded)."""
    return spatial.flatten(2).mean(dim=2)


@register_pool("token")
def pool_token(spatial: torch.Tensor, prefix: torch.Tensor | None) -> torch.Tensor:
    """The first prefix (class) token."""
    if prefix is None:
        raise SpecError("token pooling needs a class token")  # guarded by get_pool callers
    return prefix[:, 0]


@register_pool(GRID)
def pool_grid(spatial: torch.Tensor, prefix: torch.Tensor | None) -> torch.Tensor:
    """No pooling: the ``(N, C, H, W)`` map as an ``(N, H, W, C)`` grid (prefix tokens dropped)."""
    if spatial.ndim != 4:
        raise SpecError(
            f"--dense needs a spatial feature map (N, C, H, W); this layer gives shape "
            f"{tuple(spatial.shape)}. Pick a convolutional or patch-token layer with --layers."
        )
    return spatial.permute(0, 2, 3, 1)


def is_grid(pool: str) -> bool:
    """Whether ``pool`` keeps a grid per image (a dense feature set) instead of a vector."""
    return pool == GRID


def get_pool(name: str, *, has_class_token: bool, model: str) -> PoolFn:
    """Return the pooling function ``name``, checked against the model."""
    if name not in POOLS:
        raise SpecError(f"Unknown pooling '{name}'. Expected one of: {', '.join(POOL_CHOICES)}.")
    if name == "token" and not has_class_token:
        raise SpecError(
            f"--pool token needs a model with a class token, and '{model}' has none. "
            "Use --pool avg, or --pool default for the model's own head."
        )
    return POOLS.get(name)
