"""Checksums of stored data: zarr v3's ``crc32c`` codec on every object, and a digest per
shard of the decoded arrays.

The codec appends a CRC32C of each encoded chunk (and zarr's sharding codec checks its shard
index the same way), so a flipped bit fails the read instead of decoding to other numbers.
The per-shard digests (:func:`array_digest`, recorded in the shard's commit record) cover the
decoded values themselves, end to end: ``verify`` recomputes them, and a resume reads a
mismatch as damage. Sets written before checksums existed have neither; they still open, and
``verify`` says so.
"""

from __future__ import annotations

from typing import Any

import google_crc32c
import numpy as np
from zarr.codecs import Crc32cCodec

CHECKSUM = "crc32c"


def checksummed(codecs: list[Any]) -> list[Any]:
    """``codecs`` (bytes-to-bytes, e.g. a compressor) followed by the crc32c codec."""
    return [*codecs, Crc32cCodec()]


def has_checksum(array: Any) -> bool:
    """Whether ``array``'s chunks (a sharded array's inner chunks) carry crc32c."""
    codecs = list(array.metadata.codecs)
    for codec in list(codecs):
        codecs += list(getattr(codec, "codecs", ()))  # the sharding codec's inner chain
    return any(getattr(c, "to_dict", lambda: {})().get("name") == CHECKSUM for c in codecs)


def array_digest(values: np.ndarray) -> str:
    """``crc32c:<8 hex>`` of decoded values: CRC32C (as the codec, a damage check, not a
    cryptographic hash; ~4 GB/s) over their shape, kind and canonical bytes (strings as UTF-8
    joined by a unit separator, so the digest does not depend on the string dtype)."""
    values = np.asarray(values)
    if values.dtype.kind in "OUT":
        kind, data = b"str", "\x1f".join(map(str, values.ravel().tolist())).encode("utf-8")
    else:
        kind, data = values.dtype.str.encode(), np.ascontiguousarray(values).view(np.uint8)
    crc = google_crc32c.value(repr(values.shape).encode() + kind)
    crc = google_crc32c.extend(crc, data)
    return f"{CHECKSUM}:{crc:08x}"
