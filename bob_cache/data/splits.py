"""One split rule for sources that come without splits.

A labelled source without splits (a plain class folder, a manifest without a ``split``
column, a segmentation folder without split folders) is split into train/val/test by a hash
of each row's id, stratified by class: inside each class the rows are ordered by
``blake2b("split:" + id)`` and the first ``round(f_test · n_c)`` go to test, the next
``round(f_val · n_c)`` to val, the rest (at least one row) to train. The split depends only
on the ids, labels and fractions, so it is the same for every backbone, every run and every
stage. A source without any label (a collection to search) has nothing to stratify or score
and stays whole: one split, ``train`` unless ``--split`` names another.

What was done is recorded as a :class:`SplitRule` in every feature set's provenance
(``dataset.split_rule``) and, as its short text, in every results row (``split_rule``).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from bob_cache.errors import SpecError

SPLIT_NAMES = ("train", "val", "test")
DEFAULT_SPLIT = "train"
HASH_PREFIX = "split:"


@dataclass(frozen=True)
class SplitFractions:
    """Fractions of each class that go to train, val and test (they sum to 1)."""

    train: float = 0.6
    val: float = 0.2
    test: float = 0.2

    def __post_init__(self) -> None:
        values = (self.train, self.val, self.test)
        if any(not math.isfinite(v) or v < 0 or v > 1 for v in values) or self.train <= 0:
            raise SpecError(
                f"--split-fractions must be three numbers in [0, 1] for train,val,test with "
                f"train above 0, got {','.join(f'{v:g}' for v in values)}. "
                "Example: --split-fractions 0.6,0.2,0.2."
            )
        if abs(sum(values) - 1) > 1e-6:
            raise SpecError(
                f"--split-fractions must sum to 1 (train,val,test), got "
                f"{','.join(f'{v:g}' for v in values)} (sum {sum(values):g}). "
                "Example: --split-fractions 0.6,0.2,0.2."
            )

    def as_tuple(self) -> tuple[float, float, float]:
        return (self.train, self.val, self.test)

    def as_dict(self) -> dict[str, float]:
        return {"train": self.train, "val": self.val, "test": self.test}

    def __str__(self) -> str:
        return "/".join(f"{v:g}" for v in (self.train, self.val, self.test))


DEFAULT_FRACTIONS = SplitFractions()


def parse_split_fractions(value: str | Sequence[float] | None) -> SplitFractions | None:
    """``"0.7,0.1,0.2"`` (or three numbers, or their dict) → :class:`SplitFractions`; None
    stays None."""
    if value is None or isinstance(value, SplitFractions):
        return value
    if isinstance(value, dict):  # asdict() of a config
        value = [value.get(k) for k in SPLIT_NAMES]
    parts: Sequence[Any] = value.split(",") if isinstance(value, str) else value
    try:
        numbers = [float(p) for p in parts]
    except (TypeError, ValueError):
        numbers = []
    if len(numbers) != 3:
        raise SpecError(
            f"--split-fractions takes three numbers for train,val,test, got {value!r}. "
            "Example: --split-fractions 0.6,0.2,0.2."
        )
    return SplitFractions(*numbers)


@dataclass(frozen=True)
class SplitRule:
    """How a source's rows came to be in their splits."""

    kind: str  # "distributed", "id-hash" or "whole"
    fractions: SplitFractions | None = None
    detail: str = ""

    @property
    def text(self) -> str:
        """Short form for results rows: ``as distributed``, ``id-hash 0.6/0.2/0.2``, ``whole``."""
        if self.kind == "id-hash":
            return f"id-hash {self.fractions}"
        return self.detail or ("as distributed" if self.kind == "distributed" else self.kind)

    def describe(self) -> dict[str, Any]:
        """The provenance record (``dataset.split_rule`` in every feature set)."""
        record: dict[str, Any] = {"kind": self.kind, "text": self.text}
        if self.fractions is not None:
            record["fractions"] = self.fractions.as_dict()
            record["hash"] = f"blake2b('{HASH_PREFIX}' + id), stratified by label"
        return record


AS_DISTRIBUTED = SplitRule("distributed")


def rule_text(dataset_attrs: dict[str, Any]) -> str:
    """The short split rule of a feature set's ``dataset`` provenance ("" when not recorded)."""
    rule = dataset_attrs.get("split_rule") or {}
    return str(rule.get("text", ""))


def check_fractions_apply(source: Any, fractions: SplitFractions | None) -> None:
    """Refuse ``--split-fractions`` for a source whose splits are not made by the hash rule.

    Raises:
        SpecError: the source has splits of its own, or no labels (it stays whole).
    """
    if fractions is None or source.split_rule.kind == "id-hash":
        return
    why = (
        f"has splits of its own ({', '.join(source.splits)})"
        if source.split_rule.kind == "distributed"
        else "has no labels, so it stays one split"
    )
    raise SpecError(
        f"--split-fractions applies only to a labelled source without splits, and "
        f"'{source.origin}' {why}. Drop --split-fractions."
    )


def hash_split(
    labels: Sequence[Any], ids: Sequence[str], fractions: SplitFractions
) -> dict[str, np.ndarray]:
    """Row indices of each split (sorted; empty splits left out), stratified by ``labels``.

    Labels may be ints or tuples (multi-label rows are stratified by their whole label row).
    """
    strata = np.unique([repr(x) for x in labels], return_inverse=True)[1].reshape(-1)
    hashes = np.array([int.from_bytes(_digest(i), "big") for i in ids], dtype=np.uint64).reshape(-1)
    order = np.lexsort((hashes, strata))
    part = np.empty(len(order), dtype=np.int64)
    starts = np.flatnonzero(np.r_[True, strata[order][1:] != strata[order][:-1]])
    for start, stop in zip(starts, np.r_[starts[1:], len(order)], strict=True):
        n = int(stop - start)
        n_test = min(_round(fractions.test * n), n - 1)
        n_val = min(_round(fractions.val * n), n - 1 - n_test)
        part[order[start : start + n_test]] = 2
        part[order[start + n_test : start + n_test + n_val]] = 1
        part[order[start + n_test + n_val : stop]] = 0
    chosen = {name: np.flatnonzero(part == i) for i, name in enumerate(SPLIT_NAMES)}
    return {name: rows for name, rows in chosen.items() if len(rows)}


def split_rows(
    rows: Sequence[Any],
    *,
    split: str,
    fractions: SplitFractions | None,
    labelled: bool | None = None,
) -> tuple[dict[str, list[Any]], SplitRule]:
    """Apply the rule to the rows of a source that has no splits of its own.

    Args:
        rows: samples with ``id`` and ``label``.
        split: the ``--split`` asked for (names the single split of an unlabelled source).
        fractions: the fractions (None: :data:`DEFAULT_FRACTIONS`).
        labelled: whether the source carries labels (None: any row has a label); unlabelled
            sources stay whole.
    """
    if labelled is None:
        labelled = any(_has_label(r.label) for r in rows)
    if not labelled:
        name = DEFAULT_SPLIT if split == "all" else split
        return {name: list(rows)}, SplitRule("whole", detail="whole (unlabelled)")
    fractions = fractions or DEFAULT_FRACTIONS
    parts = hash_split([r.label for r in rows], [r.id for r in rows], fractions)
    return {name: [rows[i] for i in idx] for name, idx in parts.items()}, SplitRule(
        "id-hash", fractions
    )


def _has_label(label: Any) -> bool:
    if isinstance(label, tuple | list):
        return any(v != -1 for v in label)
    return label != -1


def _digest(row_id: str) -> bytes:
    return hashlib.blake2b(f"{HASH_PREFIX}{row_id}".encode(), digest_size=8).digest()


def _round(x: float) -> int:
    """Round half up (``round(2.5) == 3``), as the README states."""
    return math.floor(x + 0.5 + 1e-9)
