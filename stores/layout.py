"""How a feature set is laid out: chunk and shard sizes along samples, and compression.

Rows are chunked along the sample axis; ``shard_rows`` rows form one stored object (a
shard), which is the unit of atomic writes, commits and resume. Features keep whole rows
in each inner chunk so one row is never split across objects. Every encoded chunk ends with
a crc32c checksum (:mod:`bob_cache.stores.checksums`) unless ``checksum`` is off (sets
written before checksums existed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from zarr.codecs import BloscCodec, BloscShuffle, GzipCodec, ZstdCodec

from bob_cache.errors import SpecError
from bob_cache.stores.checksums import checksummed

DEFAULT_SHARD_ROWS = 4096
CHUNKS_PER_SHARD = 8
DEFAULT_COMPRESSION = "zstd:3"

_COMPRESSORS: dict[str, tuple[Callable[[int], Any], int]] = {
    "zstd": (lambda level: ZstdCodec(level=level), 3),
    "blosc": (
        lambda level: BloscCodec(cname="zstd", clevel=level, shuffle=BloscShuffle.shuffle),
        3,
    ),
    "lz4": (lambda level: BloscCodec(cname="lz4", clevel=level, shuffle=BloscShuffle.shuffle), 5),
    "gzip": (lambda level: GzipCodec(level=level), 5),
    "none": (lambda level: None, 0),
}


@dataclass(frozen=True)
class StorageLayout:
    """Chunking, sharding and compression of one feature set."""

    chunk_rows: int
    shard_rows: int
    compression: str
    checksum: bool = True

    def compressors(self) -> list[Any]:
        """The bytes-to-bytes codecs of every chunk: the compressor, then crc32c."""
        name, level = parse_compression(self.compression)
        codec = _COMPRESSORS[name][0](level)
        codecs = [codec] if codec is not None else []
        return checksummed(codecs) if self.checksum else codecs

    def n_shards(self, n_rows: int) -> int:
        return max(1, -(-n_rows // self.shard_rows))

    def shard_bounds(self, shard: int, n_rows: int) -> tuple[int, int]:
        start = shard * self.shard_rows
        return start, min(start + self.shard_rows, n_rows)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_compression(text: str) -> tuple[str, int]:
    """Parse ``name`` or ``name:level`` (``zstd:3``, ``lz4``, ``none``)."""
    name, _, level = text.partition(":")
    if name not in _COMPRESSORS:
        raise SpecError(
            f"Unknown compression '{text}'. Expected one of {', '.join(_COMPRESSORS)}, "
            "optionally with a level (zstd:5)."
        )
    try:
        return name, int(level) if level else _COMPRESSORS[name][1]
    except ValueError:
        raise SpecError(f"Compression level in '{text}' is not an integer (e.g. zstd:5).") from None


def resolve_layout(
    *,
    chunk_rows: int | None = None,
    shard_rows: int | None = None,
    compression: str = DEFAULT_COMPRESSION,
    checksum: bool = True,
) -> StorageLayout:
    """Fill in defaults and check that chunks tile shards exactly.

    Without ``chunk_rows``, a shard holds about :data:`CHUNKS_PER_SHARD` chunks: the largest
    divisor of ``shard_rows`` up to ``shard_rows / CHUNKS_PER_SHARD`` rows each.
    """
    for option, value in (("--chunk-rows", chunk_rows), ("--shard-rows", shard_rows)):
        if value is not None and value < 1:
            raise SpecError(f"{option} must be at least 1, got {value}.")
    if shard_rows is None:
        shard = chunk_rows * CHUNKS_PER_SHARD if chunk_rows else DEFAULT_SHARD_ROWS
    else:
        shard = shard_rows
    fitting = [d for d in _divisors(shard) if d * CHUNKS_PER_SHARD <= shard]
    chunk = chunk_rows or max(fitting, default=1)
    if shard % chunk:
        choices = ", ".join(map(str, _divisors(shard)))
        raise SpecError(
            f"--shard-rows ({shard}) must be a multiple of --chunk-rows ({chunk}). Valid "
            f"--chunk-rows for --shard-rows {shard}: {choices}; or --shard-rows "
            f"{chunk * CHUNKS_PER_SHARD} for --chunk-rows {chunk}."
        )
    name, level = parse_compression(compression)
    return StorageLayout(chunk, shard, f"{name}:{level}", checksum=checksum)


def _divisors(n: int) -> list[int]:
    """Every divisor of ``n``, ascending."""
    small = [d for d in range(1, int(n**0.5) + 1) if n % d == 0]
    return sorted({*small, *(n // d for d in small)})
