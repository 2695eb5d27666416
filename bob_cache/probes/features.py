"""Feature rows for probes: held in memory, or streamed shard by shard from a feature set.

Both modes expose the same interface: ``n``, ``dim``, ``blocks()`` (float32 row blocks of at
most ``BLOCK_ROWS`` rows, in row order) and ``take()`` (a row subset). In-memory rows keep
their stored dtype (float16 stays half the size) and are converted one block at a time;
streaming never holds more than one shard of features, so a feature set larger than memory
can still be probed on a laptop CPU.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from bob_cache.errors import SpecError
from bob_cache.stores import FeatureSet

BLOCK_ROWS = 32_768


def _as_float32(block: np.ndarray) -> np.ndarray:
    """float32 rows; float16 goes through torch, whose conversion is ~10x numpy's here."""
    if block.dtype == np.float16:
        return torch.from_numpy(np.ascontiguousarray(block)).float().numpy()
    return block.astype(np.float32, copy=False)


def _shard_rows(fs: FeatureSet, rows: np.ndarray) -> Iterator[np.ndarray]:
    """The features of sorted ``rows``, one shard's worth at a time, in their stored dtype."""
    layout = fs.layout
    shard_of = rows // layout.shard_rows
    for shard in np.unique(shard_of):
        start, stop = layout.shard_bounds(int(shard), fs.n_rows)
        yield fs.features[start:stop][rows[shard_of == shard] - start]


@dataclass(frozen=True)
class _Part:
    """In-memory rows (``array``) or rows ``rows`` of feature set ``fs``, read per shard."""

    array: np.ndarray | None = None
    fs: FeatureSet | None = None
    rows: np.ndarray | None = None

    @property
    def n(self) -> int:
        return len(self.array) if self.array is not None else len(self.rows)

    def blocks(self) -> Iterator[np.ndarray]:
        if self.array is not None:
            for start in range(0, len(self.array), BLOCK_ROWS):
                yield _as_float32(self.array[start : start + BLOCK_ROWS])
            return
        for block in _shard_rows(self.fs, self.rows):
            for at in range(0, len(block), BLOCK_ROWS):
                yield _as_float32(block[at : at + BLOCK_ROWS])

    def take(self, positions: np.ndarray) -> _Part:
        if self.array is not None:
            return _Part(array=self.array[positions])
        return _Part(fs=self.fs, rows=self.rows[positions])


@dataclass(frozen=True)
class Features:
    """Rows for a probe: in-memory arrays and/or rows streamed from feature sets, in order."""

    parts: tuple[_Part, ...]

    @classmethod
    def in_memory(cls, array: np.ndarray) -> Features:
        """Rows held as given when float16 or float32 (other dtypes become float32)."""
        dtype = array.dtype if array.dtype in (np.float16, np.float32) else np.float32
        return cls((_Part(array=np.ascontiguousarray(array, dtype=dtype)),))

    @classmethod
    def streamed(cls, fs: FeatureSet, rows: np.ndarray) -> Features:
        return cls((_Part(fs=fs, rows=np.sort(np.asarray(rows, dtype=np.int64))),))

    @property
    def n(self) -> int:
        return sum(p.n for p in self.parts)

    @property
    def dim(self) -> int:
        first = self.parts[0]
        return first.array.shape[1] if first.array is not None else first.fs.dim

    @property
    def is_streamed(self) -> bool:
        return any(p.array is None for p in self.parts)

    def blocks(self) -> Iterator[np.ndarray]:
        """float32 blocks in row order: whole arrays, or one shard's rows at a time."""
        for part in self.parts:
            yield from part.blocks()

    def take(self, positions: np.ndarray) -> Features:
        """The rows at sorted ``positions`` (indices into this object's rows)."""
        positions = np.sort(np.asarray(positions, dtype=np.int64))
        parts, offset = [], 0
        for part in self.parts:
            inside = positions[(positions >= offset) & (positions < offset + part.n)] - offset
            if len(inside):
                parts.append(part.take(inside))
            offset += part.n
        if not parts:
            return Features.in_memory(np.zeros((0, self.dim), np.float32))
        return Features(tuple(parts))

    def materialize(self) -> np.ndarray:
        """All rows as one float32 array (use only when they fit in memory)."""
        if len(self.parts) == 1 and self.parts[0].array is not None:
            return _as_float32(self.parts[0].array)
        blocks = list(self.blocks())
        return blocks[0] if len(blocks) == 1 else np.concatenate(blocks)

    def concat(self, other: Features) -> Features:
        """These rows followed by ``other``'s."""
        return Features(self.parts + other.parts)


@dataclass(frozen=True)
class Standardizer:
    """Per-feature mean and standard deviation of the training rows."""

    mean: np.ndarray
    std: np.ndarray

    @classmethod
    def fit(cls, features: Features) -> Standardizer:
        """Two-moment pass in float64 over the blocks (constant features get std 1)."""
        total = np.zeros(features.dim)
        squares = np.zeros(features.dim)
        for block in features.blocks():
            b = block.astype(np.float64)
            total += b.sum(axis=0)
            squares += (b * b).sum(axis=0)
        mean = total / max(features.n, 1)
        var = np.maximum(squares / max(features.n, 1) - mean * mean, 0.0)
        std = np.sqrt(var)
        std[std < 1e-6 * max(float(std.max(initial=0.0)), 1e-12)] = 1.0
        return cls(mean.astype(np.float32), std.astype(np.float32))

    def __call__(self, block: np.ndarray) -> np.ndarray:
        return (block - self.mean) / self.std


def require_complete(fs: FeatureSet) -> None:
    """Raises FeatureSetNotFoundError (naming the command that finishes it) unless ``fs`` is
    complete."""
    from bob_cache.errors import FeatureSetNotFoundError

    if not fs.complete:
        raise FeatureSetNotFoundError(
            f"Feature set '{fs.path}' is incomplete. Finish it by rerunning its extraction "
            f"(`bob-cache info {fs.location} {fs.path}` shows the command)."
        )


def valid_rows(fs: FeatureSet) -> tuple[np.ndarray, np.ndarray]:
    """``(row indices, ids)`` of the rows whose image was read."""
    rows = np.flatnonzero(fs.array("valid")[:])
    return rows, np.asarray(fs.array("ids")[:])[rows]


def _read(fs: FeatureSet, rows: np.ndarray) -> np.ndarray:
    """``features[rows]`` in one array, read shard by shard (no whole-set intermediate copy)."""
    if len(rows) == fs.n_rows:
        return fs.features[:]
    out, at = np.empty((len(rows), *fs.row_shape), fs.features.dtype), 0
    for block in _shard_rows(fs, rows):
        out[at : at + len(block)] = block
        at += len(block)
    return out


def load_rows(fs: FeatureSet, *, stream: bool) -> tuple[Features, np.ndarray, np.ndarray]:
    """The valid rows of a feature set: ``(features, labels, ids)``.

    Raises:
        SpecError: rows marked valid hold NaN or inf (they are named), or the set is incomplete.
    """
    require_complete(fs)
    valid, ids = valid_rows(fs)
    labels = fs.array("labels")[:][valid]
    features = Features.streamed(fs, valid) if stream else Features.in_memory(_read(fs, valid))
    bad: list[int] = []
    start = 0
    for block in features.blocks():
        bad += (start + np.flatnonzero(~np.isfinite(block).all(axis=1))).tolist()
        start += len(block)
    if bad:
        names = ", ".join(f"'{ids[i]}'" for i in bad[:5])
        raise SpecError(
            f"{len(bad)} row(s) of '{fs.path}' marked valid hold NaN or inf features, "
            f"e.g. {names}. "
            f"Run `bob-cache verify {fs.location}` and re-extract the damaged shards."
        )
    return features, labels, ids
