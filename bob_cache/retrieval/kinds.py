"""Index kinds: a registry of FAISS index families, each with its factory string, memory
cost, and the search parameter that trades speed for recall.

Every kind maps stored row numbers to FAISS ids (``IDMap2`` where the family has no ids of
its own), so invalid rows can be left out and new shards added later without renumbering.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from bob_cache.errors import SpecError
from bob_cache.registry import Registry

METRICS = ("cosine", "l2")


@dataclass(frozen=True)
class IndexKind:
    """One FAISS index family.

    Attributes:
        name: the ``--kind`` value.
        factory: ``params → faiss.index_factory string``.
        bytes_per_row: ``(dim, params) → bytes`` held per stored vector (codes, ids, links).
        search_param: FAISS parameter swept to reach a target recall (None: exact).
        sweep: values of ``search_param``, cheapest first.
        defaults: ``(n_rows, dim) → build parameters``.
        gpu: ``params → whether faiss-gpu can hold this index``.
        check: ``(dim, params) → what is wrong with them`` (None: they are valid).
    """

    name: str
    factory: Callable[[dict[str, Any]], str]
    bytes_per_row: Callable[[int, dict[str, Any]], float]
    search_param: str | None = None
    sweep: tuple[int, ...] = ()
    defaults: Callable[[int, int], dict[str, Any]] = field(default=lambda n, d: {})
    gpu: Callable[[dict[str, Any]], bool] = field(default=lambda p: True)
    check: Callable[[int, dict[str, Any]], str | None] = field(default=lambda d, p: None)

    @property
    def exact(self) -> bool:
        return self.search_param is None


def default_nlist(n_rows: int) -> int:
    """IVF lists: about 4·√N, a power of two, between 1 and N/39 (FAISS wants ≥39 rows each)."""
    target = 4 * math.sqrt(max(n_rows, 1))
    nlist = 2 ** max(0, round(math.log2(target)))
    return int(max(1, min(nlist, n_rows // 39 or 1)))


# faiss-gpu's IVFPQ takes these code sizes (bytes per vector) and no others.
GPU_PQ_BYTES = (1, 2, 3, 4, 8, 12, 16, 20, 24, 28, 32, 40, 48, 56, 64, 96)
SQ_BITS = (8, 6, 4)


def pq_subquantizers(dim: int, bytes_per_vector: float) -> int | None:
    """Largest PQ code size (bytes, 8 bits each) that divides ``dim`` and fits the budget,
    with at least 2 dimensions per sub-quantizer."""
    fitting = [m for m in range(1, dim // 2 + 1) if dim % m == 0 and m <= bytes_per_vector]
    return max(fitting) if fitting else None


_ID_BYTES = 8
_NPROBE_SWEEP = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 512)
KINDS: Registry[IndexKind] = Registry(
    "index kind", hint="Or pass auto: the fastest that fits the memory budget.", error=SpecError
)


def _check_sq(dim: int, params: dict[str, Any]) -> str | None:
    if params["bits"] in SQ_BITS:
        return None
    return f"--sq-bits {params['bits']} is not one of {', '.join(map(str, SQ_BITS))}."


def _check_pq(dim: int, params: dict[str, Any]) -> str | None:
    m = params["m"]
    if m >= 1 and dim % m == 0 and dim // m >= 2:
        return None
    return (
        f"--pq-bytes {m} must split the dimension {dim} into equal parts of 2 or more "
        f"(e.g. {pq_subquantizers(dim, dim / 8) or 1})."
    )


def register_kind(kind: IndexKind) -> IndexKind:
    return KINDS.register(kind.name, kind)


register_kind(
    IndexKind(
        "flat",
        factory=lambda p: "IDMap2,Flat",
        bytes_per_row=lambda d, p: 4 * d + 2 * _ID_BYTES,
    )
)
register_kind(
    IndexKind(
        "hnsw",
        factory=lambda p: f"IDMap2,HNSW{p['M']},Flat",
        # vectors + ~2M level-0 links (int32) + upper levels + the id maps
        bytes_per_row=lambda d, p: 4 * d + p["M"] * 2 * 4 * 1.05 + 2 * _ID_BYTES + 8,
        search_param="efSearch",
        sweep=(16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024),
        defaults=lambda n, d: {"M": 32, "efConstruction": 40},
        gpu=lambda p: False,
    )
)
register_kind(
    IndexKind(
        "ivf",
        factory=lambda p: f"IVF{p['nlist']},Flat",
        bytes_per_row=lambda d, p: 4 * d + _ID_BYTES,
        search_param="nprobe",
        sweep=_NPROBE_SWEEP,
        defaults=lambda n, d: {"nlist": default_nlist(n)},
    )
)
register_kind(
    IndexKind(
        "ivfsq",
        factory=lambda p: f"IVF{p['nlist']},SQ{p['bits']}",
        bytes_per_row=lambda d, p: math.ceil(d * p["bits"] / 8) + _ID_BYTES,
        search_param="nprobe",
        sweep=_NPROBE_SWEEP,
        defaults=lambda n, d: {"nlist": default_nlist(n), "bits": 8},
        gpu=lambda p: p["bits"] in (8, 4),
        check=_check_sq,
    )
)
register_kind(
    IndexKind(
        "ivfpq",
        # "np": no polysemous training (minutes at 1M rows; its Hamming filter is not used)
        factory=lambda p: f"IVF{p['nlist']},PQ{p['m']}x8np",
        bytes_per_row=lambda d, p: p["m"] + _ID_BYTES,
        search_param="nprobe",
        sweep=_NPROBE_SWEEP,
        defaults=lambda n, d: {"nlist": default_nlist(n), "m": pq_subquantizers(d, d / 8) or 1},
        gpu=lambda p: p["m"] in GPU_PQ_BYTES,
        check=_check_pq,
    )
)


def get_kind(name: str) -> IndexKind:
    """The index kind called ``name``."""
    return KINDS.get(name)


def list_kinds() -> list[str]:
    return KINDS.names()


def parse_metric(metric: str) -> str:
    if metric not in METRICS:
        raise SpecError(f"Unknown --metric '{metric}'. Expected {' or '.join(METRICS)}.")
    return metric


def estimate_bytes(kind: IndexKind, n_rows: int, dim: int, params: dict[str, Any]) -> int:
    """Memory the built index holds for ``n_rows`` vectors (codes, links, ids, centroids)."""
    centroids = params.get("nlist", 0) * dim * 4
    codebooks = 256 * dim * 4 if "m" in params else 2 * dim * 4 if "bits" in params else 0
    return int(n_rows * kind.bytes_per_row(dim, params) + centroids + codebooks)
