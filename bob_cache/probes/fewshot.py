"""Few-shot subsets of a training split: k images per class, or a fraction of the rows.

Subsets are deterministic given the seed (and independent of the order in which settings
are requested), so every backbone in a battle sees the same images.
"""

from __future__ import annotations

import numpy as np
from sklearn.model_selection import train_test_split

from bob_cache.errors import SpecError


def sample_shots(labels: np.ndarray, shots: int, seed: int) -> np.ndarray:
    """Sorted row indices with ``shots`` rows of every class present in ``labels``."""
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
    rng = np.random.default_rng([seed, shots])
    picks = [rng.choice(np.flatnonzero(labels == c), shots, replace=False) for c in classes]
    return np.sort(np.concatenate(picks))


def sample_fraction(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """Sorted row indices of a stratified ``fraction`` of the rows."""
    if not 0 < fraction < 1:
        raise SpecError(f"--fraction values must be between 0 and 1 (exclusive), got {fraction}.")
    rows = np.arange(len(labels))
    n_classes = len(np.unique(labels))
    if round(fraction * len(rows)) < n_classes:
        raise SpecError(
            f"--fraction {fraction} keeps {round(fraction * len(rows))} of {len(rows)} training "
            f"images, fewer than the {n_classes} classes. Use a larger fraction or --shots."
        )
    try:
        subset, _ = train_test_split(rows, train_size=fraction, stratify=labels, random_state=seed)
    except ValueError:  # a class with a single image cannot be stratified
        subset, _ = train_test_split(rows, train_size=fraction, random_state=seed)
    return np.sort(subset)


def holdout(labels: np.ndarray, fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Deterministic stratified split of train rows into (train, validation) indices."""
    rows = np.arange(len(labels))
    strat = (
        labels if labels.ndim == 1 and np.unique(labels, return_counts=True)[1].min() >= 2 else None
    )
    train, val = train_test_split(rows, test_size=fraction, stratify=strat, random_state=seed)
    return np.sort(train), np.sort(val)
