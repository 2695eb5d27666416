"""Decoding on the extraction device (``--decode torch``): workers only read files, and the
device decodes JPEGs (nvJPEG on CUDA) and resizes and crops them in batches.

On a GPU the host-side decode is the bottleneck of extraction: one process decodes and
resizes ~200–300 JPEGs/s with PIL, while an H100 runs resnet50 at ~12,800 img/s. Here the
DataLoader workers pass encoded bytes, ``torchvision.io.decode_jpeg`` decodes a whole batch
on the device, and the timm eval transform's own torchvision ``Resize`` and ``CenterCrop``
run on the decoded tensors, batched by image size. Pixels differ slightly from PIL's (mean
0.35 of 255 on photos), so the mode is part of the feature spec and has its own key.

Files that are not JPEG (PNG, in-memory built-ins) are decoded by the workers with PIL at
full size and resized on the device like the rest.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import Dataset

from bob_cache.backbones.backbone import eval_steps
from bob_cache.data.images import error_reason, open_image_file, to_chw
from bob_cache.data.source import DataSource, Sample, content_digest
from bob_cache.errors import SpecError

_JPEG_MAGIC = b"\xff\xd8\xff"


def tensor_steps(data_config: dict[str, Any]) -> torch.nn.Module:
    """The resize and crop of timm's eval transform for ``data_config``, for uint8 tensors.

    Raises:
        SpecError: the transform has a step torchvision cannot apply to tensors.
    """
    from torchvision.transforms import CenterCrop, Compose, Resize

    steps = eval_steps(data_config)
    other = [type(t).__name__ for t in steps if not isinstance(t, (Resize, CenterCrop))]
    if other:
        raise SpecError(
            f"--decode torch applies timm's resize and center crop on tensors; this model's "
            f"eval transform also has {', '.join(other)}. Use --decode pil."
        )
    for t in steps:
        if isinstance(t, Resize):
            t.antialias = True  # PIL always antialiases
    return Compose(steps)


class EncodedImageDataset(Dataset):
    """Rows of one split as ``(payload, encoded, row, error, digest)``: a JPEG file's bytes
    (``encoded=True``), or any other image decoded with PIL to a full-size uint8 ``(C, H, W)``
    tensor. Reading never stops a run: a failure yields an empty payload and the error."""

    def __init__(self, source: DataSource, samples: Sequence[Sample]) -> None:
        self.source, self.samples = source, samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, bool, int, str, str]:
        sample, digest = self.samples[index], ""
        try:
            data = self.source.read_bytes(sample)
            if data is None:
                image, digest = self.source.load(sample)
                return to_chw(image), False, index, "", digest
            digest = content_digest(data)
            if data[:3] == _JPEG_MAGIC:
                return torch.frombuffer(bytearray(data), dtype=torch.uint8), True, index, "", digest
            return to_chw(open_image_file(io.BytesIO(data))), False, index, "", digest
        except Exception as exc:  # recorded as an invalid row, like the PIL path
            return torch.zeros(0, dtype=torch.uint8), False, index, error_reason(exc), digest


@dataclass
class EncodedBatch:
    """A batch as workers pass it: every JPEG's bytes in one buffer (one tensor to share, pin
    and copy per batch, not one per image), other images decoded, rows and errors."""

    buffer: torch.Tensor  # uint8, the JPEG files end to end
    lengths: list[int]  # bytes of each row's JPEG (0: not a JPEG)
    decoded: list[torch.Tensor | None]  # uint8 (C, H, W) where the row is not a JPEG
    rows: torch.Tensor
    errors: list[str]
    digests: list[str] = field(default_factory=list)

    @classmethod
    def of_images(cls, images: list[torch.Tensor]) -> EncodedBatch:
        """A batch of already decoded uint8 ``(C, H, W)`` images (no JPEG bytes)."""
        n = len(images)
        empty = torch.zeros(0, dtype=torch.uint8)
        return cls(empty, [0] * n, list(images), torch.arange(n), [""] * n)

    def pin_memory(self) -> EncodedBatch:
        self.buffer = self.buffer.pin_memory()
        return self

    def jpegs(self) -> list[tuple[int, torch.Tensor]]:
        """``(position, bytes)`` of each JPEG row, as views of :attr:`buffer`."""
        out, start = [], 0
        for i, n in enumerate(self.lengths):
            if n:
                out.append((i, self.buffer[start : start + n]))
            start += n
        return out


def collate_encoded(batch: list[tuple[torch.Tensor, bool, int, str, str]]) -> EncodedBatch:
    payloads, encoded, rows, errors, digests = zip(*batch, strict=True)
    jpeg = [
        p if e else torch.zeros(0, dtype=torch.uint8)
        for p, e in zip(payloads, encoded, strict=True)
    ]
    return EncodedBatch(
        buffer=torch.cat(jpeg) if jpeg else torch.zeros(0, dtype=torch.uint8),
        lengths=[len(p) for p in jpeg],
        decoded=[None if e or not len(p) else p for p, e in zip(payloads, encoded, strict=True)],
        rows=torch.as_tensor(rows),
        errors=list(errors),
        digests=list(digests),
    )


class DevicePreprocess:
    """Encoded/decoded payloads → one uint8 ``(N, C, H, W)`` batch on ``device``."""

    def __init__(self, data_config: dict[str, Any], device: torch.device) -> None:
        self.steps = tensor_steps(data_config)
        self.input_size = tuple(data_config["input_size"])
        self.device = device

    def __call__(self, batch: EncodedBatch) -> tuple[torch.Tensor, list[str]]:
        """The batch resized and cropped on the device, and its errors (decode failures
        added; their rows are left blank)."""
        errors = list(batch.errors)
        images: list[torch.Tensor | None] = [None] * len(errors)
        jpegs = batch.jpegs()
        for (i, _), image in zip(jpegs, self._decode([d for _, d in jpegs]), strict=True):
            if isinstance(image, str):
                errors[i] = image
            else:
                images[i] = image
        for i, image in enumerate(batch.decoded):
            if image is not None:
                images[i] = image.to(self.device, non_blocking=True)
        out = torch.zeros((len(errors), *self.input_size), dtype=torch.uint8, device=self.device)
        by_size: dict[tuple[int, ...], list[int]] = {}
        for i, image in enumerate(images):
            if image is not None:
                by_size.setdefault(tuple(image.shape), []).append(i)
        for rows in by_size.values():
            out[rows] = self.steps(torch.stack([images[i] for i in rows]))
        return out, errors

    def _decode(self, data: list[torch.Tensor]) -> list[torch.Tensor | str]:
        """Decode JPEG bytes on the device; a batch that fails is retried one image at a time
        so only the unreadable files become errors."""
        if not data:
            return []
        from torchvision.io import ImageReadMode, decode_jpeg

        try:
            return list(decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device))
        except RuntimeError:
            pass
        out: list[torch.Tensor | str] = []
        for one in data:
            try:
                out.append(decode_jpeg(one, mode=ImageReadMode.RGB, device=self.device))
            except RuntimeError:  # e.g. CMYK, which nvJPEG declines: PIL, as the workers would
                out.append(self._pil_decode(one))
        return out

    def _pil_decode(self, data: torch.Tensor) -> torch.Tensor | str:
        try:
            image = open_image_file(io.BytesIO(data.numpy().tobytes()))
        except Exception as exc:
            return error_reason(exc)
        return to_chw(image).to(self.device)
