"""Revisited Oxford/Paris-style ground truth: which database images answer each query.

The file is JSON (or the revisitop ``gnd_*.pkl``, same structure) with ``imlist`` (database
image names), ``qimlist`` (query image names) and ``gnd``: one object per query with
``easy``, ``hard`` and ``junk`` lists of ``imlist`` positions. Names match stored ids
exactly or by file stem (``all_souls_000013`` matches ``jpg/all_souls_000013.jpg``).

A ``.pkl`` is read by a restricted unpickler that builds only plain containers, strings and
numbers (what revisitop's files hold): a pickle naming any other class or function (the way
a malicious pickle runs code) is refused before anything is called.
"""

from __future__ import annotations

import io
import json
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from bob_cache.errors import DataNotFoundError, GroundTruthError

# The only globals a ground-truth pickle may name: builtin containers and numbers. Protocol 2+
# writes dict, list, tuple, str, int, float and bool with opcodes of their own; sets (before
# protocol 4) and the rest are named as globals. Python 2 pickles say ``__builtin__``.
SAFE_GLOBALS = frozenset(
    (module, name)
    for module in ("builtins", "__builtin__")
    for name in ("dict", "list", "tuple", "set", "frozenset", "str", "int", "float", "bool")
)
SAFE_CONTENTS = "dicts, lists, tuples, sets, strings, numbers and booleans"

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
        raw: Any = load_pickle(p) if p.suffix == ".pkl" else json.loads(p.read_text())
    except GroundTruthError:
        raise
    except Exception as exc:  # json/pickle raise many types on garbage
        raise GroundTruthError(
            f"Cannot read ground truth '{path}' ({type(exc).__name__}: {exc}). Expected JSON "
            'like {"imlist": [...], "qimlist": [...], "gnd": [{"easy": [], "hard": [], '
            '"junk": []}, ...]} or a revisitop gnd_*.pkl.'
        ) from exc
    return _validate(raw, path)


class _GroundTruthUnpickler(pickle.Unpickler):
    """An unpickler that resolves only :data:`SAFE_GLOBALS` (no other class or callable)."""

    def __init__(self, data: bytes, path: Path) -> None:
        super().__init__(io.BytesIO(data), encoding="latin1")  # latin1: Python 2 str pickles
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in SAFE_GLOBALS:
            raise GroundTruthError(
                f"Refusing to unpickle {module}.{name} from '{self.path}': ground-truth files "
                f"hold only {SAFE_CONTENTS}, so this file is not one (a pickle that names "
                "other objects can run code when loaded). Pass a revisitop gnd_*.pkl, or the "
                "ground truth as JSON."
            )
        return super().find_class(module, name)

    def persistent_load(self, pid: Any) -> Any:
        raise GroundTruthError(
            f"Refusing to unpickle a persistent id from '{self.path}': ground-truth files hold "
            f"only {SAFE_CONTENTS}. Pass a revisitop gnd_*.pkl, or the ground truth as JSON."
        )


def load_pickle(path: Path) -> Any:
    """Unpickle a ground-truth file with :class:`_GroundTruthUnpickler` (never runs code)."""
    return _GroundTruthUnpickler(path.read_bytes(), path).load()


def parse_ground_truth(raw: Any, path: str | Path) -> GroundTruth:
    """Validate an unpickled or parsed ground truth (``path`` names it in messages).

    Raises:
        GroundTruthError: keys missing, lengths or positions out of range.
    """
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
