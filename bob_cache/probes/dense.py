"""The dense linear probe: per-patch linear segmentation from stored feature grids, on a CPU.

DINOv2's "linear" semantic segmentation evaluation without its GPU: a D → C linear layer on
every position of an H × W × D grid (no BatchNorm), its logits bilinearly upsampled to the
mask, cross-entropy that skips the ignore index, AdamW with a cosine schedule for a fixed
number of epochs. Each step estimates the mean cross-entropy over every mask pixel from
``pixels`` pixels drawn uniformly from each image, their logits interpolated exactly as
``F.interpolate`` would (:func:`sample_bilinear`): a 224 × 224 mask has 50,176 pixels but
only 196 patches, so this keeps a CPU step cheap. Scoring upsamples to every pixel.

Channels are standardized with the training rows' mean and standard deviation, a fixed
affine map (so the classifier stays linear in the stored features) that lets one
learning-rate grid fit every backbone. All learning rates of the grid train side by side in
each pass over the data, each its own head and optimizer state (the heads never share a
gradient), so choosing among them costs no extra reads.

The math sees the data only through :class:`GridBatches`: mini-batches of grids (float16 or
float32) and their masks, so memory stays bounded by what the caller buffers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch
import torch.nn.functional as F

from bob_cache.errors import SpecError

DEFAULT_LRS = (1e-4, 1e-3, 1e-2)
PREDICT_FLOATS = 2**23  # full-size logits held at once while predicting (32 MB)


@dataclass(frozen=True)
class DenseRecipe:
    """How the heads are trained (every field changes the numbers)."""

    epochs: int = 10
    batch_size: int = 16
    lrs: tuple[float, ...] = DEFAULT_LRS
    weight_decay: float = 1e-4
    seed: int = 0
    pixels: int = 1024  # mask pixels per image and step; 0: every pixel

    def __post_init__(self) -> None:
        if self.epochs < 1 or self.batch_size < 1 or self.pixels < 0:
            raise SpecError(
                f"The dense probe needs --epochs and --batch-size of at least 1 and pixels per "
                f"step of 0 (all) or more, got {self.epochs}, {self.batch_size}, {self.pixels}."
            )
        if not self.lrs or any(not 0 < lr < 1 for lr in self.lrs):
            raise SpecError(
                f"--lrs must list learning rates between 0 and 1 (exclusive), got "
                f"{list(self.lrs)}; e.g. --lrs 1e-4,1e-3,1e-2."
            )

    def to_dict(self) -> dict[str, Any]:
        return {
            "epochs": self.epochs,
            "batch_size": self.batch_size,
            "lrs": [float(lr) for lr in self.lrs],
            "weight_decay": self.weight_decay,
            "seed": self.seed,
            "pixels": self.pixels,
            "optimizer": "AdamW, cosine schedule",
        }


class GridBatches(Protocol):
    """Rows of grids with their masks, read a mini-batch at a time."""

    @property
    def n(self) -> int: ...

    def batches(
        self, *, batch_size: int, rng: np.random.Generator | None = None
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(grids (B, H, W, D), masks (B, h, w))``, shuffled when ``rng`` is given."""
        ...


@dataclass
class DenseHeads:
    """K linear heads (one per learning rate) on channel-standardized grids.

    Attributes:
        weight: ``(K, C, D)``; bias: ``(K, C)``; mean and std: ``(D,)`` channel statistics.
        lrs: the learning rate each head was trained with.
    """

    weight: torch.Tensor
    bias: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    lrs: tuple[float, ...]

    @property
    def num_classes(self) -> int:
        return int(self.weight.shape[1])

    def select(self, index: int) -> DenseHeads:
        """Head ``index`` alone."""
        sl = slice(index, index + 1)
        return DenseHeads(self.weight[sl], self.bias[sl], self.mean, self.std, self.lrs[sl])

    def grid_logits(self, grids: np.ndarray | torch.Tensor) -> torch.Tensor:
        """``(B, K·C, H, W)`` logits of every grid position (head-major channels)."""
        x = (_as_float(grids) - self.mean) / self.std
        low = torch.einsum("bhwd,kcd->bkchw", x, self.weight) + self.bias[None, :, :, None, None]
        return low.flatten(1, 2)

    def logits(self, grids: np.ndarray | torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """``(B, K, C, h, w)`` logits, bilinearly upsampled from the grid to ``size``."""
        up = F.interpolate(self.grid_logits(grids), size=size, mode="bilinear", align_corners=False)
        return up.reshape(len(up), len(self.lrs), self.num_classes, *size)

    @torch.no_grad()
    def predict(self, grids: np.ndarray | torch.Tensor, size: tuple[int, int]) -> np.ndarray:
        """``(B, K, h, w)`` predicted labels (upsampled a few images at a time, so that the
        full-size logits never exceed :data:`PREDICT_FLOATS`)."""
        per = max(1, PREDICT_FLOATS // (len(self.lrs) * self.num_classes * size[0] * size[1]))
        parts = [
            self.logits(grids[at : at + per], size).argmax(dim=2).numpy()
            for at in range(0, len(grids), per)
        ]
        return np.concatenate(parts)


def _as_float(grids: np.ndarray | torch.Tensor) -> torch.Tensor:
    t = torch.from_numpy(np.ascontiguousarray(grids)) if isinstance(grids, np.ndarray) else grids
    return t.float()


def channel_stats(data: GridBatches, *, batch_size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and standard deviation over every position of every row (float64
    sums; constant channels get std 1)."""
    total = squares = None
    count = 0
    for grids, _ in data.batches(batch_size=batch_size):
        x = _as_float(grids).reshape(-1, grids.shape[-1])
        s1, s2 = x.sum(0, dtype=torch.float64), (x * x).sum(0, dtype=torch.float64)
        total, squares = (s1, s2) if total is None else (total + s1, squares + s2)
        count += len(x)
    if total is None or squares is None:
        raise SpecError("The dense probe got no training rows. Check the training split.")
    mean = total / count
    std = (squares / count - mean * mean).clamp_min(0).sqrt()
    std[std < 1e-6 * max(float(std.max()), 1e-12)] = 1.0
    return mean.float(), std.float()


def train_dense_heads(
    data: GridBatches,
    *,
    num_classes: int,
    ignore_index: int,
    recipe: DenseRecipe,
) -> DenseHeads:
    """Train one head per learning rate of ``recipe`` on ``data`` (see the module docstring).

    Args:
        data: the training rows.
        num_classes: classes including background.
        ignore_index: mask value left out of the loss.
        recipe: epochs, batch size, learning rates, weight decay and the shuffling seed.
    """
    mean, std = channel_stats(data)
    k, dim = len(recipe.lrs), int(mean.shape[0])
    weights = [torch.zeros(num_classes, dim, requires_grad=True) for _ in range(k)]
    biases = [torch.zeros(num_classes, requires_grad=True) for _ in range(k)]
    groups = [
        {"params": [w, b], "lr": lr} for w, b, lr in zip(weights, biases, recipe.lrs, strict=True)
    ]
    optimizer = torch.optim.AdamW(groups, weight_decay=recipe.weight_decay)
    total = recipe.epochs * math.ceil(data.n / recipe.batch_size)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * min(step, total) / total))
    )
    rng = np.random.default_rng(recipe.seed)
    for _ in range(recipe.epochs):
        for grids, masks in data.batches(batch_size=recipe.batch_size, rng=rng):
            heads = DenseHeads(torch.stack(weights), torch.stack(biases), mean, std, recipe.lrs)
            pixels = _draw_pixels(masks.shape, recipe.pixels, rng)
            loss = _loss(heads, grids, torch.from_numpy(masks), pixels, ignore_index)
            optimizer.zero_grad(set_to_none=True)
            if loss is not None:
                loss.backward()
                optimizer.step()
            schedule.step()
    with torch.no_grad():
        return DenseHeads(torch.stack(weights), torch.stack(biases), mean, std, recipe.lrs)


def _draw_pixels(shape: tuple[int, ...], pixels: int, rng: np.random.Generator) -> torch.Tensor:
    """``(B, P)`` flat pixel indices of each ``h × w`` mask: ``pixels`` drawn uniformly (with
    replacement), or every pixel when ``pixels`` is 0 or covers the mask."""
    b, h, w = shape
    if not pixels or pixels >= h * w:
        return torch.arange(h * w).expand(b, h * w)
    return torch.from_numpy(rng.integers(0, h * w, size=(b, pixels)))


def _loss(
    heads: DenseHeads,
    grids: np.ndarray,
    masks: torch.Tensor,
    pixels: torch.Tensor,
    ignore_index: int,
) -> torch.Tensor | None:
    """Each head's mean cross-entropy over the drawn pixels that count, summed over heads
    (None when all of them are ignored)."""
    target = masks.flatten(1).gather(1, pixels).long()  # (B, P)
    counted = int((target != ignore_index).sum())
    if not counted:
        return None
    logits = sample_bilinear(heads.grid_logits(grids), pixels, tuple(masks.shape[-2:]))
    k = len(heads.lrs)
    flat = logits.reshape(len(target) * k, heads.num_classes, -1)  # (B·K, C, P)
    target = target.repeat_interleave(k, dim=0)
    return F.cross_entropy(flat, target, ignore_index=ignore_index, reduction="sum") / counted


def sample_bilinear(low: torch.Tensor, pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """``F.interpolate(low, size, mode="bilinear", align_corners=False)`` at the flat pixel
    indices ``pixels`` (B, P) only: ``(B, M, P)`` from ``low`` (B, M, H, W)."""
    b, m, h_in, w_in = low.shape
    (y0, y1, wy), (x0, x1, wx) = _axis(size[0], h_in), _axis(size[1], w_in)
    py, px = pixels // size[1], pixels % size[1]
    flat = low.reshape(b, m, h_in * w_in)

    def at(iy: torch.Tensor, ix: torch.Tensor) -> torch.Tensor:
        index = (iy[py] * w_in + ix[px])[:, None, :].expand(b, m, -1)
        return flat.gather(2, index)

    ly, lx = wy[py][:, None, :], wx[px][:, None, :]
    top = (1 - lx) * at(y0, x0) + lx * at(y0, x1)
    bottom = (1 - lx) * at(y1, x0) + lx * at(y1, x1)
    return (1 - ly) * top + ly * bottom


def _axis(n_out: int, n_in: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Source indices and weight along one axis, as PyTorch's bilinear upsampling computes
    them with ``align_corners=False``: ``src = max(0, (i + 0.5) · n_in / n_out - 0.5)``."""
    src = ((torch.arange(n_out, dtype=torch.float32) + 0.5) * (n_in / n_out) - 0.5).clamp_min(0)
    first = src.long().clamp_max(n_in - 1)
    return first, (first + 1).clamp_max(n_in - 1), src - first


def score_heads(
    heads: DenseHeads,
    data: GridBatches,
    *,
    ignore_index: int,
    class_names: Sequence[str] | None = None,
    batch_size: int = 16,
) -> list[dict[str, Any]]:
    """SegMeter results (``mIoU``, ``pixel_accuracy``, ``mean_accuracy``, ``per_class_iou``)
    of every head on ``data``."""
    from bob_cache.finetune.seg_metrics import SegMeter

    meters = [
        SegMeter(heads.num_classes, ignore_index=ignore_index, class_names=class_names)
        for _ in heads.lrs
    ]
    for pred, masks in predict_batches(heads, data, batch_size=batch_size):
        for i, meter in enumerate(meters):
            meter.update(pred[:, i], masks)
    return [meter.compute() for meter in meters]


def predict_batches(
    heads: DenseHeads, data: GridBatches, *, batch_size: int = 16
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(predicted labels (B, K, h, w), masks (B, h, w))`` for ``data`` in row order."""
    for grids, masks in data.batches(batch_size=batch_size):
        yield heads.predict(grids, tuple(masks.shape[-2:])), masks
