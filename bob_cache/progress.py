"""Progress bars for long work: items/s and ETA on stderr, hidden when quiet or not a TTY."""

from __future__ import annotations

import sys

from tqdm.auto import tqdm


def progress_bar(total: int, *, desc: str, unit: str = "img", quiet: bool = False) -> tqdm:
    """A tqdm bar; ``disable=None`` lets tqdm hide it when stderr is not a terminal."""
    return tqdm(
        total=total,
        desc=desc,
        unit=unit,
        disable=True if quiet else None,
        file=sys.stderr,
        dynamic_ncols=True,
        smoothing=0.1,
    )
