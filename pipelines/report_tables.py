"""The report's tables: a :class:`~bob_cache.ranking.Ranking` as rows of display strings.

Each table is a :class:`Table` that both templates (Markdown and HTML) render. Numbers that
rest on imported rows carry their source's mark (†, ‡, ...) and the report's footnotes
name the sources.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field

import pandas as pd

from bob_cache.ranking import SETTING_KEYS, Ranking
from bob_cache.ranking.analysis import FEW
from bob_cache.ranking.bootstrap import Bootstrap
from bob_cache.ranking.rank import CHANCE
from bob_cache.ranking.zscores import to_entries

MARKS = ("†", "‡", "§", "¶", "‖")
CELL_KEYS = [*SETTING_KEYS, "entry"]
NONE = "—"
FLAG = "⚠"
MAX_PAIRWISE = 20  # entries in the pairwise table (the best ones)


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
    def from_ranking(cls, ranking: Ranking) -> Marks:
        rows = ranking.rows
        sources = sorted(s for s in rows["source"].dropna().astype(str).unique() if s)
        by_source = {s: _mark(i) for i, s in enumerate(sources)}
        primary = ranking.primary_rows
        imported = primary[primary["source"].astype(str) != ""]
        membership = ranking.configurations.membership if ranking.configurations else None
        linked = to_entries(imported, membership) if len(imported) else imported
        cells = {
            tuple(key): "".join(sorted({by_source[s] for s in group["source"]}))
            for key, group in (linked.groupby(CELL_KEYS) if len(linked) else [])
        }
        return cls(by_source, cells)

    def backbone(self, label: str) -> str:
        """The marks of every number of entry ``label``."""
        return "".join(sorted({m for key, m in self.cells.items() if key[-1] == label}))

    def footnotes(self) -> list[str]:
        return [f"{mark} imported from {source}" for source, mark in self.by_source.items()]


def task_tables(ranking: Ranking, marks: Marks, *, z: bool) -> list[Table]:
    """Per task, backbone × (dataset, method, setting): metric mean ± std over seeds, or z."""
    tables = []
    order = _entry_order(ranking)
    for task in ranking.task_names:
        frame = ranking.zscores if z else ranking.values
        part = frame[frame["task"] == task]
        columns = _setting_columns(ranking.values[ranking.values["task"] == task])
        rows = []
        for label in order:
            mine = part[part["entry"] == label].set_index(SETTING_KEYS)
            cells = [_cell(mine, key, z, marks, label) for key in columns]
            if z:
                cells += _task_mean(ranking, label, task)
            rows.append([ranking.shown(label), *cells])
        heads = [_heading(key, columns) for key in columns]
        metric = ", ".join(sorted({k[-1] for k in columns}))
        title = f"{task}: {'z-scores' if z else metric + ' (mean ± std over seeds)'}"
        extra = ["mean z", "95% interval", "settings"] if z else []
        note = "" if z or not _flagged(ranking, task) else (
            f"{FLAG}: below chance ({_chance_text()}); see Numbers flagged.")  # fmt: skip
        tables.append(Table(title, ["backbone", *heads, *extra], rows, note=note,
                            anchor=_slug(title)))  # fmt: skip
    return tables


def ranking_table(
    ranking: Ranking, overall: pd.DataFrame, marks: Marks, title: str, *, full: bool = True
) -> Table:
    """Rank, entry, metadata, overall z (± std over seeds), its bootstrap interval (and, in
    the full field, the rank's and whether it is tied with the leader), task means, counts."""
    tasks = ranking.task_names
    boot = ranking.bootstrap.overall.set_index("entry") if ranking.bootstrap else None
    spans = ["95% interval", *(["rank 95%", "vs #1"] if full else [])] if boot is not None else []
    columns = ["rank", "backbone", "size", "family", "method", "data", "params (M)", "overall z",
               *spans, *[f"z {t}" for t in tasks], "tasks", "settings"]  # fmt: skip
    rows = []
    leader = ranking.overall["entry"].iloc[0] if len(ranking.overall) else None
    for r in overall.to_dict(orient="records"):
        spread = r.get("z_seed_std")
        score = _num(r["z"], 2) + ("" if _missing(spread) else f" ± {spread:.2f}")
        rows.append([
            str(r["rank"]), ranking.shown(r["entry"]) + marks.backbone(r["entry"]),
            r["size_class"], _text(r["family"]), _text(r["method"]), _text(r["data"]),
            _num(None if _missing(r["params"]) else r["params"] / 1e6, 1), score,
            *(_spans(boot.loc[r["entry"]], full, leader) if boot is not None else []),
            *[_num(r.get(f"z_{t}"), 2) for t in tasks], str(r["tasks"]), str(r["settings"]),
        ])  # fmt: skip
    entries = list(overall["entry"])
    if any(ranking.shown(e) != e for e in entries):  # display names: keep the results' labels
        columns.insert(2, "results label")
        for row, entry in zip(rows, entries, strict=True):
            row.insert(2, entry)
    return Table(title, columns, rows, anchor=_slug(title))


def _spans(b: pd.Series, full: bool, leader: str | None) -> list[str]:
    cells = [f"[{_num(b['z_low'], 2)}, {_num(b['z_high'], 2)}]"]
    if full:
        rank = f"{b['rank_low']:.0f}–{b['rank_high']:.0f}" if not _missing(b["rank_low"]) else NONE
        tied = "leader" if b.name == leader else ("tied" if b["tied_with_leader"] else "")
        cells += [rank, tied]
    return cells


def pairwise_table(ranking: Ranking, boot: Bootstrap) -> Table:
    """How often the row entry ranks above the column entry over the bootstrap resamples."""
    above = boot.above
    names = list(above.index[:MAX_PAIRWISE])
    rows = [
        [ranking.shown(a), *[NONE if a == b else f"{above.loc[a, b]:.0%}" for b in names]]
        for a in names
    ]
    note = ("Share of resamples in which the row's overall z beats the column's (ties count "
            "half).")  # fmt: skip
    if len(above) > MAX_PAIRWISE:
        note += f" The best {MAX_PAIRWISE} of {len(above)} entries."
    columns = ["above →", *[ranking.shown(b) for b in names]]
    return Table("How often A ranks above B", columns, rows, note=note, anchor="pairwise")


def correlation_table(ranking: Ranking) -> Table:
    """Spearman rho between tasks, with the entries behind each and the permutation p."""
    rho, n, p = ranking.correlations, ranking.correlation_counts, ranking.correlation_p
    rows = [
        [a, *[_rho_cell(rho.loc[a, b], n.loc[a, b], None if a == b else p.loc[a, b])
              for b in rho.columns]]
        for a in rho.index
    ]  # fmt: skip
    return Table("Spearman correlation between tasks", ["task", *rho.columns], rows,
                 note=_few_note(), anchor="correlations")  # fmt: skip


def scale_table(ranking: Ranking) -> Table:
    """Spearman of overall z against parameters and pretraining images."""
    columns = ["against", "family", "backbones", "rho", "p-value", "p from",
               "excluded (unknown)"]  # fmt: skip
    rows = [
        [r["against"], r["family"], str(r["backbones"]) + _few(r["backbones"]),
         _num(r["rho"], 2), _num(r["p_value"], 3), r["p_method"], r["excluded"] or NONE]
        for r in ranking.scale.to_dict(orient="records")
    ]  # fmt: skip
    return Table("Overall z against scale (Spearman)", columns, rows, note=_few_note(),
                 anchor="scale")  # fmt: skip


def _rho_cell(rho: float, n: int, p: float | None) -> str:
    text = f"{_num(rho, 2)} (n={n}"
    if p is not None and not _missing(p):
        text += f", p={p:.3f}"
    return text + ")" + (_few(n) if p is not None else "")


def _few(n: int) -> str:
    return FLAG if 3 <= int(n) < FEW else ""


def _few_note() -> str:
    return (f"p: two-sided permutation test of Spearman's rho (exact over every order up to 8 "
            f"entries). {FLAG}: fewer than {FEW} entries, where no order is significant at "
            "0.05 (the smallest exact p is 2/n!); n/a below 3.")  # fmt: skip


def flagged_table(ranking: Ranking) -> Table:
    """Values below their metric's chance level (an AUROC under 0.5), which the ranking
    still counts."""
    frame = ranking.below_chance
    rows = [
        [ranking.shown(r["entry"]), r["task"], r["dataset"], r["method"], r["setting"],
         r["metric"], f"{r['value']:.4f}"]
        for r in frame.to_dict(orient="records")
    ]  # fmt: skip
    columns = ["backbone", "task", "dataset", "method", "setting", "metric", "value"]
    return Table("Numbers flagged: below chance", columns, rows, anchor="flagged")


def missing_cells(
    ranking: Ranking, excluded: Collection[tuple[str, str, str]] | None = None
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Entry × task × dataset cells without rows, where other entries have some: those
    still to run, and those ``excluded`` names (backbone label, task, dataset: a suite's task
    that leaves the backbone out on purpose)."""
    present = ranking.values[["task", "dataset", "entry"]].drop_duplicates().astype(str)
    if present.empty:
        empty = pd.DataFrame(columns=["backbone", "task", "dataset"])
        return empty, empty.copy()
    order = _entry_order(ranking)
    wanted = (
        present[["task", "dataset"]]
        .drop_duplicates()
        .merge(pd.DataFrame({"entry": order}), how="cross")
    )
    merged = wanted.merge(present, how="left", indicator=True)
    gaps = merged[merged["_merge"] == "left_only"][["entry", "task", "dataset"]]
    gaps = gaps.rename(columns={"entry": "backbone"})
    gaps = gaps.sort_values(["backbone", "task", "dataset"]).reset_index(drop=True)
    skip = set(excluded or ())
    on_purpose = [
        (ranking.info(b).label, t, d) in skip
        for b, t, d in gaps.itertuples(index=False)
    ]  # fmt: skip
    mask = pd.Series(on_purpose, index=gaps.index, dtype=bool)
    return gaps[~mask].reset_index(drop=True), gaps[mask].reset_index(drop=True)


def frame_table(frame: pd.DataFrame, title: str, *, anchor: str = "", note: str = "") -> Table:
    """Any small frame, as text."""
    rows = [[_text(v) for v in r] for r in frame.itertuples(index=False)]
    return Table(title, [str(c) for c in frame.columns], rows, note=note, anchor=anchor)


def provenance_frame(ranking: Ranking) -> pd.DataFrame:
    """Per number shown: the seeds, feature keys, config hashes and source behind it."""
    rows = ranking.primary_rows.astype({"seed": object, "feature_key": str, "config_hash": str})
    rows = rows.rename(columns={"cell": "entry"})
    joined = rows.groupby(CELL_KEYS, sort=True).agg(
        seeds=("seed", _join), feature_keys=("feature_key", _join),
        config_hashes=("config_hash", _join), source=("source", _join),
    )  # fmt: skip
    return joined.reset_index()


def _entry_order(ranking: Ranking) -> list[str]:
    """Ranked entries best first, then unranked entries, then backbones without an entry."""
    ranked = list(ranking.overall["entry"])
    others = sorted(e for e in ranking.entries.get("entry", []) if e not in ranked)
    backbones = set(ranking.entries.get("backbone", []))
    return ranked + others + sorted(b for b in ranking.backbones if b not in backbones)


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
        chance = CHANCE.get(key[-1])
        if chance is not None and row["value"] < chance:
            text += FLAG
    return text + marks.cells.get((*key, label), "")


def _task_mean(ranking: Ranking, label: str, task: str) -> list[str]:
    mine = ranking.tasks[(ranking.tasks["entry"] == label) & (ranking.tasks["task"] == task)]
    if mine.empty:
        return [NONE, NONE, "0"]
    span = NONE
    if ranking.bootstrap is not None:
        b = ranking.bootstrap.tasks
        hit = b[(b["entry"] == label) & (b["task"] == task)]
        if len(hit):
            span = f"[{_num(hit['z_low'].iloc[0], 2)}, {_num(hit['z_high'].iloc[0], 2)}]"
    return [_num(mine["z"].iloc[0], 2), span, str(int(mine["settings"].iloc[0]))]


def _flagged(ranking: Ranking, task: str) -> bool:
    return bool((ranking.below_chance.get("task", pd.Series(dtype=object)) == task).any())


def _chance_text() -> str:
    return ", ".join(f"{m} < {c:g}" for m, c in CHANCE.items())


def _mark(i: int) -> str:
    return MARKS[i] if i < len(MARKS) else f"{MARKS[0]}{i + 1}"


def _missing(value: object) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def format_number(value: object, digits: int) -> str:
    """A table cell: ``value`` to ``digits`` decimals, or a dash when it is missing."""
    return NONE if _missing(value) else f"{float(value):.{digits}f}"  # type: ignore[arg-type]


_num = format_number


def _text(value: object) -> str:
    return NONE if _missing(value) or value == "" else str(value)


def _join(values: pd.Series) -> str:
    return ", ".join(sorted({str(v) for v in values if not _missing(v) and str(v) != ""}))


def _slug(title: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in title.lower()).strip("-")
