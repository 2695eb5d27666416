"""The optimizer and schedule: AdamW with layer-wise learning-rate decay over transformer
backbones (BEiT's recipe, through timm's parameter groups), linear warm-up and a cosine decay
stepped per optimizer update."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

AUTO_TRANSFORMER_DECAY = 0.75


def resolve_layer_decay(net: nn.Module, layer_decay: float | None) -> float:
    """``None`` (auto): 0.75 for transformer backbones (any attention module), 1.0 (off) else."""
    if layer_decay is not None:
        return layer_decay
    is_transformer = any("Attention" in type(m).__name__ for m in net.modules())
    return AUTO_TRANSFORMER_DECAY if is_transformer else 1.0


def param_groups(
    model: nn.Module, backbone: nn.Module, *, weight_decay: float, layer_decay: float
) -> list[dict[str, Any]]:
    """Parameter groups: the backbone's by depth (scale ``layer_decay`` per layer from the top,
    timm's grouping), every other trainable parameter at the full rate. Norms and biases get no
    weight decay."""
    from timm.optim import param_groups_layer_decay, param_groups_weight_decay

    if layer_decay < 1.0:
        groups = param_groups_layer_decay(
            backbone, weight_decay=weight_decay, layer_decay=layer_decay
        )
    else:
        groups = param_groups_weight_decay(backbone, weight_decay=weight_decay)
    taken = {id(p) for p in backbone.parameters()}
    rest = nn.ParameterList([p for p in model.parameters() if id(p) not in taken])
    groups += param_groups_weight_decay(rest, weight_decay=weight_decay)
    for group in groups:
        group.setdefault("lr_scale", 1.0)
    return [g for g in groups if g["params"]]


def create_optimizer(
    model: nn.Module,
    backbone: nn.Module,
    *,
    lr: float,
    weight_decay: float,
    layer_decay: float,
) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups` (each group's rate is ``lr × lr_scale``)."""
    groups = param_groups(model, backbone, weight_decay=weight_decay, layer_decay=layer_decay)
    for group in groups:
        group["lr"] = lr * group["lr_scale"]
    return torch.optim.AdamW(groups, lr=lr)


def create_scheduler(
    optimizer: torch.optim.Optimizer, *, total_steps: int, warmup_steps: int
) -> Any:
    """timm's cosine schedule in updates: linear warm-up from 1e-3 × lr, then cosine to 0.
    Call ``step_update(num_updates)`` after every optimizer step."""
    from timm.scheduler import CosineLRScheduler

    base = max(g["lr"] / g["lr_scale"] for g in optimizer.param_groups)
    return CosineLRScheduler(
        optimizer,
        t_initial=max(total_steps, 1),
        lr_min=0.0,
        warmup_t=min(warmup_steps, max(total_steps - 1, 0)),
        warmup_lr_init=base * 1e-3,
        warmup_prefix=False,
        t_in_epochs=False,
    )
