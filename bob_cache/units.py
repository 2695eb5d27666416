"""Sizes written for people."""

from __future__ import annotations


def size_text(n: float) -> str:
    """``n`` bytes as ``512 bytes``, ``1.6 MiB``, ``15.0 GiB``."""
    for unit in ("bytes", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.0f} {unit}" if unit == "bytes" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"
