"""The background writer: assembles batches into whole shards and stores them.

Compression and store I/O run on this thread, overlapped with the model on the main
thread. A bounded queue applies back-pressure; a failure (disk full, overflow) is re-raised
on the main thread at its next ``put`` or at ``close``, and a failed writer keeps draining
the queue so the main thread never blocks on it.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from types import TracebackType

import numpy as np

from bob_cache.stores import FeatureSet
from bob_cache.stores.feature_set import ShardRows

NON_FINITE = "non-finite features from the model"


@dataclass
class _ShardBuffer:
    start: int
    features: dict[str, np.ndarray]
    errors: list[str]
    digests: list[str]
    filled: int = 0
    non_finite: dict[str, np.ndarray] = field(default_factory=dict)


class ShardWriter:
    """Write outputs of one split into their feature sets, one whole shard at a time."""

    def __init__(
        self,
        targets: dict[str, FeatureSet],
        *,
        labels: np.ndarray,
        ids: Sequence[str],
        writer: dict[str, str] | None = None,
        queue_size: int = 8,
    ) -> None:
        first = next(iter(targets.values()))
        self.targets = targets
        self.labels, self.ids, self.writer = labels, ids, writer
        self.layout = first.layout
        self.n_rows = first.n_rows
        self.shards_written = 0
        self._buffers: dict[int, _ShardBuffer] = {}
        self._queue: queue.Queue = queue.Queue(maxsize=queue_size)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="bob-cache-writer", daemon=True)
        self._thread.start()

    def put(
        self,
        rows: np.ndarray,
        outputs: dict[str, np.ndarray],
        errors: Sequence[str],
        digests: Sequence[str],
    ) -> None:
        """Queue one batch (row indices, float32 outputs by name: vectors or, for a dense set,
        grids; error and content digest per row)."""
        self._raise_if_failed()
        self._queue.put((rows, outputs, list(errors), list(digests)))

    def close(self) -> None:
        """Store everything queued, stop the thread, and re-raise any failure."""
        self._queue.put(None)
        self._thread.join()
        self._raise_if_failed()

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(
        self, exc_type: type | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if exc_type is None:
            self.close()
        else:  # keep the main error; still commit the whole shards already queued
            self._queue.put(None)
            self._thread.join()

    def _raise_if_failed(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            if self._error is None:
                try:
                    self._add(*item)
                except BaseException as exc:
                    self._error = exc

    def _add(
        self,
        rows: np.ndarray,
        outputs: dict[str, np.ndarray],
        errors: list[str],
        digests: list[str],
    ) -> None:
        shard = int(rows[0]) // self.layout.shard_rows
        buf = self._buffers.get(shard) or self._new_buffer(shard)
        local = rows - buf.start
        for name, values in outputs.items():
            buf.features[name][local] = values
            buf.non_finite[name][local] = ~np.isfinite(values.reshape(len(values), -1)).all(axis=1)
        for i, err, digest in zip(local, errors, digests, strict=True):
            buf.errors[i] = err
            buf.digests[i] = digest
        buf.filled += len(rows)
        if buf.filled == len(buf.errors):
            self._flush(shard, buf)

    def _new_buffer(self, shard: int) -> _ShardBuffer:
        start, stop = self.layout.shard_bounds(shard, self.n_rows)
        m = stop - start
        buf = _ShardBuffer(
            start=start,
            features={
                n: np.empty((m, *fs.row_shape), np.float32) for n, fs in self.targets.items()
            },
            errors=[""] * m,
            digests=[""] * m,
            non_finite={n: np.zeros(m, bool) for n in self.targets},
        )
        self._buffers[shard] = buf
        return buf

    def _flush(self, shard: int, buf: _ShardBuffer) -> None:
        for name, fs in self.targets.items():
            flags = zip(buf.errors, buf.non_finite[name], strict=True)
            errors = [e or (NON_FINITE if bad else "") for e, bad in flags]
            stop = buf.start + len(errors)
            rows = ShardRows(
                labels=self.labels[buf.start : stop],
                ids=self.ids[buf.start : stop],
                digests=buf.digests,
                errors=errors,
            )
            fs.write_shard(shard, buf.features[name], rows, writer=self.writer)
        del self._buffers[shard]
        self.shards_written += 1
