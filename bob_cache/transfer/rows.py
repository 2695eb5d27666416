"""What an estimator reads: labelled rows in blocks, from memory or streamed from a store.

A *row reader* is any object with ``n``, ``dim``, ``blocks()`` (float32 row blocks, in row
order) and ``take(positions)`` (a reader over a sorted subset of the rows). The probes'
:class:`~bob_cache.probes.features.Features` is one (in memory, or streamed shard by shard
from a feature set); :class:`ArrayRows` wraps a plain array. Estimators never hold more than
one block of rows (plus ``dim × dim`` or ``classes × dim`` statistics), except the kNN
baseline, which reads a bounded sample.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from bob_cache.errors import SpecError

BLOCK_ROWS = 32_768


class RowReader(Protocol):
    """Rows read block by block (see the module doc)."""

    @property
    def n(self) -> int: ...

    @property
    def dim(self) -> int: ...

    def blocks(self) -> Iterator[np.ndarray]: ...

    def take(self, positions: np.ndarray) -> RowReader: ...


@dataclass(frozen=True)
class ArrayRows:
    """A row reader over an in-memory ``(n, dim)`` array (float16 stays float16 until read)."""

    array: np.ndarray

    @property
    def n(self) -> int:
        return len(self.array)

    @property
    def dim(self) -> int:
        return int(self.array.shape[1])

    def blocks(self) -> Iterator[np.ndarray]:
        for start in range(0, len(self.array), BLOCK_ROWS):
            yield np.asarray(self.array[start : start + BLOCK_ROWS], dtype=np.float32)

    def take(self, positions: np.ndarray) -> ArrayRows:
        return ArrayRows(self.array[np.sort(positions)])


@dataclass(frozen=True)
class LabelledRows:
    """Single-label rows: a reader, each row's class index ``0..classes-1`` and its id.

    Build it with :func:`labelled_rows`, which checks the labels and drops unlabelled rows.
    """

    features: RowReader
    labels: np.ndarray  # (n,) int64 in 0..classes-1
    ids: np.ndarray  # (n,) the rows' ids (the kNN baseline draws its sample by id hash)
    classes: np.ndarray  # the original label of each class index
    dropped: int = 0  # unlabelled rows (label -1) left out

    @property
    def n(self) -> int:
        return self.features.n

    @property
    def dim(self) -> int:
        return self.features.dim

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    def blocks(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(float32 rows, class indices)`` blocks in row order."""
        start = 0
        for block in self.features.blocks():
            yield block, self.labels[start : start + len(block)]
            start += len(block)


def labelled_rows(
    features: RowReader | np.ndarray,
    labels: np.ndarray,
    ids: Sequence[str] | np.ndarray | None = None,
    *,
    what: str = "the rows",
) -> LabelledRows:
    """Check ``labels`` and pair them with ``features`` (rows labelled -1 are left out).

    Args:
        features: a row reader, or an ``(n, dim)`` array.
        labels: ``(n,)`` integer class labels, -1 where unknown.
        ids: the rows' ids (default: their positions).
        what: how error messages name the rows (e.g. the feature set's path).

    Raises:
        SpecError: see :func:`check_labels`.
    """
    reader = ArrayRows(features) if isinstance(features, np.ndarray) else features
    y = np.asarray(labels)
    if len(y) != reader.n:
        raise SpecError(f"{what}: {reader.n} rows but {len(y)} labels; pass one label per row.")
    keep, classes, index = check_labels(y, what=what)
    ids = np.arange(len(y)).astype(str) if ids is None else np.asarray(ids)
    if len(keep) < len(y):
        reader = reader.take(keep)
    return LabelledRows(reader, index, ids[keep], classes, len(y) - len(keep))


def check_labels(labels: np.ndarray, *, what: str = "the rows") -> tuple[np.ndarray, ...]:
    """``(labelled positions, classes, each labelled row's class index)`` of ``labels``.

    Raises:
        SpecError: multi-label labels, no labelled row, or a single class; each names the fix.
    """
    y = np.asarray(labels)
    if y.ndim == 2:
        raise SpecError(
            f"{what} are multi-label (labels {y.shape[0]} × {y.shape[1]}); transferability "
            "estimates (LogME, H-score, LEEP, NCE, kNN-LOO) are defined for one class per "
            "image. Use a single-label source (class sub-folders, or a manifest with one label "
            "per row), or score this set with `bob-cache probe --method linear`."
        )
    keep = np.flatnonzero(y >= 0)
    if len(keep) == 0:
        raise SpecError(
            f"{what} have no labels (every label is -1); transferability estimates need "
            "labelled rows. Extract a labelled source: a folder with class sub-folders, or a "
            "manifest with a label column."
        )
    classes, index = np.unique(y[keep], return_inverse=True)
    if len(classes) < 2:
        raise SpecError(
            f"{what} hold a single class ({int(classes[0])}); transferability estimates "
            "compare classes and need at least two. Check the labels or the split name."
        )
    return keep, classes, index.astype(np.int64)
