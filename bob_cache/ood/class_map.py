"""Matching a shifted set's classes to the ID classifier's, as ImageNet-A/R's 200-class
evaluation does: the logits are restricted to the shared ID classes, and only rows of a shared
class are scored.

Classes match by name (case, surrounding spaces, ``_`` and ``-`` ignored), or through a class
map file that names, for each shift class, its ID class: a JSON object
``{"shift class": "ID class"}`` or a CSV/TSV with two columns (shift, ID; a header row naming
them is allowed). A file is taken as the whole mapping: unlisted shift classes are left out.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from bob_cache.errors import ClassMapError


@dataclass(frozen=True)
class ClassMap:
    """Shift labels mapped into the ID label space.

    Attributes:
        to_id: per shift label, its ID label (-1: not shared).
        id_labels: the shared ID labels, ascending: the logit columns kept.
    """

    to_id: np.ndarray
    id_labels: np.ndarray

    @property
    def n_shared(self) -> int:
        return len(self.id_labels)

    def predict(self, logits: np.ndarray) -> np.ndarray:
        """ID labels predicted from ``(n, K)`` logits restricted to the shared classes."""
        return self.id_labels[np.argmax(logits[:, self.id_labels], axis=1)]


def normalize_name(name: str) -> str:
    return " ".join(str(name).replace("_", " ").replace("-", " ").lower().split())


def read_class_map(path: str | Path) -> dict[str, str]:
    """``{shift class: ID class}`` from a JSON object or a two-column CSV/TSV file."""
    p = Path(path)
    if not p.is_file():
        raise ClassMapError(
            f"Class map '{path}' does not exist. Pass a JSON object {{\"shift class\": "
            '"ID class"}} or a two-column CSV (shift,id).'
        )
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".json":
        try:
            mapping = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ClassMapError(f"Class map '{path}' is not valid JSON: {exc}.") from exc
        if not isinstance(mapping, dict) or not all(
            isinstance(k, str) and isinstance(v, str | int) for k, v in mapping.items()
        ):
            raise ClassMapError(
                f"Class map '{path}' must be one JSON object of class names, "
                '{"shift class": "ID class", ...}.'
            )
        return {k: str(v) for k, v in mapping.items()}
    rows = list(csv.reader(text.splitlines(), delimiter="\t" if p.suffix == ".tsv" else ","))
    rows = [r for r in rows if r and any(c.strip() for c in r)]
    bad = [i + 1 for i, r in enumerate(rows) if len(r) != 2]
    if bad or not rows:
        raise ClassMapError(
            f"Class map '{path}' must have two columns per line (shift class, ID class); "
            f"{'it is empty' if not rows else f'line(s) {bad[:5]} do not'}."
        )
    header = [c.strip().lower() for c in rows[0]]
    if header in (["shift", "id"], ["shift_class", "id_class"], ["source", "target"]):
        rows = rows[1:]
    return {a.strip(): b.strip() for a, b in rows}


def resolve_class_map(
    id_classes: Sequence[str],
    shift_classes: Sequence[str],
    *,
    mapping: Mapping[str, str] | None = None,
    what: str = "the shift set",
) -> ClassMap:
    """The :class:`ClassMap` of ``shift_classes`` onto ``id_classes``.

    Raises:
        ClassMapError: the mapping names unknown classes, or no class is shared (both class
            lists are in the message).
    """
    id_index = {normalize_name(c): i for i, c in enumerate(id_classes)}
    shift_index = {normalize_name(c): i for i, c in enumerate(shift_classes)}
    to_id = np.full(len(shift_classes), -1, dtype=np.int64)
    if mapping is None:
        for name, i in shift_index.items():
            to_id[i] = id_index.get(name, -1)
    else:
        unknown_shift = [s for s in mapping if normalize_name(s) not in shift_index]
        unknown_id = [t for t in mapping.values() if normalize_name(t) not in id_index]
        if unknown_shift or unknown_id:
            parts = []
            if unknown_shift:
                parts.append(f"shift classes {unknown_shift[:10]} are not among {what}'s "
                             f"({_listing(shift_classes)})")  # fmt: skip
            if unknown_id:
                parts.append(f"ID classes {unknown_id[:10]} are not among the ID set's "
                             f"({_listing(id_classes)})")  # fmt: skip
            raise ClassMapError(f"The class map names unknown classes: {'; '.join(parts)}. "
                                "Fix the names in the class map file.")  # fmt: skip
        for s, t in mapping.items():
            to_id[shift_index[normalize_name(s)]] = id_index[normalize_name(t)]
    shared = np.unique(to_id[to_id >= 0])
    if not len(shared):
        raise ClassMapError(
            f"{what[0].upper()}{what[1:]} shares no class with the ID set. Its classes: "
            f"{_listing(shift_classes)}; the ID set's: {_listing(id_classes)}. Pass --class-map "
            'FILE (JSON {"shift class": "ID class"} or a two-column CSV) to match them.'
        )
    return ClassMap(to_id, shared)


def _listing(names: Sequence[str], n: int = 20) -> str:
    head = ", ".join(repr(str(c)) for c in list(names)[:n])
    return head + (f", ... ({len(names)} in all)" if len(names) > n else "") if names else "none"
