"""Storage layout: defaults, validation, and compression choices."""

from __future__ import annotations

import pytest

from bob_cache.errors import SpecError
from bob_cache.stores import resolve_layout
from bob_cache.stores.layout import parse_compression


def test_defaults_tile_shards_with_eight_chunks() -> None:
    layout = resolve_layout()
    assert (layout.chunk_rows, layout.shard_rows, layout.compression) == (512, 4096, "zstd:3")
    assert resolve_layout(chunk_rows=100).shard_rows == 800
    assert resolve_layout(shard_rows=64).chunk_rows == 8


def test_shard_bounds_cover_every_row_once() -> None:
    layout = resolve_layout(chunk_rows=2, shard_rows=4)
    bounds = [layout.shard_bounds(s, 10) for s in range(layout.n_shards(10))]
    assert bounds == [(0, 4), (4, 8), (8, 10)]


def test_invalid_layouts_name_the_fix() -> None:
    with pytest.raises(SpecError, match=r"Valid --chunk-rows for --shard-rows 8: 1, 2, 4, 8;"):
        resolve_layout(chunk_rows=3, shard_rows=8)
    with pytest.raises(SpecError, match="--chunk-rows must be at least 1, got -1"):
        resolve_layout(chunk_rows=-1, shard_rows=8)
    with pytest.raises(SpecError, match="--shard-rows must be at least 1, got 0"):
        resolve_layout(shard_rows=0)  # was: silently the default


def test_a_shard_size_alone_gets_chunks_that_tile_it() -> None:
    assert resolve_layout(shard_rows=100).chunk_rows == 10  # was: 12, refused
    assert resolve_layout(shard_rows=7).chunk_rows == 1
    for shard in (1, 9, 100, 4096, 1000):
        layout = resolve_layout(shard_rows=shard)
        assert shard % layout.chunk_rows == 0 and layout.chunk_rows * 8 <= max(shard, 8)


@pytest.mark.parametrize(
    ("text", "parsed"),
    [("zstd", ("zstd", 3)), ("zstd:9", ("zstd", 9)), ("lz4", ("lz4", 5)), ("none", ("none", 0))],
)
def test_compression_names_and_levels(text: str, parsed: tuple[str, int]) -> None:
    assert parse_compression(text) == parsed


def test_unknown_compression_lists_choices() -> None:
    with pytest.raises(SpecError, match="Expected one of zstd, blosc, lz4, gzip, none"):
        resolve_layout(compression="brotli")
    with pytest.raises(SpecError, match="not an integer"):
        resolve_layout(compression="zstd:high")
