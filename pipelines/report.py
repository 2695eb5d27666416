"""The report stage: the results table as a ranked, plotted report (Markdown and HTML).

``build_report`` reads the table, ranks the backbones (:mod:`bob_cache.ranking`), draws the
figures (:mod:`bob_cache.pipelines.report_plots`) and writes into ``out_dir``: ``report.md``
(figures beside it), a self-contained ``report.html`` (figures inlined as data URIs), the
rows as ``results.parquet`` and ``results.csv``, and the PNG figures. Every file is first
written into a hidden staging folder inside ``out_dir`` and renamed into place at the end,
the pages last: a kill or a full disk leaves the previous report (or none), and the same
command writes it whole (the next report removes a killed one's staging folder).

Backbone metadata (family, pretraining method and data, parameters, display name) comes from
the caller, else from the battle's ``backbones-<suite>.json`` beside the results, else from
the backbone registry. Given the suite, cells that its tasks leave out on purpose (a task's
``backbones`` list) are listed as excluded, not as missing.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pandas as pd

from bob_cache.errors import NoResultsError, StoreError
from bob_cache.extras import require
from bob_cache.pipelines.registry import register_stage
from bob_cache.pipelines.report_plots import FIGURES, Plot, draw_plots
from bob_cache.pipelines.report_sections import (
    Section,
    configuration_section,
    missing_section,
    protocol,
    uncertainty_section,
)
from bob_cache.pipelines.report_tables import (
    Marks,
    Table,
    correlation_table,
    flagged_table,
    frame_table,
    missing_cells,
    provenance_frame,
    ranking_table,
    scale_table,
    task_tables,
)
from bob_cache.pipelines.report_transfer import (
    PLOT_PREFIX,
    TransferReport,
    transferability_report,
)
from bob_cache.provenance import utc_now
from bob_cache.ranking import DEFAULT_SIZE_CLASSES, Ranking, list_tasks, rank_backbones
from bob_cache.ranking.metadata import SizeClasses
from bob_cache.stores.atomic import (
    commit_staging,
    crash_point,
    full_disk_is_reported,
    start_staging,
)
from bob_cache.stores.results import ResultsTable

if TYPE_CHECKING:
    from bob_cache.suite import Suite

# Written beside the results by the battle stage (its METADATA_FILE): {slug: metadata}.
SUITE_METADATA = "backbones-{suite}.json"


PAGES = ("results.parquet", "results.csv", "report.md", "report.html")  # renamed last, in order


@dataclass
class ReportSummary:
    """What ``build_report`` wrote and found."""

    out_dir: str
    files: dict[str, str] = field(default_factory=dict)
    rows: int = 0
    imported_rows: int = 0
    sources: list[str] = field(default_factory=list)
    backbones: list[str] = field(default_factory=list)  # best first
    tasks: list[str] = field(default_factory=list)
    top_backbone: str | None = None
    tied_with_top: list[str] = field(default_factory=list)  # bootstrap intervals overlap
    missing_cells: list[dict[str, str]] = field(default_factory=list)
    excluded_cells: list[dict[str, str]] = field(default_factory=list)  # left out by the suite
    suite_checked: bool = False  # whether a suite said which cells are left out on purpose
    skipped_settings: int = 0
    configurations: dict[str, list[str]] = field(default_factory=dict)  # backbone → what differs
    prefer: list[str] = field(default_factory=list)
    chosen: list[dict[str, Any]] = field(default_factory=list)  # what --prefer picked
    stale_rows: int = 0  # rows of an earlier source of a dataset name, left out
    below_chance: int = 0  # values flagged (AUROC < 0.5)
    bootstrap: dict[str, Any] | None = None  # resamples, seed
    transferability: list[dict[str, Any]] = field(default_factory=list)  # agreement rows
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@register_stage("report")
@full_disk_is_reported("the report", "rerun the same command: it writes the report whole")
def build_report(
    results_dir: str | Path | None,
    out_dir: str | Path,
    *,
    metadata: Mapping[str, Any] | None = None,
    suite_name: str | None = None,
    primary_metrics: Mapping[str, str | Sequence[str]] | None = None,
    size_classes: SizeClasses = DEFAULT_SIZE_CLASSES,
    prefer: Sequence[str] = (),
    bootstrap: int | None = None,
    seed: int = 0,
    suite: Suite | None = None,
) -> ReportSummary:
    """Write the report of the results table at ``results_dir`` into ``out_dir``.

    Args:
        results_dir: the results table (default ``bob-results``).
        out_dir: where the report goes (created).
        metadata: backbone label → name, family, method, data, params, label (display);
            None: the battle's metadata file beside the results (``suite_name``'s, or the
            only one). Labels it leaves out take the backbone registry's.
        suite_name: named in the title.
        primary_metrics: task → metric(s) replacing a task's ranked metric.
        size_classes: ``(name, upper bound of parameters)`` pairs, ascending.
        prefer: ``KEY=VALUE`` items picking one configuration where a backbone has several
            (:mod:`bob_cache.ranking.identity`).
        bootstrap: resamples of the ranking's bootstrap (:mod:`bob_cache.ranking.bootstrap`);
            None: 1000 where there are two settings or more; 0: none.
        seed: the bootstrap's seed.
        suite: the battle suite: cells its tasks leave out on purpose are not "missing".

    Raises:
        NoResultsError: the table has no rows.
        RankingOptionError: a ``prefer`` no row matches; a bootstrap with too few
            resamples or settings. Nothing is written then.
    """
    require("report", "The report")
    started = time.perf_counter()
    table = ResultsTable.open(results_dir)
    frame = table.read()
    if frame.empty:
        raise NoResultsError(
            f"No results in '{table.directory}'. Run `bob-cache probe` / `bob-cache battle` "
            "first (or `bob-cache results import FILE.csv`), or pass the results directory."
        )
    if metadata is None:
        metadata, suite_name = find_suite_metadata(table, suite_name)
    ranking = rank_backbones(
        frame, metadata=metadata, primary_metrics=primary_metrics, size_classes=size_classes,
        prefer=prefer, bootstrap=bootstrap, seed=seed,
    )  # fmt: skip
    out = Path(out_dir).expanduser()
    stage = start_staging(out)  # every file is written here, renamed into ``out`` at the end
    excluded = suite_exclusions(suite, metadata or {}) if suite is not None else set()
    summary = _summary(out, frame, ranking, excluded)
    summary.suite_checked = suite is not None
    plots, summary.notes = draw_plots(ranking, stage)
    transfer = transferability_report(ranking, stage, resamples=bootstrap or 1000, seed=seed)
    summary.transferability = _transfer_summary(transfer)
    marks = Marks.from_ranking(ranking)
    context = {
        "title": "bob-cache report" + (f": {suite_name}" if suite_name else ""),
        "generated": utc_now(), "results_dir": str(table.directory),
        "sections": _sections(ranking, marks, summary, plots, transfer),
        "footnotes": marks.footnotes(),
    }  # fmt: skip
    staged = _write(stage, frame, context, [*plots, *transfer.plots])
    crash_point("report-staged")
    summary.files = _commit(stage, out, staged)
    summary.seconds = time.perf_counter() - started
    return summary


def find_suite_metadata(
    table: ResultsTable, suite_name: str | None = None
) -> tuple[dict[str, Any] | None, str | None]:
    """The battle's backbone metadata beside the results: ``suite_name``'s, or the only one
    there; returns it (None when absent or ambiguous) and the suite's name."""
    found = table.files(SUITE_METADATA.format(suite=suite_name or "*"))
    if len(found) != 1:
        return None, suite_name
    name = suite_name or found[0].removeprefix("backbones-").removesuffix(".json")
    try:
        return json.loads(table.read_bytes(found[0]).decode("utf-8")), name
    except (OSError, ValueError) as exc:
        raise StoreError(
            f"Cannot read the backbone metadata '{table.path(found[0])}': {exc}. Rerun the "
            "battle to rewrite it, or delete it (the report then uses the registry's metadata)."
        ) from exc


def suite_exclusions(suite: Suite, metadata: Mapping[str, Any]) -> set[tuple[str, str, str]]:
    """(backbone label, ranked task, dataset) cells that ``suite``'s tasks leave out on
    purpose (a task's ``backbones`` list without the backbone, and no other task of the
    kind running it there). ``metadata`` maps the results' labels to the suite's backbones
    (its ``name`` and ``label``), as the battle writes it."""
    left_out: set[tuple[str, str, str]] = set()
    planned: set[tuple[str, str, str]] = set()
    for task in suite.tasks:
        ranked = [t for t in list_tasks() if t == task.kind or t.startswith(f"{task.kind}-")]
        for dataset in suite.datasets_of(task):
            for label, meta in metadata.items():
                backbone = _suite_backbone(suite, meta)
                if backbone is None:
                    continue
                target = planned if suite.runs_on(task, backbone) else left_out
                target.update((label, t, dataset.name) for t in ranked)
    return left_out - planned


def _suite_backbone(suite: Suite, meta: Any) -> Any:
    get = meta.get if isinstance(meta, Mapping) else lambda k: getattr(meta, k, None)
    same = [b for b in suite.backbones if b.name == get("name")]
    return next((b for b in same if b.display == get("label")), same[0] if same else None)


def _summary(
    out: Path, frame: pd.DataFrame, ranking: Ranking, excluded: Collection[tuple[str, str, str]]
) -> ReportSummary:
    imported = frame[frame["source"].astype(str) != ""]
    gaps, on_purpose = missing_cells(ranking, excluded)
    boot = ranking.bootstrap
    tied = [] if boot is None else list(boot.overall["entry"][boot.overall["tied_with_leader"]])
    configs = ranking.configurations
    return ReportSummary(
        out_dir=str(out), rows=len(frame), imported_rows=len(imported),
        sources=sorted(set(imported["source"])), backbones=list(ranking.overall["entry"]),
        tasks=ranking.task_names,
        top_backbone=None if ranking.overall.empty else str(ranking.overall["entry"].iloc[0]),
        tied_with_top=tied, missing_cells=gaps.to_dict(orient="records"),
        excluded_cells=on_purpose.to_dict(orient="records"),
        skipped_settings=len(ranking.skipped),
        configurations=dict(configs.varying) if configs else {}, prefer=ranking.prefer,
        chosen=list(configs.chosen) if configs else [], stale_rows=len(ranking.stale_rows),
        below_chance=len(ranking.below_chance),
        bootstrap=None if boot is None else {"resamples": boot.resamples, "seed": boot.seed},
    )  # fmt: skip


def _sections(
    ranking: Ranking, marks: Marks, summary: ReportSummary, plots: list[Plot],
    transfer: TransferReport,
) -> list[Section]:  # fmt: skip
    figures = {p.name: {"title": p.title, "file": p.path.name, "uri": _data_uri(p.path)}
               for p in [*plots, *transfer.plots]}  # fmt: skip
    transfer.section.figures = [figures[p.name] for p in transfer.plots]
    ranked = Section("Ranking", "ranking", _headline(ranking, summary))
    ranked.figures = [figures[n] for n in ("ranking",) if n in figures]
    ranked.tables = [ranking_table(ranking, ranking.overall, marks, "Overall ranking")]
    ranked.tables += [
        ranking_table(ranking, part, marks, f"Ranking among {name} backbones", full=False)
        for name, part in ranking.by_size_class().items()
    ]
    tasks = Section("Results per task", "tasks", tables=task_tables(ranking, marks, z=False))
    if not ranking.below_chance.empty:
        tasks.paragraphs.append(
            f"{len(ranking.below_chance)} value(s) lie below their metric's chance level (an "
            "AUROC under 0.5 ranks the OOD set as more in-distribution than the ID set: "
            "often an ill-posed detector fit). They are marked ⚠ and still count in the "
            "z-scores; see the table below."
        )
        tasks.tables.append(flagged_table(ranking))
    zs = Section("z-scores", "z-scores", tables=task_tables(ranking, marks, z=True))
    if not ranking.skipped.empty:
        zs.tables.append(frame_table(ranking.skipped, "Settings left out of the z-scores"))
    corr = Section("Correlation between tasks", "correlations", summary.notes[:])
    corr.figures = [figures[n] for n in ("correlations", "task_scatter") if n in figures]
    corr.tables = [correlation_table(ranking)] if len(ranking.correlations) else []
    scale = Section("Scale", "scale", tables=[scale_table(ranking)])
    return [ranked, uncertainty_section(ranking), tasks, zs, corr, scale, transfer.section,
            configuration_section(ranking), missing_section(ranking, summary),
            Section("Method", "method", protocol(ranking)), _appendix(ranking)]  # fmt: skip


def _transfer_summary(transfer: TransferReport) -> list[dict[str, Any]]:
    if transfer.table is None:
        return []
    keep = ["dataset", "estimator", "outcome", "n_backbones", "spearman", "spearman_p",
            "spearman_low", "spearman_high", "weighted_tau", "verdict"]  # fmt: skip
    rows = transfer.table[keep].astype(object)
    return rows.where(rows.notna(), None).to_dict(orient="records")


def _headline(ranking: Ranking, summary: ReportSummary) -> list[str]:
    if summary.top_backbone is None:
        return ["No backbone could be ranked: no setting of any task has two backbones that "
                "scored differently (see z-scores and Missing results)."]  # fmt: skip
    best = ranking.overall.iloc[0]
    shown = ranking.shown(best["entry"])
    top = shown if shown == best["entry"] else f"{shown} ({best['entry']})"
    lines = [
        f"Top backbone: {top} (overall z {best['z']:.2f} over "
        f"{best['tasks']} task(s), {best['settings']} setting(s)). {len(summary.backbones)} "
        f"entr{'y' if len(summary.backbones) == 1 else 'ies'} ranked on "
        f"{ranking.tasks['task'].nunique()} task(s) from {summary.rows} result rows."
    ]
    if ranking.bootstrap is not None:
        tied = [ranking.shown(e) for e in summary.tied_with_top]
        lines.append(
            f"Tied with it (95% bootstrap intervals of the overall z overlap, "
            f"{ranking.bootstrap.resamples} resamples): {', '.join(tied)}."
            if tied else "No other entry's 95% bootstrap interval of the overall z reaches "
            "the leader's."
        )  # fmt: skip
    if summary.imported_rows:
        lines.append(f"{summary.imported_rows} of the rows were imported; numbers resting on "
                     "them are marked (see the footnotes).")  # fmt: skip
    return lines


def _appendix(ranking: Ranking) -> Section:
    provenance = provenance_frame(ranking)
    table = frame_table(provenance, "Feature keys and configuration hashes behind each number")
    return Section("Appendix: provenance", "appendix", tables=[table], collapsed=True)


def _write(out: Path, frame: pd.DataFrame, context: dict[str, Any], plots: list[Plot]) -> dict:
    import jinja2

    written = {p.name: str(p.path) for p in plots}
    frame.to_parquet(out / "results.parquet", index=False)
    frame.to_csv(out / "results.csv", index=False)
    written |= {"parquet": str(out / "results.parquet"), "csv": str(out / "results.csv")}
    for kind, escape in (("md", False), ("html", True)):
        env = jinja2.Environment(autoescape=escape, keep_trailing_newline=True)
        env.filters["md_table"] = _md_table
        template = env.from_string(_template(f"report.{kind}.j2"))
        (out / f"report.{kind}").write_text(template.render(**context), encoding="utf-8")
        written[kind] = str(out / f"report.{kind}")
    return written


def _commit(stage: Path, out: Path, staged: dict[str, str]) -> dict[str, str]:
    """Rename the staged files into ``out``, the pages last (a kill before them leaves the
    previous report's pages, or none), then delete the figures of an earlier report that
    this one no longer draws. Returns the final paths."""
    commit_staging(stage, out, last=PAGES)
    names = {Path(path).name for path in staged.values()}
    owned = [*(out / f"{name}.png" for name in FIGURES), *out.glob(f"{PLOT_PREFIX}*.png")]
    for path in owned:
        if path.name not in names:
            path.unlink(missing_ok=True)
    return {kind: str(out / Path(path).name) for kind, path in staged.items()}


def _template(name: str) -> str:
    return files("bob_cache.pipelines").joinpath("templates", name).read_text("utf-8")


def _md_table(table: Table) -> str:
    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |"

    return "\n".join(
        [line(table.columns), line(["---"] * len(table.columns)), *map(line, table.rows)]
    )


def _data_uri(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")
