"""Image files and the torch Dataset that decodes them for extraction."""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from bob_cache.data.source import DataSource, Sample, content_digest

IMAGE_EXTENSIONS = (
    ".jpg",
    ".jpeg",
    ".png",
    ".ppm",
    ".bmp",
    ".pgm",
    ".tif",
    ".tiff",
    ".webp",
    ".gif",
)


def is_image_file(path: str | Path) -> bool:
    """True for a non-hidden file with a known image extension."""
    name = os.path.basename(str(path))
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def open_image_file(path: str | Path | BinaryIO, *, name: str | None = None) -> Image.Image:
    """Decode an image file (a path or an open binary file) fully (truncated files raise)
    and convert it to RGB.

    Args:
        path: the file, or its bytes as a file object.
        name: what the bytes are (their file's path) for error messages, where PIL would
            write the file object's repr (``<_io.BytesIO object at 0x...>``).
    """
    try:
        with Image.open(path) as img:
            img.load()
            return img.convert("RGB")
    except UnidentifiedImageError as exc:
        if isinstance(path, (str, os.PathLike)):
            raise  # PIL names the path itself
        what = f"'{name}'" if name else "(bytes given without a file name)"
        raise UnidentifiedImageError(
            f"cannot identify image file {what}: not in an image format PIL reads"
        ) from exc


def sample_name(sample: Sample) -> str:
    """The path a sample is read from (its id where its location is not a path)."""
    location = sample.location
    return os.fspath(location) if isinstance(location, (str, os.PathLike)) else str(sample.id)


def to_chw(image: Image.Image) -> torch.Tensor:
    """A PIL image as an RGB uint8 ``(C, H, W)`` tensor."""
    return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)


def error_reason(exc: BaseException) -> str:
    """How an unreadable image is recorded: the exception's type and message."""
    return f"{type(exc).__name__}: {exc}".strip() or type(exc).__name__


class ImageDataset(Dataset):
    """Rows of one split: ``(uint8 image tensor, row index, error message, content digest)``.

    An image that cannot be decoded yields a blank tensor and a non-empty error, so one bad
    file never stops a run; the extraction stage records it as an invalid row.
    """

    def __init__(
        self,
        source: DataSource,
        samples: Sequence[Sample],
        transform: Callable[[Image.Image], torch.Tensor],
        input_size: Sequence[int],
    ) -> None:
        self.source = source
        self.samples = samples
        self.transform = transform
        self.input_size = tuple(input_size)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int, str, str]:
        image, digest, error = decode_sample(self.source, self.samples[index])
        if image is not None:
            try:
                return self.transform(image), index, "", digest
            except Exception as exc:  # a transform failure is a recorded invalid row too
                error = error_reason(exc)
        return torch.zeros(self.input_size, dtype=torch.uint8), index, error, digest


def decode_sample(source: DataSource, sample: Sample) -> tuple[Image.Image | None, str, str]:
    """``(RGB image, digest of the bytes read, error)``: an image that cannot be read or
    decoded gives ``None`` and the reason (the digest of its bytes is kept when they were read),
    so one bad file never stops a run; extraction records it as an invalid row."""
    digest = ""
    try:
        data = source.read_bytes(sample)
        if data is None:
            image, digest = source.load(sample)
            return image, digest, ""
        digest = content_digest(data)
        return open_image_file(io.BytesIO(data), name=sample_name(sample)), digest, ""
    except Exception as exc:  # any decode failure becomes a recorded invalid row
        return None, digest, error_reason(exc)


class SharedDecodeDataset(Dataset):
    """Rows decoded once and preprocessed for several backbones: ``(one uint8 tensor per
    transform, row index, error message, content digest)`` (decode once, extract many)."""

    def __init__(
        self,
        source: DataSource,
        samples: Sequence[Sample],
        transforms: Sequence[Callable[[Image.Image], torch.Tensor]],
        input_sizes: Sequence[Sequence[int]],
    ) -> None:
        self.source, self.samples = source, samples
        self.transforms, self.input_sizes = list(transforms), [tuple(s) for s in input_sizes]

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> tuple[tuple[torch.Tensor, ...], int, str, str]:
        image, digest, error = decode_sample(self.source, self.samples[index])
        if image is not None:
            try:
                return tuple(t(image) for t in self.transforms), index, "", digest
            except Exception as exc:  # as ImageDataset: a recorded invalid row for every backbone
                error = error_reason(exc)
        blanks = tuple(torch.zeros(s, dtype=torch.uint8) for s in self.input_sizes)
        return blanks, index, error, digest


def collate_shared(
    batch: list[tuple[tuple[torch.Tensor, ...], int, str, str]],
) -> tuple[list[torch.Tensor], Any, list[str], list[str]]:
    """One stacked image batch per backbone; row indices, errors and digests as in
    :func:`collate_rows`."""
    images, rows, errors, digests = zip(*batch, strict=True)
    stacked = [torch.stack(column) for column in zip(*images, strict=True)]
    return stacked, torch.as_tensor(rows), list(errors), list(digests)


def collate_rows(
    batch: list[tuple[torch.Tensor, int, str, str]],
) -> tuple[torch.Tensor, Any, list[str], list[str]]:
    """Stack images; keep row indices as a tensor, errors and digests as lists of strings."""
    images, rows, errors, digests = zip(*batch, strict=True)
    return torch.stack(images), torch.as_tensor(rows), list(errors), list(digests)


def loader_context(workers: int) -> str | None:
    """The start method of a DataLoader's processes: ``fork`` where the platform has it and
    this process would otherwise spawn them (a Dask worker's default), since a spawned loader
    imports torch and bob-cache again every time a loader starts (seconds each); else the
    default."""
    import multiprocessing

    if not workers or "fork" not in multiprocessing.get_all_start_methods():
        return None
    return (
        "fork" if multiprocessing.get_start_method(allow_none=True) not in (None, "fork") else None
    )
