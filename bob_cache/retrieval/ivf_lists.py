"""An IVF part stored as its inverted lists alone.

Every part of a sharded index holds the same coarse quantizer (nlist × d floats: 12.6 MB at
4,096 × 768, 805 MB at 262,144 lists), so each part is serialized with an empty placeholder in
its place (:func:`without_quantizer`) and read back into a copy of the trained index, which
holds the real one (:func:`with_quantizer`). A part's codebooks (PQ centroids, SQ ranges: under
1 MB) stay in it, so a part of another training is still told apart. Parts written whole by
earlier builds are read as they are.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from bob_cache.extras import import_faiss


@contextmanager
def without_quantizer(index: Any) -> Iterator[Any]:
    """``index`` with an empty coarse quantizer meanwhile (to serialize its lists alone)."""
    faiss = import_faiss()
    ivf = faiss.extract_index_ivf(index)
    original = ivf.quantizer
    placeholder = faiss.IndexFlat(ivf.d, ivf.metric_type)  # owned here, never by the index
    ivf.quantizer = placeholder
    try:
        yield index
    finally:
        ivf.quantizer = original
        del placeholder


def is_lists_only(index: Any) -> bool:
    """Whether ``index`` was stored by :func:`without_quantizer` (its quantizer is empty)."""
    ivf = import_faiss().extract_index_ivf(index)
    return bool(ivf.nlist) and int(ivf.quantizer.ntotal) == 0


def read_flags() -> int:
    """FAISS read flags for a part: skip IVF-PQ's precomputed table, which is computed from
    the quantizer's centroids (the copy of the trained index brings its own)."""
    return int(import_faiss().IO_FLAG_SKIP_PRECOMPUTE_TABLE)


def with_quantizer(part: Any, trained: Any) -> Any:
    """``part``'s inverted lists in a copy of ``trained`` (a part stored whole: ``part``).

    ``trained`` must still be empty: it is cloned, not changed.
    """
    faiss = import_faiss()
    if not is_lists_only(part):
        return part
    full = faiss.clone_index(trained)
    target, source = faiss.extract_index_ivf(full), faiss.extract_index_ivf(part)
    target.replace_invlists(source.invlists, True)
    source.own_invlists = False  # the copy owns (and frees) the lists now
    target.ntotal = full.ntotal = source.ntotal
    return full
