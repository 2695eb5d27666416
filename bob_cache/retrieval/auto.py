"""``--kind auto``: the fastest index family that fits the memory budget and can reach the
target recall.

Order of preference (search speed on CPU at a target recall, measured in BENCHMARKS.md):
exact ``flat`` while a brute-force scan is cheap; ``hnsw`` (a graph, fastest at moderate
recall) for targets up to :data:`HNSW_MAX_TARGET`; ``ivf`` over full vectors (its recall keeps
climbing with ``nprobe`` where a graph built with default parameters levels off near 0.98);
then compressed codes when full vectors exceed the budget: ``ivfsq`` with 8- then 4-bit
scalar codes, and last ``ivfpq`` with the largest product-quantizer code that fits. The
builder then tunes the search parameter for the target recall and records what it reached.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from bob_cache.errors import SpecError
from bob_cache.retrieval.kinds import (
    SQ_BITS,
    IndexKind,
    estimate_bytes,
    get_kind,
    pq_subquantizers,
)

# Below this many rows an exact scan answers a query in ~1 ms per 10k rows on one core,
# cheaper than any approximate index's build and tuning.
FLAT_MAX_ROWS = 50_000
# Above this target, hnsw (M=32, efConstruction=40) needs a very deep search or never gets
# there (1M × 768: 0.984 at efSearch 1024), while ivf reaches 0.99 at nprobe 8.
HNSW_MAX_TARGET = 0.96


@dataclass(frozen=True)
class Choice:
    """A kind, its build parameters, the memory it needs, and why it was picked."""

    kind: IndexKind
    params: dict[str, Any]
    bytes: int
    reason: str


def resolve_kind(
    kind: str,
    n_rows: int,
    dim: int,
    *,
    max_memory: int | None,
    params: dict[str, Any],
    target_recall: float = 0.95,
) -> Choice:
    """Resolve ``kind`` (``auto`` or a name) and its parameters for ``n_rows`` × ``dim``.

    Raises:
        SpecError: the chosen kind (or every kind, for auto) needs more than ``max_memory``.
    """
    if kind != "auto":
        chosen = get_kind(kind)
        merged = {**chosen.defaults(n_rows, dim), **params}
        problem = chosen.check(dim, merged)
        if problem:
            raise SpecError(problem)
        need = estimate_bytes(chosen, n_rows, dim, merged)
        if max_memory is not None and need > max_memory:
            raise SpecError(
                f"A {kind} index of {n_rows} × {dim} needs about {_gib(need)}, over "
                f"--max-memory {_gib(max_memory)}. Raise --max-memory, or use --kind auto "
                "(it picks a compressed index that fits)."
            )
        return Choice(chosen, merged, need, "requested")
    budget = max_memory if max_memory is not None else 2**62
    smallest = None
    for name, merged, reason in _candidates(n_rows, dim, target_recall, budget):
        candidate = get_kind(name)
        need = estimate_bytes(candidate, n_rows, dim, merged)
        smallest = need if smallest is None else min(smallest, need)
        if need <= budget:
            return Choice(candidate, merged, need, reason)
    raise SpecError(
        f"No index of {n_rows} × {dim} fits --max-memory {_gib(budget)}; the smallest "
        f"(ivfpq with 1-byte codes) needs about {_gib(smallest or 0)}. Raise --max-memory."
    )


def _candidates(
    n_rows: int, dim: int, target: float, budget: int
) -> Iterator[tuple[str, dict[str, Any], str]]:
    """``(kind, params, reason)`` in order of preference."""
    if n_rows <= FLAT_MAX_ROWS:
        yield "flat", {}, f"{n_rows} rows: an exact scan is cheap"
    if target <= HNSW_MAX_TARGET:
        yield "hnsw", get_kind("hnsw").defaults(n_rows, dim), "full vectors and a graph fit"
    ivf = get_kind("ivf").defaults(n_rows, dim)
    why = "" if target <= HNSW_MAX_TARGET else f" (target {target} is above hnsw's reach)"
    yield "ivf", ivf, "full vectors fit" + why
    for bits in SQ_BITS:
        yield "ivfsq", {**ivf, "bits": bits}, f"full vectors exceed the budget: {bits}-bit codes"
    fixed = estimate_bytes(get_kind("ivfpq"), 0, dim, {**ivf, "m": 1})
    m = pq_subquantizers(dim, (budget - fixed) / max(n_rows, 1) - 8) or 1
    yield "ivfpq", {**ivf, "m": m}, f"scalar codes exceed the budget: {m}-byte PQ codes"


def parse_memory(text: str | None) -> int | None:
    """``'4GB'``, ``'512MiB'``, ``'2e9'`` → bytes (None stays None)."""
    if text is None:
        return None
    units = {"": 1, "B": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    raw = text.strip().upper().removesuffix("IB").removesuffix("B")
    unit = raw[-1] if raw and raw[-1] in units else ""
    try:
        value = float(raw[: len(raw) - len(unit)])
    except ValueError:
        value = -1.0
    if value <= 0:
        raise SpecError(f"--max-memory '{text}' is not a size. Examples: 4GB, 512MB, 2e9.")
    return int(value * units[unit])


def _gib(n: float) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"
