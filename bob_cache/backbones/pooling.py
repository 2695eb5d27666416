"""Pooling of intermediate feature maps into one vector per image.

Intermediate outputs arrive in timm's normalized form: an ``(N, C, H, W)`` map, optionally
with ``(N, P, C)`` prefix (class/register) tokens. A pooling turns that into ``(N, C)``.
``default`` is not a pooling of its own: for the final layer it means the model's own head
(pre-logits); for intermediate layers it resolves to ``token`` on models with a class
token whose head pools by token, else ``avg``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from bob_cache.errors import SpecError

PoolFn = Callable[[torch.Tensor, torch.Tensor | None], torch.Tensor]

_POOLS: dict[str, PoolFn] = {}
POOL_CHOICES = ("default", "avg", "token")


def register_pool(name: str) -> Callable[[PoolFn], PoolFn]:
    """Decorator: register a pooling function under ``name``."""

    def wrap(fn: PoolFn) -> PoolFn:
        _POOLS[name] = fn
        return fn

    return wrap


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


def get_pool(name: str, *, has_class_token: bool, model: str) -> PoolFn:
    """Return the pooling function ``name``, checked against the model."""
    if name not in _POOLS:
        raise SpecError(f"Unknown pooling '{name}'. Expected one of: {', '.join(POOL_CHOICES)}.")
    if name == "token" and not has_class_token:
        raise SpecError(
            f"--pool token needs a model with a class token, and '{model}' has none. "
            "Use --pool avg, or --pool default for the model's own head."
        )
    return _POOLS[name]
