"""Compute device and numeric precision for the stages that run a model."""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from bob_cache.errors import DeviceError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str = "auto") -> torch.device:
    """``auto`` picks CUDA when present, else CPU; an unavailable device is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as exc:
        raise DeviceError(f"Unknown device '{name}'. Expected auto, cpu, cuda or cuda:N.") from exc
    if device.type == "cuda" and not torch.cuda.is_available():
        raise DeviceError(
            f"Device '{name}' was requested but CUDA is not available on this machine. "
            "Use --device cpu (or auto)."
        )
    if (
        device.type == "cuda"
        and device.index is not None
        and device.index >= torch.cuda.device_count()
    ):
        raise DeviceError(
            f"Device '{name}' does not exist; this machine has {torch.cuda.device_count()} GPU(s)."
        )
    return device


def resolve_precision(name: str, device: torch.device) -> str:
    """``auto`` is bf16 autocast on CUDA GPUs that support it (else fp16), fp32 on CPU."""
    if name == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if name not in PRECISIONS:
        raise DeviceError(f"Unknown precision '{name}'. Expected auto, {', '.join(PRECISIONS)}.")
    return name


def autocast(device: torch.device, precision: str) -> Any:
    """Autocast context for ``precision`` (a no-op for fp32)."""
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)
