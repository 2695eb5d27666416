"""The report's tables: a :class:`~bob_cache.ranking.Ranking` as rows of display strings.

Each table is a :class:`Table` that both templates (Markdown and HTML) render. Numbers that
rest on imported rows carry their source's mark (†, ‡, ...) and the report's footnotes
name the sources.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import pandas as pd

from bob_cache.ranking import SETTING_KEYS, Ranking

MARKS = ("†", "‡", "§", "¶", "‖")
CELL_KEYS = [*SETTING_KEYS, "backbone"]
NONE = "—"


@dataclass
class Table:
    """A titled table of display strings."""

    title: str
    columns: list[str]
    rows: list[list[str]]
    note: str = ""
    anchor: str = ""


@dataclass
class Marks:
    """Which source each imported number comes from, and its footnote mark."""

    by_source: dict[str, str] = field(default_factory=dict)
    cells: dict[tuple, str] = field(default_factory=dict)  # CELL_KEYS values → marks

    @classmethod
    def from_rows(cls, rows: pd.DataFrame) -> Marks:
        sources = sorted(s for s in rows["source"].dropna().astype(str).unique() if s)
        by_source = {s: _mark(i) for i, s in enumerate(sources)}
        imported = rows[rows["source"].astype(str) != ""]
        cells = {
            tuple(key): "".join(sorted({by_source[s] for s in group["source"]}))
            for key, group in imported.groupby(CELL_KEYS)
        }
        return cls(by_source, cells)

    def backbone(self, label: str) -> str:
        return "".join(sorted({m for key, m in self.cells.items() if key[-1] == label}))

    def footnotes(self) -> list[str]:
        return [f"{mark} imported from {source}" for source, mark in self.by_source.items()]


def task_tables(ranking: Ranking, marks: Marks, *, z: bool) -> list[Table]:
    """Per task, backbone × (dataset, method, setting): metric mean ± std over seeds, or z."""
    tables = []
    order = _backbone_order(ranking)
    for task in ranking.task_names:
        frame = ranking.zscores if z else ranking.values
        part = frame[frame["task"] == task]
        columns = _setting_columns(ranking.values[ranking.values["task"] == task])
        rows = []
        for label in order:
            mine = part[part["backbone"] == label].set_index(SETTING_KEYS)
            cells = [_cell(mine, key, z, marks, label) for key in columns]
            if z:
                cells += _task_mean(ranking, label, task)
            rows.append([ranking.backbones[label].shown, *cells])
        heads = [_heading(key, columns) for key in columns]
        metric = ", ".join(sorted({k[-1] for k in columns}))
        title = f"{task}: {'z-scores' if z else metric + ' (mean ± std over seeds)'}"
        extra = ["mean z", "settings"] if z else []
        tables.append(Table(title, ["backbone", *heads, *extra], rows, anchor=_slug(title)))
    return tables


def ranking_table(ranking: Ranking, overall: pd.DataFrame, marks: Marks, title: str) -> Table:
    """Rank, backbone, metadata, overall z (± std over seeds), task means, counts."""
    tasks = ranking.task_names
    columns = ["rank", "backbone", "size", "family", "method", "data", "params (M)", "overall z",
               *[f"z {t}" for t in tasks], "tasks", "settings"]  # fmt: skip
    rows = []
    for r in overall.to_dict(orient="records"):
        spread = r.get("z_seed_std")
        score = _num(r["z"], 2) + ("" if _missing(spread) else f" ± {spread:.2f}")
        name = ranking.backbones[r["backbone"]].shown
        rows.append([
            str(r["rank"]), name + marks.backbone(r["backbone"]), r["size_class"],
            _text(r["family"]), _text(r["method"]), _text(r["data"]),
            _num(None if _missing(r["params"]) else r["params"] / 1e6, 1), score,
            *[_num(r.get(f"z_{t}"), 2) for t in tasks], str(r["tasks"]), str(r["settings"]),
        ])  # fmt: skip
    labels = [ranking.backbones[b] for b in overall["backbone"]]
    if any(i.shown != i.label for i in labels):  # display names: keep the results' labels too
        columns.insert(2, "results label")
        for row, info in zip(rows, labels, strict=True):
            row.insert(2, info.label)
    return Table(title, columns, rows, anchor=_slug(title))


def correlation_table(ranking: Ranking) -> Table:
    """Spearman rho between tasks, with the backbones behind each."""
    rho, n = ranking.correlations, ranking.correlation_counts
    rows = [
        [a, *[f"{_num(rho.loc[a, b], 2)} (n={n.loc[a, b]})" for b in rho.columns]]
        for a in rho.index
    ]
    return Table("Spearman correlation between tasks", ["task", *rho.columns], rows,
                 anchor="correlations")  # fmt: skip


def scale_table(ranking: Ranking) -> Table:
    """Spearman of overall z against parameters and pretraining images."""
    columns = ["against", "family", "backbones", "rho", "p-value", "excluded (unknown)"]
    rows = [
        [r["against"], r["family"], str(r["backbones"]), _num(r["rho"], 2),
         _num(r["p_value"], 3), r["excluded"] or NONE]
        for r in ranking.scale.to_dict(orient="records")
    ]  # fmt: skip
    return Table("Overall z against scale (Spearman)", columns, rows, anchor="scale")


def missing_cells(ranking: Ranking) -> pd.DataFrame:
    """Backbone × task × dataset cells without rows, where other backbones have some."""
    present = ranking.values[["task", "dataset", "backbone"]].drop_duplicates()
    wanted = (
        present[["task", "dataset"]]
        .drop_duplicates()
        .merge(pd.DataFrame({"backbone": _backbone_order(ranking)}), how="cross")
    )
    merged = wanted.merge(present, how="left", indicator=True)
    gaps = merged[merged["_merge"] == "left_only"][["backbone", "task", "dataset"]]
    return gaps.sort_values(["backbone", "task", "dataset"]).reset_index(drop=True)


def frame_table(frame: pd.DataFrame, title: str, *, anchor: str = "", note: str = "") -> Table:
    """Any small frame, as text."""
    rows = [[_text(v) for v in r] for r in frame.itertuples(index=False)]
    return Table(title, [str(c) for c in frame.columns], rows, note=note, anchor=anchor)


def provenance_frame(ranking: Ranking) -> pd.DataFrame:
    """Per number shown: the seeds, feature keys, config hashes and source behind it."""
    rows = ranking.primary_rows.astype({"seed": object, "feature_key": str, "config_hash": str})
    joined = rows.groupby(CELL_KEYS, sort=True).agg(
        seeds=("seed", _join), feature_keys=("feature_key", _join),
        config_hashes=("config_hash", _join), source=("source", _join),
    )  # fmt: skip
    return joined.reset_index()


def _backbone_order(ranking: Ranking) -> list[str]:
    ranked = list(ranking.overall["backbone"])
    return ranked + sorted(b for b in ranking.backbones if b not in ranked)


def _setting_columns(values: pd.DataFrame) -> list[tuple]:
    return sorted({tuple(k) for k in values[SETTING_KEYS].itertuples(index=False)})


def _heading(key: tuple, columns: Sequence[tuple]) -> str:
    """The parts of a setting that differ between the task's columns (dataset at least)."""
    dataset, _, method, setting, metric = key
    parts = [dataset]
    for i, part in ((2, method), (3, setting), (4, metric)):
        if len({c[i] for c in columns}) > 1:
            parts.append(part)
    return " · ".join(parts)


def _cell(mine: pd.DataFrame, key: tuple, z: bool, marks: Marks, label: str) -> str:
    if key not in mine.index:
        return NONE
    row = mine.loc[key]
    if z:
        text = _num(row["z"], 2)
    else:
        text = f"{row['value']:.4f}"
        if row["seeds"] > 1 and not _missing(row["std"]):
            text += f" ± {row['std']:.4f}"
    return text + marks.cells.get((*key, label), "")


def _task_mean(ranking: Ranking, label: str, task: str) -> list[str]:
    mine = ranking.tasks[(ranking.tasks["backbone"] == label) & (ranking.tasks["task"] == task)]
    if mine.empty:
        return [NONE, "0"]
    return [_num(mine["z"].iloc[0], 2), str(int(mine["settings"].iloc[0]))]


def _mark(i: int) -> str:
    return MARKS[i] if i < len(MARKS) else f"{MARKS[0]}{i + 1}"


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _num(value: object, digits: int) -> str:
    return NONE if _missing(value) else f"{float(value):.{digits}f}"  # type: ignore[arg-type]


def _text(value: object) -> str:
    return NONE if _missing(value) or value == "" else str(value)


def _join(values: pd.Series) -> str:
    return ", ".join(sorted({str(v) for v in values if not _missing(v) and str(v) != ""}))


def _slug(title: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in title.lower()).strip("-")
