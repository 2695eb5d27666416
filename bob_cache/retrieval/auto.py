"""``--kind auto``: the fastest index family whose memory fits the budget.

Order of preference for a target recall (search speed on CPU, measured in BENCHMARKS.md):
exact ``flat`` while a brute-force scan is cheap, then ``hnsw`` (graph, fastest at high
recall), then ``ivf`` (inverted lists over full vectors, smaller than a graph), then
``ivfpq`` with the largest product-quantizer code that fits. The search parameter is then
tuned for the target recall by the builder.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bob_cache.errors import SpecError
from bob_cache.retrieval.kinds import IndexKind, estimate_bytes, get_kind, pq_subquantizers

# Below this many rows an exact scan answers a query in ~1 ms per 10k rows on one core,
# cheaper than any approximate index's build and tuning.
FLAT_MAX_ROWS = 50_000


@dataclass(frozen=True)
class Choice:
    """A kind, its build parameters, the memory it needs, and why it was picked."""

    kind: IndexKind
    params: dict[str, Any]
    bytes: int
    reason: str


def resolve_kind(
    kind: str, n_rows: int, dim: int, *, max_memory: int | None, params: dict[str, Any]
) -> Choice:
    """Resolve ``kind`` (``auto`` or a name) and its parameters for ``n_rows`` × ``dim``.

    Raises:
        SpecError: the chosen kind (or every kind, for auto) needs more than ``max_memory``.
    """
    if kind != "auto":
        chosen = get_kind(kind)
        merged = {**chosen.defaults(n_rows, dim), **params}
        need = estimate_bytes(chosen, n_rows, dim, merged)
        if max_memory is not None and need > max_memory:
            raise SpecError(
                f"A {kind} index of {n_rows} × {dim} needs about {_gib(need)}, over "
                f"--max-memory {_gib(max_memory)}. Raise --max-memory, or use --kind auto "
                "(it picks a compressed index that fits)."
            )
        return Choice(chosen, merged, need, "requested")
    budget = max_memory if max_memory is not None else 2**62
    for name in ("flat", "hnsw", "ivf"):
        candidate = get_kind(name)
        merged = candidate.defaults(n_rows, dim)
        need = estimate_bytes(candidate, n_rows, dim, merged)
        if name == "flat" and n_rows > FLAT_MAX_ROWS:
            continue
        if need <= budget:
            return Choice(candidate, merged, need, f"{n_rows} rows fit {name} in the budget")
    ivfpq = get_kind("ivfpq")
    nlist = ivfpq.defaults(n_rows, dim)["nlist"]
    fixed = estimate_bytes(ivfpq, 0, dim, {"nlist": nlist, "m": 1})
    per_row = (budget - fixed) / max(n_rows, 1) - 8
    m = pq_subquantizers(dim, per_row)
    if m is None:
        floor = estimate_bytes(ivfpq, n_rows, dim, {"nlist": nlist, "m": 1})
        raise SpecError(
            f"No index of {n_rows} × {dim} fits --max-memory {_gib(budget)}; the smallest "
            f"(ivfpq with 1-byte codes) needs about {_gib(floor)}. Raise --max-memory."
        )
    merged = {"nlist": nlist, "m": m}
    need = estimate_bytes(ivfpq, n_rows, dim, merged)
    return Choice(ivfpq, merged, need, f"full vectors exceed the budget: {m}-byte PQ codes")


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
