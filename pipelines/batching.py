"""Shard-aligned batching: batches never cross a shard boundary.

A resumed run therefore feeds the model exactly the batches an uninterrupted run would
have, so results are bit-identical, and every shard is complete after a whole number of
batches.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from torch.utils.data import Sampler


class ShardBatchSampler(Sampler[list[int]]):
    """Yield row-index batches covering ``shards`` of ``shard_rows`` rows each."""

    def __init__(
        self, shards: Sequence[int], *, shard_rows: int, n_rows: int, batch_size: int
    ) -> None:
        self.shards = list(shards)
        self.shard_rows = shard_rows
        self.n_rows = n_rows
        self.batch_size = batch_size

    def _bounds(self, shard: int) -> range:
        return range(shard * self.shard_rows, min((shard + 1) * self.shard_rows, self.n_rows))

    def __iter__(self) -> Iterator[list[int]]:
        for shard in self.shards:
            rows = self._bounds(shard)
            for start in range(rows.start, rows.stop, self.batch_size):
                yield list(range(start, min(start + self.batch_size, rows.stop)))

    def __len__(self) -> int:
        return sum(-(-len(self._bounds(s)) // self.batch_size) for s in self.shards)

    @property
    def n_selected_rows(self) -> int:
        return sum(len(self._bounds(s)) for s in self.shards)
