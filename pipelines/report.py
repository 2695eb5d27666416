"""The report stage: the results table as a ranked, plotted report (Markdown and HTML).

``build_report`` reads the table, ranks the backbones (:mod:`bob_cache.ranking`), draws the
figures (:mod:`bob_cache.pipelines.report_plots`) and writes into ``out_dir``: ``report.md``
(figures beside it), a self-contained ``report.html`` (figures inlined as data URIs), the
rows as ``results.parquet`` and ``results.csv``, and the PNG figures.

Backbone metadata (family, pretraining method and data, parameters, display name) comes from
the caller, else from the battle's ``backbones-<suite>.json`` beside the results, else from
the backbone registry.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any

import pandas as pd

from bob_cache.errors import NoResultsError, StoreError
from bob_cache.extras import require
from bob_cache.pipelines.registry import register_stage
from bob_cache.pipelines.report_plots import Plot, draw_plots
from bob_cache.pipelines.report_tables import (
    Marks,
    Table,
    correlation_table,
    frame_table,
    missing_cells,
    provenance_frame,
    ranking_table,
    scale_table,
    task_tables,
)
from bob_cache.provenance import utc_now
from bob_cache.ranking import DEFAULT_SIZE_CLASSES, Ranking, rank_backbones
from bob_cache.ranking.metadata import SizeClasses
from bob_cache.stores.results import ResultsTable

# Written beside the results by the battle stage (its METADATA_FILE): {slug: metadata}.
SUITE_METADATA = "backbones-{suite}.json"


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
    missing_cells: list[dict[str, str]] = field(default_factory=list)
    skipped_settings: int = 0
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Section:
    """One heading of the report."""

    title: str
    anchor: str
    paragraphs: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[dict[str, str]] = field(default_factory=list)
    collapsed: bool = False


@register_stage("report")
def build_report(
    results_dir: str | Path | None,
    out_dir: str | Path,
    *,
    metadata: Mapping[str, Any] | None = None,
    suite_name: str | None = None,
    primary_metrics: Mapping[str, str | Sequence[str]] | None = None,
    size_classes: SizeClasses = DEFAULT_SIZE_CLASSES,
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

    Raises:
        NoResultsError: the table has no rows.
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
    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    if metadata is None:
        metadata, suite_name = find_suite_metadata(table, suite_name)
    ranking = rank_backbones(
        frame, metadata=metadata, primary_metrics=primary_metrics, size_classes=size_classes
    )
    summary = _summary(out, frame, ranking)
    plots, summary.notes = draw_plots(ranking, out)
    marks = Marks.from_rows(ranking.rows)
    context = {
        "title": "bob-cache report" + (f": {suite_name}" if suite_name else ""),
        "generated": utc_now(), "results_dir": str(table.directory),
        "sections": _sections(ranking, marks, summary, plots), "footnotes": marks.footnotes(),
    }  # fmt: skip
    summary.files = _write(out, frame, context, plots)
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


def _summary(out: Path, frame: pd.DataFrame, ranking: Ranking) -> ReportSummary:
    imported = frame[frame["source"].astype(str) != ""]
    gaps = missing_cells(ranking)
    return ReportSummary(
        out_dir=str(out), rows=len(frame), imported_rows=len(imported),
        sources=sorted(set(imported["source"])), backbones=list(ranking.overall["backbone"]),
        tasks=ranking.task_names,
        top_backbone=None if ranking.overall.empty else str(ranking.overall["backbone"].iloc[0]),
        missing_cells=gaps.to_dict(orient="records"), skipped_settings=len(ranking.skipped),
    )  # fmt: skip


def _sections(
    ranking: Ranking, marks: Marks, summary: ReportSummary, plots: list[Plot]
) -> list[Section]:
    figures = {p.name: {"title": p.title, "file": p.path.name, "uri": _data_uri(p.path)}
               for p in plots}  # fmt: skip
    ranked = Section("Ranking", "ranking", _headline(ranking, summary))
    ranked.figures = [figures[n] for n in ("ranking",) if n in figures]
    ranked.tables = [ranking_table(ranking, ranking.overall, marks, "Overall ranking")]
    ranked.tables += [
        ranking_table(ranking, part, marks, f"Ranking among {name} backbones")
        for name, part in ranking.by_size_class().items()
    ]
    tasks = Section("Results per task", "tasks", tables=task_tables(ranking, marks, z=False))
    zs = Section("z-scores", "z-scores", tables=task_tables(ranking, marks, z=True))
    if not ranking.skipped.empty:
        zs.tables.append(frame_table(ranking.skipped, "Settings left out of the z-scores"))
    corr = Section("Correlation between tasks", "correlations", summary.notes[:])
    corr.figures = [figures[n] for n in ("correlations", "task_scatter") if n in figures]
    corr.tables = [correlation_table(ranking)] if len(ranking.correlations) else []
    scale = Section("Scale", "scale", tables=[scale_table(ranking)])
    return [ranked, tasks, zs, corr, scale, _missing_section(ranking, summary),
            Section("Method", "method", _protocol(ranking)), _appendix(ranking)]  # fmt: skip


def _headline(ranking: Ranking, summary: ReportSummary) -> list[str]:
    if summary.top_backbone is None:
        return ["No backbone could be ranked: no setting of any task has two backbones that "
                "scored differently (see z-scores and Missing results)."]  # fmt: skip
    best = ranking.overall.iloc[0]
    info = ranking.backbones[best["backbone"]]
    top = info.shown if info.shown == info.label else f"{info.shown} ({info.label})"
    lines = [
        f"Top backbone: {top} (overall z {best['z']:.2f} over "
        f"{best['tasks']} task(s), {best['settings']} setting(s)). {len(summary.backbones)} "
        f"backbone(s) ranked on {ranking.tasks['task'].nunique()} task(s) from {summary.rows} "
        "result rows."
    ]
    if summary.imported_rows:
        lines.append(f"{summary.imported_rows} of the rows were imported; numbers resting on "
                     "them are marked (see the footnotes).")  # fmt: skip
    return lines


def _missing_section(ranking: Ranking, summary: ReportSummary) -> Section:
    section = Section("Missing results", "missing")
    gaps = pd.DataFrame(summary.missing_cells, columns=["backbone", "task", "dataset"])
    if gaps.empty:
        section.paragraphs.append("Every backbone has rows for every task and dataset present.")
    else:
        section.paragraphs.append(
            f"{len(gaps)} backbone × task × dataset cell(s) have no rows, so those backbones' "
            "task means rest on fewer settings. Run the missing evaluations to fill them."
        )
        section.tables.append(frame_table(gaps, "Cells without rows", anchor="missing-cells"))
    if not ranking.unassigned.empty:
        kinds = ranking.unassigned.groupby(["stage", "method", "setting"]).size()
        section.paragraphs.append(
            f"{len(ranking.unassigned)} row(s) belong to no task and are not ranked: "
            + "; ".join(f"{s}/{m}/{t} ({n})" for (s, m, t), n in kinds.items())
        )
    return section


def _protocol(ranking: Ranking) -> list[str]:
    metrics = sorted({f"{t}: {m}" for (_, t), m in ranking.primary_metrics.items()})
    bounds = "".join(f"{name} < {bound / 1e6:g}M ≤ " for name, bound in ranking.size_classes[:-1])
    return [
        "Tasks: linear = probe, method linear, setting full; few-shot = probe settings K-shot "
        "or F-fraction (any method); knn = method knn@k, setting full; retrieval = stage "
        "retrieval. A row's own task wins. The latest run of each configuration counts.",
        f"Ranked metric per task: {', '.join(metrics) or 'none'}.",
        "A setting is (dataset, task, method, setting, metric). A backbone's value there is "
        "the mean over its seeds; its z-score is (value − mean) / std over the backbones "
        "present in that setting, with the population std (ddof 0, as BoB and "
        "scipy.stats.zscore). Settings with fewer than two backbones or zero std are left "
        f"out ({len(ranking.skipped)} here).",
        "A backbone's task score is the mean z over the task's settings (all datasets, "
        "methods and settings alike); its overall score is the mean of its task scores, so "
        "every task weighs the same. ± on the overall z is its std (ddof 1) when each seed is "
        "scored alone (settings run once count the same for every seed).",
        f"Size classes by parameters: {bounds}{ranking.size_classes[-1][0]}. "
        "Correlations are Spearman's over the backbones that have both values (n/a below 3).",
    ]


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
