"""Few-shot subsets, hold-outs and cross-validation folds, drawn by a hash of the row ids.

Every row gets ``blake2b(seed, id)``; within each class the rows with the smallest hashes are
taken. A subset therefore depends only on the ids, the labels and the seed, never on row
order or on which other rows exist: every backbone in a battle sees exactly the same images,
even when their invalid rows differ, and anyone can redraw a subset from the ids.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np

from bob_cache.errors import SpecError

MAX_FOLDS = 5


def row_hashes(ids: Sequence[str] | np.ndarray, seed: int | str) -> np.ndarray:
    """One uint64 per row id: the first 8 bytes of ``blake2b(f"{seed}:{id}")``."""
    prefix = f"{seed}:".encode()
    digests = b"".join(
        hashlib.blake2b(prefix + str(i).encode(), digest_size=8).digest() for i in ids
    )
    return np.frombuffer(digests, dtype=">u8").astype(np.uint64)


def _ranked(labels: np.ndarray, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows ordered by (class, hash), and each row's class and rank inside its class."""
    order = np.lexsort((hashes, labels))
    classes = labels[order]
    starts = np.flatnonzero(np.r_[True, classes[1:] != classes[:-1]])
    rank = np.arange(len(order)) - np.repeat(starts, np.diff(np.r_[starts, len(order)]))
    return order, classes, rank


def sample_shots(labels: np.ndarray, ids: Sequence[str], shots: int, seed: int) -> np.ndarray:
    """Sorted row indices: the ``shots`` rows of each class with the smallest hashes."""
    if shots < 1:
        raise SpecError(f"--shots values must be at least 1, got {shots}.")
    classes, counts = np.unique(labels, return_counts=True)
    short = [(int(c), int(n)) for c, n in zip(classes, counts, strict=True) if n < shots]
    if short:
        listed = ", ".join(f"class {c} has {n}" for c, n in short[:5])
        raise SpecError(
            f"{shots}-shot needs {shots} training images per class, but {listed}"
            f"{' ...' if len(short) > 5 else ''}. Use fewer --shots, or a larger train split."
        )
    order, _, rank = _ranked(labels, row_hashes(ids, f"shots:{seed}"))
    return np.sort(order[rank < shots])


def sample_fraction(
    labels: np.ndarray, ids: Sequence[str], fraction: float, seed: int
) -> np.ndarray:
    """Sorted row indices: ``floor(fraction · n_c)`` rows of each class ``c`` (by hash).

    Rounding down per class means the subset never holds more than ``fraction`` of the rows.
    """
    if not 0 < fraction < 1:
        raise SpecError(f"--fraction values must be between 0 and 1 (exclusive), got {fraction}.")
    classes, counts = np.unique(labels, return_counts=True)
    take = np.floor(fraction * counts + 1e-9).astype(np.int64)
    empty = [(int(c), int(n)) for c, n, t in zip(classes, counts, take, strict=True) if t == 0]
    if empty:
        listed = ", ".join(f"class {c} ({n} images)" for c, n in empty[:5])
        raise SpecError(
            f"--fraction {fraction:g} leaves {len(empty)} class(es) with no training image: "
            f"{listed}{' ...' if len(empty) > 5 else ''}. Use a larger fraction, or --shots "
            "for a fixed number of images per class."
        )
    order, cls, rank = _ranked(labels, row_hashes(ids, f"fraction:{seed}"))
    quota = dict(zip(classes.tolist(), take.tolist(), strict=True))
    keep = rank < np.array([quota[c] for c in cls.tolist()], dtype=np.int64)
    return np.sort(order[keep])


def hash_holdout(ids: Sequence[str], fraction: float, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(kept, held-out) row indices: each row held out when its id's hash (under ``key``) falls
    in the lowest ``fraction`` of the hash range, whatever its label."""
    held = row_hashes(ids, key) < np.uint64(int(fraction * 2**64))
    return np.flatnonzero(~held), np.flatnonzero(held)


def holdout(
    labels: np.ndarray, ids: Sequence[str], fraction: float, *, seed: int | str = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) row indices: ``round(fraction · n_c)`` rows per class held out.

    A class keeps at least one training row; single-label only (multi-label rows are held out
    by hash alone).
    """
    if labels.ndim != 1:
        return hash_holdout(ids, fraction, f"holdout:{seed}")
    order, cls, rank = _ranked(labels, row_hashes(ids, f"holdout:{seed}"))
    classes, counts = np.unique(labels, return_counts=True)
    held_out = np.minimum(np.round(fraction * counts), counts - 1)
    quota = dict(zip(classes.tolist(), held_out.tolist(), strict=True))
    held = rank < np.array([quota[c] for c in cls.tolist()], dtype=np.int64)
    return np.sort(order[~held]), np.sort(order[held])


def cv_folds(labels: np.ndarray, ids: Sequence[str], seed: int) -> np.ndarray | None:
    """A fold number per row for stratified cross-validation, or None when impossible.

    ``k = min(5, smallest class count)`` folds; inside each class, rows ordered by hash are
    dealt to folds in turn, so every fold holds every class. None when a class has one row.
    """
    smallest = int(np.unique(labels, return_counts=True)[1].min())
    if smallest < 2:
        return None
    order, _, rank = _ranked(labels, row_hashes(ids, f"folds:{seed}"))
    folds = np.empty(len(labels), dtype=np.int64)
    folds[order] = rank % min(MAX_FOLDS, smallest)
    return folds
