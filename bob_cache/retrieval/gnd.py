"""Revisited Oxford/Paris-style ground truth: which database images answer each query.

The file is JSON (or the revisitop ``gnd_*.pkl``, same structure) with ``imlist`` (database
image names), ``qimlist`` (query image names) and ``gnd``: one object per query with
``easy``, ``hard`` and ``junk`` lists of ``imlist`` positions. Names match stored ids
exactly or by file stem (``all_souls_000013`` matches ``jpg/all_souls_000013.jpg``).
"""

from __future__ import annotations

import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bob_cache.errors import DataNotFoundError, GroundTruthError

PROTOCOLS = {  # name → (positive lists, ignored lists)
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
}


@dataclass(frozen=True)
class GroundTruth:
    """Database and query names, and per query the ``easy``/``hard``/``junk`` positions."""

    imlist: list[str]
    qimlist: list[str]
    gnd: list[dict[str, np.ndarray]]

    def split(self, query: int, protocol: str) -> tuple[np.ndarray, np.ndarray]:
        """``(positive, ignored)`` imlist positions of ``query`` under ``protocol``."""
        pos, ign = PROTOCOLS[protocol]
        entry = self.gnd[query]
        return (
            np.concatenate([entry[name] for name in pos]),
            np.concatenate([entry[name] for name in ign]),
        )


def load_ground_truth(path: str | Path) -> GroundTruth:
    """Read and validate a ground-truth file.

    Raises:
        DataNotFoundError: no such file.
        GroundTruthError: not JSON/pickle, keys missing, lengths or positions out of range.
    """
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataNotFoundError(f"Ground-truth file '{path}' does not exist. Check --gnd.")
    try:
        raw: Any = pickle.loads(p.read_bytes()) if p.suffix == ".pkl" else json.loads(p.read_text())
    except Exception as exc:  # json/pickle raise many types on garbage
        raise GroundTruthError(
            f"Cannot read ground truth '{path}' ({type(exc).__name__}: {exc}). Expected JSON "
            'like {"imlist": [...], "qimlist": [...], "gnd": [{"easy": [], "hard": [], '
            '"junk": []}, ...]} or a revisitop gnd_*.pkl.'
        ) from exc
    return _validate(raw, path)


def _validate(raw: Any, path: str | Path) -> GroundTruth:
    fix = "Fix the file: see `bob-cache retrieval-eval --help` for the format."
    if not isinstance(raw, dict) or not {"imlist", "qimlist", "gnd"} <= set(raw):
        have = sorted(raw) if isinstance(raw, dict) else type(raw).__name__
        raise GroundTruthError(
            f"Ground truth '{path}' needs keys imlist, qimlist and gnd; it has {have}. {fix}"
        )
    imlist, qimlist, gnd = list(map(str, raw["imlist"])), list(map(str, raw["qimlist"])), raw["gnd"]
    if not isinstance(gnd, list) or len(gnd) != len(qimlist):
        raise GroundTruthError(
            f"Ground truth '{path}' has {len(qimlist)} queries in qimlist but "
            f"{len(gnd) if isinstance(gnd, list) else 'no list of'} gnd entries. {fix}"
        )
    entries = []
    for q, entry in enumerate(gnd):
        lists = {}
        for name in ("easy", "hard", "junk"):
            values = entry.get(name, []) if isinstance(entry, dict) else None
            try:
                arr = np.asarray(values, dtype=np.int64).reshape(-1)
            except (TypeError, ValueError):
                arr = np.array([-1])
            if values is None or ((arr < 0) | (arr >= len(imlist))).any():
                raise GroundTruthError(
                    f"Ground truth '{path}', query {q} ('{qimlist[q]}'): '{name}' must be a "
                    f"list of imlist positions in [0, {len(imlist)}), got {values!r:.80}. {fix}"
                )
            lists[name] = arr
        entries.append(lists)
    return GroundTruth(imlist, qimlist, entries)


def match_names(names: list[str], ids: np.ndarray) -> np.ndarray:
    """Row of each name among ``ids`` (exact id, else file stem); -1 where none matches."""
    exact = {str(v): i for i, v in enumerate(ids)}
    stems: dict[str, int] = {}
    for i, v in enumerate(ids):
        stems.setdefault(Path(str(v)).stem, i)
    return np.asarray(
        [exact.get(n, stems.get(Path(n).stem, stems.get(n, -1))) for n in names], dtype=np.int64
    )
