"""Which source of each dataset name a ranking uses.

One dataset name may stand for several sources (a failed first run on a partial copy, a
re-downloaded folder, a ``--limit`` trial): their rows carry different
``dataset_fingerprint`` values. Rows of different sources are never mixed. Per dataset
name, the *current* source is the one of the newest row (by ``time``) that records a
fingerprint, unless ``prefer`` names another (``dataset_fingerprint=PREFIX``); rows of the
other sources are set aside and listed. Rows without a fingerprint (written before the
column existed, or imported) are kept: nothing tells their source apart.
"""

from __future__ import annotations

from collections.abc import Sequence

import pandas as pd

from bob_cache.ranking.identity import RankingOptionError

FINGERPRINT = "dataset_fingerprint"
SOURCE_COLUMNS = ["dataset", "used", "rows", "left_out", "left_out_rows", "backbones_left_out"]


def split_sources(
    rows: pd.DataFrame, *, prefer: Sequence[str] = ()
) -> tuple[pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """``(kept rows, rows of earlier sources, one line per dataset with several sources)``.

    Args:
        rows: results rows.
        prefer: fingerprint prefixes to use where a dataset has that source.

    Raises:
        RankingOptionError: a preferred prefix that no row's fingerprint starts with.
    """
    fingerprint = _fingerprints(rows)
    for want in prefer:
        if not fingerprint.str.startswith(want).any() or not want:
            known = ", ".join(sorted({f[:12] for f in fingerprint if f})) or "none"
            raise RankingOptionError(
                f"--prefer {FINGERPRINT}={want}: no row's dataset fingerprint starts with "
                f"'{want}'. Fingerprints present: {known}."
            )
    stale = pd.Series(False, index=rows.index)
    lines = []
    for dataset, part in rows[fingerprint != ""].groupby("dataset", sort=True):
        mine = fingerprint[part.index]
        if mine.nunique() < 2:
            continue
        current = _current(part, mine, prefer)
        old = part.index[mine != current]
        stale[old] = True
        lines.append(_line(str(dataset), current, part, mine))
    return rows[~stale], rows[stale], pd.DataFrame(lines, columns=SOURCE_COLUMNS)


def _current(part: pd.DataFrame, fingerprint: pd.Series, prefer: Sequence[str]) -> str:
    for want in prefer:
        hits = sorted({f for f in fingerprint if f.startswith(want)})
        if hits:
            return hits[0]
    times = part["time"].astype(str) if "time" in part else pd.Series("", index=part.index)
    return str(fingerprint[times.sort_values(kind="stable").index[-1]])


def _line(dataset: str, current: str, part: pd.DataFrame, fingerprint: pd.Series) -> dict:
    old = part[fingerprint != current]
    counts = fingerprint[old.index].value_counts().sort_index()
    return {
        "dataset": dataset,
        "used": current[:12],
        "rows": int((fingerprint == current).sum()),
        "left_out": ", ".join(f"{f[:12]} ({n} rows)" for f, n in counts.items()),
        "left_out_rows": len(old),
        "backbones_left_out": ", ".join(sorted(set(old["backbone"].astype(str)))),
    }


def _fingerprints(rows: pd.DataFrame) -> pd.Series:
    if FINGERPRINT not in rows:
        return pd.Series("", index=rows.index, dtype=object)
    column = rows[FINGERPRINT]
    return column.astype(object).where(column.notna(), "").astype(str)
