"""The inputs of a detector: the linear head, the ID fit stream, and query features.

A fit *stream* is an iterable of ``(features, labels)`` blocks: ``features`` is ``(n_i, D)``
(any real dtype; float16/float32 from the store), ``labels`` is ``(n_i,)`` integers or
``None`` where the detector needs none. Blocks are read one at a time, so an ID set larger
than memory never has to be materialized. A detector that reads the ID set twice (ViM)
needs a *re-iterable* stream: a list, an object whose ``__iter__`` starts over, or a
zero-argument function that returns a fresh iterable; a generator is read once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
import torch

from bob_cache.errors import DetectorError

Block: TypeAlias = tuple[Any, Any]
BlockSource: TypeAlias = Iterable[Block] | Callable[[], Iterable[Block]]


@dataclass(frozen=True)
class LinearHead:
    """A classifier head ``logits = features @ weight.T + bias``; weight ``(K, D)``, bias ``(K,)``.

    Both are kept in float64 (the state). Logits come from one float32 matrix product (torch,
    multithreaded: 2-3× faster than float64 at ImageNet's 1000 classes, relative error ~1e-7)
    and are returned in float64, so softmax, logsumexp and the maxima reduce in float64.
    """

    weight: np.ndarray
    bias: np.ndarray

    def __post_init__(self) -> None:
        weight = np.asarray(self.weight, dtype=np.float64)
        if weight.ndim != 2 or weight.shape[0] == 0 or weight.shape[1] == 0:
            raise DetectorError(
                f"The head's weight must be a (classes, dim) matrix; got shape {weight.shape}. "
                "Pass the linear layer's weight as stored by the probe (out_features × dim)."
            )
        bias = np.zeros(len(weight)) if self.bias is None else self.bias
        bias = np.asarray(bias, dtype=np.float64)
        if bias.shape != (len(weight),):
            raise DetectorError(
                f"The head's bias must have shape ({len(weight)},) to match weight "
                f"{weight.shape}; got {bias.shape}. Pass the same layer's bias (or None)."
            )
        if not (np.isfinite(weight).all() and np.isfinite(bias).all()):
            raise DetectorError("The head's weight or bias holds NaN/inf; refit the probe head.")
        object.__setattr__(self, "weight", weight)
        object.__setattr__(self, "bias", bias)

    @property
    def dim(self) -> int:
        return int(self.weight.shape[1])

    def logits(self, features: np.ndarray) -> np.ndarray:
        """``(n, K)`` float64 logits of ``features`` (a float32 product, see the class doc)."""
        return self.logits_tensor(features).numpy()

    def logits_tensor(self, features: np.ndarray) -> torch.Tensor:
        """The logits as a float64 CPU tensor (for torch reductions)."""
        weight, bias = self._float32()
        x = torch.from_numpy(np.ascontiguousarray(features, dtype=np.float32))
        return torch.addmm(bias, x, weight.T).double()

    def _float32(self) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self.__dict__.get("_f32")
        if cached is None:
            cached = (torch.from_numpy(self.weight.astype(np.float32)),
                      torch.from_numpy(self.bias.astype(np.float32)))  # fmt: skip
            object.__setattr__(self, "_f32", cached)
        return cached


def parse_head(head: LinearHead | tuple[Any, Any] | None) -> LinearHead | None:
    """A :class:`LinearHead` from a head or a ``(weight, bias)`` pair (``None`` stays ``None``)."""
    if head is None or isinstance(head, LinearHead):
        return head
    if isinstance(head, tuple | list) and len(head) == 2:
        return LinearHead(head[0], head[1])
    raise DetectorError(
        f"Expected the head as LinearHead(weight, bias) or a (weight, bias) pair; "
        f"got {type(head).__name__}."
    )


def is_reiterable(source: BlockSource) -> bool:
    """Whether ``source`` can be read twice: a function, or an iterable that is no iterator."""
    return callable(source) or iter(source) is not source  # type: ignore[arg-type]


def _open(source: BlockSource) -> Iterable[Block]:
    return source() if callable(source) else source


def check_features(
    features: Any, *, dim: int | None, what: str, dtype: type = np.float64
) -> np.ndarray:
    """``features`` as a finite ``(n, D)`` array of ``dtype`` (float64 by default; detectors
    that only take a float32 product ask for float32), ``D == dim`` when ``dim`` is given."""
    x = np.asarray(features)
    real = np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)
    if x.ndim != 2 or not real:
        raise DetectorError(
            f"{what} must be a real (rows, dim) matrix; got dtype {x.dtype}, shape {x.shape}. "
            "Pass one row per image, e.g. features[:, :] from the feature set."
        )
    if dim is not None and x.shape[1] != dim:
        raise DetectorError(
            f"{what} have {x.shape[1]} columns, but the detector expects {dim}-dimensional "
            "features. Use features of the same backbone, layer and pooling as the ID fit set "
            "(and its head)."
        )
    if x.dtype == np.float16 and dtype in (np.float32, np.float64):  # torch: ~10x numpy's
        x = torch.from_numpy(np.ascontiguousarray(x)).to(getattr(torch, np.dtype(dtype).name))
        x = x.numpy()
    else:
        x = x.astype(dtype, copy=False)
    if not np.isfinite(x).all():
        bad = np.flatnonzero(~np.isfinite(x).all(axis=1))
        raise DetectorError(
            f"{what} hold NaN/inf in {len(bad)} row(s) (first: {bad[:5].tolist()}). "
            "Drop those rows or re-extract them."
        )
    return x


def _check_labels(labels: Any, n: int, *, detector: str, index: int) -> np.ndarray:
    if labels is None:
        raise DetectorError(
            f"'{detector}' needs class labels, but block {index} has none. "
            "Pass (features, labels) blocks with the ID training labels."
        )
    y = np.asarray(labels)
    if y.shape != (n,) or not np.issubdtype(y.dtype, np.integer):
        raise DetectorError(
            f"Block {index}'s labels must be {n} integers (one per row); got dtype {y.dtype}, "
            f"shape {y.shape}."
        )
    if n and y.min() < 0:
        raise DetectorError(
            f"'{detector}' needs a class for every ID row, but block {index} has "
            f"{int((y < 0).sum())} row(s) labelled {int(y.min())} (unlabeled). "
            "Fit on a labelled split, or drop the unlabeled rows."
        )
    return y.astype(np.int64)


def iter_blocks(
    source: BlockSource, *, detector: str, labels: bool, dim: int | None = None
) -> Iterator[tuple[np.ndarray, np.ndarray | None]]:
    """Validated ``(float64 features, int64 labels | None)`` blocks; empty blocks are skipped.

    Raises :class:`DetectorError` on a malformed block, a dimension that changes between
    blocks (or differs from ``dim``), and a stream with no rows at all.
    """
    rows = 0
    for index, block in enumerate(_open(source)):
        if not (isinstance(block, tuple | list) and len(block) == 2):
            raise DetectorError(
                f"Block {index} of the ID stream must be a (features, labels) pair; got "
                f"{type(block).__name__}. Yield (features, labels) or (features, None)."
            )
        x = check_features(block[0], dim=dim, what=f"Block {index}'s features")
        dim = x.shape[1]
        y = _check_labels(block[1], len(x), detector=detector, index=index) if labels else None
        if len(x) == 0:
            continue
        rows += len(x)
        yield x, y
    if rows == 0:
        raise DetectorError(
            f"'{detector}' got an empty ID stream (no rows). Pass an iterable of "
            "(features, labels) blocks of the ID training set."
        )
