"""Device, precision and process group of a fine-tuning run.

Several GPUs: start the same command under ``torchrun --nproc_per_node N -m bob_cache.cli
finetune ...``; torchrun sets ``WORLD_SIZE``, ``RANK`` and ``LOCAL_RANK``, and each process
joins the group here and takes the GPU of its local rank (NCCL; gloo on CPU).
"""

from __future__ import annotations

import os

import torch

from bob_cache.device import resolve_device
from bob_cache.errors import DeviceError


def init_distributed() -> None:
    """Join torchrun's process group when ``WORLD_SIZE`` > 1 (once per process)."""
    dist = torch.distributed
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or dist.is_initialized():
        return
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if torch.cuda.is_available():
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend=backend)


def resolve_run_device(name: str, precision: str) -> tuple[torch.device, str]:
    """The device (the local rank's GPU under torchrun) and the training precision: ``auto``
    is bf16 autocast on GPUs that support it, fp32 elsewhere; fp16 uses a gradient scaler."""
    device = resolve_device(name)
    if device.type == "cuda" and torch.distributed.is_initialized():
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    if precision == "auto":
        bf16 = device.type == "cuda" and torch.cuda.is_bf16_supported()
        return device, "bf16" if bf16 else "fp32"
    if precision not in ("fp32", "bf16", "fp16"):
        raise DeviceError(f"Unknown --precision '{precision}'. Expected auto, fp32, bf16 or fp16.")
    if precision == "fp16" and device.type != "cuda":
        raise DeviceError("--precision fp16 needs a CUDA device. Use fp32 or bf16 on a CPU.")
    return device, precision


def is_distributed() -> bool:
    """Whether this process is one rank of a torchrun launch (its process group joined)."""
    dist = torch.distributed
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return torch.distributed.get_rank() if is_distributed() else 0


def barrier() -> None:
    """Wait for every rank (a no-op outside torchrun)."""
    if is_distributed():
        torch.distributed.barrier()
