"""``--kind auto``: the fastest index family that fits the memory budget and can reach the
target recall.

Order of preference (search speed on CPU at a target recall, measured in BENCHMARKS.md):
exact ``flat`` while a brute-force scan is cheap; ``hnsw`` (a graph, fastest at moderate
recall) for targets up to :data:`HNSW_MAX_TARGET`; ``ivf`` over full vectors (its recall keeps
climbing with ``nprobe`` where a graph built with default parameters levels off near 0.98);
then compressed codes when full vectors exceed the budget: ``ivfsq`` with 8- then 4-bit
scalar codes, and last ``ivfpq`` with the largest product-quantizer code that fits. The
builder then tunes the search parameter for the target recall and records what it reached.

When no index fits the budget whole, auto builds in parts (``--shards``, see
``pipelines/index_sharded.py``): ``ivfpq`` with its default code size, split into as many
parts as it takes for one part's codes and the trained quantizer to fit the budget (the
memory of one build task; the whole index is then served from disk). With ``--shards N`` auto
considers the IVF kinds only.
"""

from __future__ import annotations

import math
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
# The kinds a sharded build can split: their inverted lists are added in parts and merged.
IVF_KINDS = ("ivf", "ivfsq", "ivfpq")
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
    shards: int | None = None  # build in this many parts (None: in one piece)


def resolve_kind(
    kind: str,
    n_rows: int,
    dim: int,
    *,
    max_memory: int | None,
    params: dict[str, Any],
    target_recall: float = 0.95,
    shards: int | None = None,
    max_shards: int | None = None,
) -> Choice:
    """Resolve ``kind`` (``auto`` or a name) and its parameters for ``n_rows`` × ``dim``.

    Args:
        shards: build in this many parts (``--shards``): IVF kinds only, and the memory
            budget applies to one part.
        max_shards: the store shards there are (auto splits into no more parts than that).

    Raises:
        SpecError: the chosen kind (or every kind, for auto) needs more than ``max_memory``;
            ``shards`` with a kind that has no inverted lists.
    """
    if shards is not None and kind not in ("auto", *IVF_KINDS):
        raise SpecError(
            f"--shards builds an IVF index in parts, but --kind {kind} has no inverted lists "
            f"to split. Use --kind {', '.join(IVF_KINDS[:-1])} or {IVF_KINDS[-1]} (or auto), "
            "or drop --shards."
        )
    if kind != "auto":
        chosen = get_kind(kind)
        merged = {**chosen.defaults(n_rows, dim), **params}
        problem = chosen.check(dim, merged)
        if problem:
            raise SpecError(problem)
        if shards is not None:
            return _sharded_choice(chosen, merged, n_rows, dim, shards, max_memory, "requested")
        need = estimate_bytes(chosen, n_rows, dim, merged)
        if max_memory is not None and need > max_memory:
            raise SpecError(
                f"A {kind} index of {n_rows} × {dim} needs about {_gib(need)}, over "
                f"--max-memory {_gib(max_memory)}. Raise --max-memory, or use --kind auto "
                "(it picks a compressed index that fits)."
            )
        return Choice(chosen, merged, need, "requested")
    budget = max_memory if max_memory is not None else 2**62
    for name, merged, reason in _candidates(n_rows, dim, target_recall, budget):
        candidate = get_kind(name)
        need = estimate_bytes(candidate, n_rows, dim, merged)
        if (shards is None or name in IVF_KINDS) and need <= budget:
            return Choice(candidate, merged, need, reason, shards)
    return _sharded_auto(n_rows, dim, budget=budget, shards=shards, max_shards=max_shards)


def _sharded_auto(
    n_rows: int, dim: int, *, budget: int, shards: int | None, max_shards: int | None
) -> Choice:
    """No index fits whole: ivfpq (default code size) in parts that each fit ``budget``."""
    kind = get_kind("ivfpq")
    params = kind.defaults(n_rows, dim)
    fixed = estimate_bytes(kind, 0, dim, params)
    room = budget - fixed
    if room <= 0:
        raise SpecError(
            f"No index of {n_rows} × {dim} fits --max-memory {_gib(budget)}, not even in parts: "
            f"the trained quantizer alone needs about {_gib(fixed)}. Raise --max-memory."
        )
    need = math.ceil(n_rows * kind.bytes_per_row(dim, params) / room)
    n = shards if shards is not None else max(2, need)
    if max_shards is not None and n > max_shards:
        raise SpecError(
            f"No index of {n_rows} × {dim} fits --max-memory {_gib(budget)}: built in parts, "
            f"it needs {n} parts of at most one store shard each, but the set has "
            f"{max_shards} shards. Raise --max-memory."
        )
    why = f"no index fits {_gib(budget)} whole: {params['m']}-byte PQ codes built in {n} parts"
    return _sharded_choice(kind, params, n_rows, dim, n, budget, why)


def _sharded_choice(
    kind: IndexKind,
    params: dict[str, Any],
    n_rows: int,
    dim: int,
    shards: int,
    max_memory: int | None,
    reason: str,
) -> Choice:
    """``kind`` built in ``shards`` parts; refused when one part exceeds ``max_memory``."""
    part = estimate_bytes(kind, math.ceil(n_rows / shards), dim, params)
    if max_memory is not None and part > max_memory:
        fixed = estimate_bytes(kind, 0, dim, params)
        per_row = kind.bytes_per_row(dim, params)
        fits = math.ceil(n_rows * per_row / max(max_memory - fixed, 1))
        fix = f"Raise --shards to {fits}" if max_memory > fixed else "Choose a smaller --nlist"
        raise SpecError(
            f"One part of a {kind.name} index of {n_rows} × {dim} in {shards} parts needs "
            f"about {_gib(part)}, over --max-memory {_gib(max_memory)}. {fix}, or raise "
            "--max-memory."
        )
    return Choice(kind, params, estimate_bytes(kind, n_rows, dim, params), reason, shards)


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
