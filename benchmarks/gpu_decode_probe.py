"""Can JPEG decoding and resizing on the GPU feed a model? (issue 2's GPU goal)

Times, on the extraction device, for one batch of 500×375 JPEGs: PIL decode + timm's eval
resize/crop in one process (the CPU path's per-core rate), ``torchvision.io.decode_jpeg`` on the
GPU (nvJPEG, batched), the same torchvision Resize/CenterCrop applied to the decoded tensors
on the GPU, and how far those pixels are from PIL's.

    python benchmarks/gpu_decode_probe.py --images DIR --batch 256 --model resnet50
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torchvision
from PIL import Image


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--images", type=Path, required=True)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--model", default="resnet50")
    p.add_argument("--seconds", type=float, default=5.0)
    args = p.parse_args()
    import timm
    from timm.data import create_transform, resolve_data_config
    from torchvision.transforms import CenterCrop, Compose, Resize

    files = sorted(args.images.glob("*.jpg"))
    data = [f.read_bytes() for f in files]
    data = (data * (args.batch // len(data) + 1))[: args.batch]
    model = timm.create_model(args.model, pretrained=False)
    config = resolve_data_config({}, model=model)
    pil_tf = create_transform(**config, is_training=False)
    steps = [t for t in pil_tf.transforms if isinstance(t, (Resize, CenterCrop))]
    tensor_tf = Compose(steps)
    out: dict = {
        "device": torch.cuda.get_device_name(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "batch": args.batch,
        "steps": [repr(s) for s in steps],
    }

    def pil_one(b: bytes) -> torch.Tensor:
        import io

        img = Image.open(io.BytesIO(b)).convert("RGB")
        return torch.from_numpy(np.asarray(tensor_tf(img))).permute(2, 0, 1)

    t = time.perf_counter()
    n = 0
    while time.perf_counter() - t < args.seconds:
        pil_one(data[n % len(data)])
        n += 1
    out["pil_one_process_img_s"] = n / (time.perf_counter() - t)

    raw = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in data]
    dev = torch.device("cuda")

    def gpu_decode() -> list[torch.Tensor]:
        return torchvision.io.decode_jpeg(raw, device=dev)

    def gpu_full() -> torch.Tensor:
        return torch.stack([tensor_tf(x) for x in gpu_decode()])

    for name, fn in (("gpu_decode", gpu_decode), ("gpu_decode_resize_crop", gpu_full)):
        for _ in range(3):
            fn()
        torch.cuda.synchronize()
        t, n = time.perf_counter(), 0
        while time.perf_counter() - t < args.seconds:
            fn()
            n += 1
        torch.cuda.synchronize()
        out[f"{name}_img_s"] = n * args.batch / (time.perf_counter() - t)

    gpu = gpu_full().cpu().int()
    ref = torch.stack([pil_one(b) for b in data[: len(files)]]).int()
    diff = (gpu[: len(files)] - ref).abs().float()
    out["pixels_vs_pil"] = {
        "mean_abs": diff.mean().item(),
        "max_abs": diff.max().item(),
        "share_gt_2": (diff > 2).float().mean().item(),
    }
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
