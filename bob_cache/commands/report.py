"""The report family: ``results`` (show the table), ``results import`` (add external rows)
and ``report`` (the ranked, plotted report)."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any

import click
import typer
from typer.core import TyperGroup

from bob_cache.commands.common import (
    JsonOpt,
    ResultsOpt,
    err,
    handle_errors,
    out,
    print_json,
    print_table,
)
from bob_cache.extras import require

ResultsArg = Annotated[
    str | None, typer.Argument(envvar="BOB_CACHE_RESULTS", help="Results directory.")
]


class ResultsGroup(TyperGroup):
    """``results [DIR]`` shows the table; ``results import ...`` runs the subcommand.

    Click would read a leading subcommand name as the group's DIR argument; so when the first
    argument names a subcommand, the group's own parameters are parsed from nothing. Options
    may follow DIR (``results DIR --long``), as they could before ``results`` was a group.
    """

    allow_interspersed_args = True

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] in self.commands:
            return super().parse_args(ctx, ["--", "", *args])  # DIR="" (unused), then the rest
        return super().parse_args(ctx, args)


@handle_errors
def results(
    ctx: typer.Context,
    directory: ResultsArg = None,
    dataset: Annotated[str | None, typer.Option(help="Only this dataset.")] = None,
    backbone: Annotated[str | None, typer.Option(help="Only this backbone label.")] = None,
    method: Annotated[
        str | None, typer.Option(help="Only this method (linear, knn@20, ...).")
    ] = None,
    metric: Annotated[str | None, typer.Option(help="Only these metrics, comma-separated.")] = None,
    long: Annotated[
        bool, typer.Option("--long", help="Print raw long-format rows instead of the pivot.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Show the results table, filtered, as mean ± std over seeds (or import rows into it).

    Rows that differ by more than their seed (another layer, pooling, kNN temperature,
    split or source) are never averaged: each configuration gets its own line.
    """
    if ctx.invoked_subcommand is not None:
        return
    from bob_cache.stores.results import ResultsTable, summarize

    table = ResultsTable.open(directory)
    frame = table.read(dataset=dataset, backbone=backbone, method=method)
    metrics = [m.strip() for m in metric.split(",")] if metric else None
    if metrics and not long:
        frame = frame[frame["metric"].isin(metrics)]
    shown = frame if long else summarize(frame, metrics=metrics)
    records = _records(shown)
    if as_json:
        print_json(records)
    elif not records:
        out.print(f"No results in '{table.directory}' match. Run `bob-cache probe` first.")
    else:
        print_table(records, list(shown.columns))


class ImportFormat(str, Enum):
    rows = "rows"
    timm = "timm"


@handle_errors
def import_results(
    file: Annotated[
        str,
        typer.Argument(
            help="CSV of rows: dataset, backbone, method, "
            "setting, metric, value[, seed, split, ...]; or timm's results-<set>.csv."
        ),
    ],
    results: ResultsOpt = None,
    source: Annotated[
        str | None,
        typer.Option(help="Where the rows come from (a paper, a tool); fills empty source cells."),
    ] = None,
    fmt: Annotated[
        ImportFormat,
        typer.Option(
            "--format",
            help="rows: bob-cache's own columns; timm: a timm results table as distributed "
            "(model, top1, top5, param_count, img_size, ...).",
        ),
    ] = ImportFormat.rows,
    dataset: Annotated[
        str, typer.Option(help="timm: the ID dataset's name in your results (ImageNet).")
    ] = "imagenet",
    eval_set: Annotated[
        str | None,
        typer.Option("--set", help="timm: the evaluated set (default: from results-<set>.csv)."),
    ] = None,
    all_models: Annotated[
        bool,
        typer.Option(
            "--all", help="timm: every model, not only registry entries and backbones present."
        ),
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Import results rows from elsewhere (a CSV); they stay marked with their source."""
    from bob_cache.stores.results_import import import_results as run_import

    if fmt is ImportFormat.timm:
        _import_timm(file, results, source, dataset, eval_set, all_models, as_json)
        return
    summary = run_import(file, results=results, source=source)
    if as_json:
        print_json(summary.to_dict())
        return
    s = summary
    out.print(
        f"Imported {s.added} of {s.rows} row(s) from {s.file} into {s.results} "
        f"(source: {', '.join(s.sources)}).",
        highlight=False,
    )
    if s.already_imported:
        err.print(f"  note: {s.already_imported} row(s) were already imported; skipped")
    if s.unknown_metrics:
        err.print(f"  note: metrics bob-cache does not compute: {', '.join(s.unknown_metrics)}")
    if s.ignored_columns:
        err.print(f"  note: columns ignored: {', '.join(s.ignored_columns)}")


def _import_timm(
    file: str,
    results: str | None,
    source: str | None,
    dataset: str,
    eval_set: str | None,
    all_models: bool,
    as_json: bool,
) -> None:
    from bob_cache.stores.timm_results import SHOWN, import_timm_results

    s = import_timm_results(file, results=results, source=source, dataset=dataset,
                            eval_set=eval_set, all_models=all_models)  # fmt: skip
    if as_json:
        print_json(s.to_dict())
        return
    out.print(
        f"Imported {s.added} of {s.rows} row(s) ({s.models} model(s), {s.set} as {s.stage} "
        f"{s.dataset} · {s.setting}) from {s.file} into {s.results} (source: {s.source}).",
        highlight=False,
    )
    if s.already_imported:
        err.print(f"  note: {s.already_imported} row(s) were already imported; skipped")
    err.print(f"  {len(s.registry)} model(s) map to registry entries", highlight=False)
    if s.not_imported:
        names = ", ".join(s.not_imported[:SHOWN]) + (" ..." if len(s.not_imported) > SHOWN else "")
        err.print(
            f"  not imported: {len(s.not_imported)} model(s) with no registry entry and no rows "
            f"in the table ({names}); --all imports them",
            highlight=False,
        )


@handle_errors
def report(
    directory: ResultsArg = None,
    out_dir: Annotated[str, typer.Option("--out", help="Folder the report is written to.")] = (
        "bob-report"
    ),
    suite: Annotated[
        str | None,
        typer.Option(
            help="Battle suite file: names the report, picks its backbone metadata, and tells "
            "cells its tasks leave out on purpose from missing ones."
        ),
    ] = None,
    prefer: Annotated[
        list[str] | None,
        typer.Option(
            "--prefer",
            metavar="KEY=VALUE",
            help="Where a backbone ran under several configurations in one setting (another "
            "layer, pooling, kNN temperature), rank only the one with KEY=VALUE (e.g. "
            "layer=layer3); repeatable. Without it each configuration is its own entry.",
        ),
    ] = None,
    bootstrap: Annotated[
        int | None,
        typer.Option(
            "--bootstrap",
            metavar="N",
            help="Bootstrap resamples over the settings (and seeds) behind each task, for 95% "
            "intervals of every z and rank [default: 1000 when there are two settings or "
            "more; 0: none].",
        ),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="The bootstrap's random seed.")] = 0,
    as_json: JsonOpt = False,
) -> None:
    """Rank the backbones of a results table and write report.md, report.html and plots."""
    from bob_cache.pipelines.report import build_report

    loaded = _suite(suite)
    summary = build_report(
        directory or (loaded.model.results if loaded else None), out_dir,
        suite_name=loaded.name if loaded else None, prefer=prefer or (), bootstrap=bootstrap,
        seed=seed, suite=loaded,
    )  # fmt: skip
    if as_json:
        print_json(summary.to_dict())
        return
    _print_report(summary)


def _print_report(s: Any) -> None:
    top = f"top backbone {s.top_backbone}" if s.top_backbone else "no backbone could be ranked"
    out.print(
        f"Report of {s.rows} row(s) ({len(s.backbones)} ranked entr"
        f"{'y' if len(s.backbones) == 1 else 'ies'}, {len(s.tasks)} task(s)): {top}. "
        f"Wrote {s.files['html']} and {s.files['md']} ({s.seconds:.1f} s).",
        highlight=False,
    )
    if s.bootstrap:
        tied = ", ".join(s.tied_with_top) or "none"
        err.print(f"  note: {s.bootstrap['resamples']} bootstrap resamples (seed "
                  f"{s.bootstrap['seed']}); tied with the top: {tied}")  # fmt: skip
    for backbone, keys in s.configurations.items():
        err.print(f"  note: {backbone} ran under several configurations (differing in "
                  f"{', '.join(keys)}): each is ranked apart; --prefer KEY=VALUE picks "
                  "one")  # fmt: skip
    if s.stale_rows:
        err.print(f"  note: {s.stale_rows} row(s) of an earlier source of a dataset name are "
                  "left out; the report lists them")  # fmt: skip
    if s.missing_cells:
        err.print(f"  note: {len(s.missing_cells)} entry × task × dataset cell(s) have no "
                  "rows; the report lists them")  # fmt: skip
    if s.below_chance:
        err.print(f"  note: {s.below_chance} value(s) below chance (AUROC < 0.5) are flagged")
    for note in s.notes:
        err.print(f"  note: {note}")


def _suite(path: str | None) -> Any:
    """The loaded suite (its name finds its metadata file beside the results), or None."""
    if path is None:
        return None
    require("battle", "Reading a battle suite (--suite)")
    from bob_cache.pipelines.battle import load_battle_suite

    return load_battle_suite(path)


def _records(frame: Any) -> list[dict[str, Any]]:
    """Rows as dicts with None (not NaN) where a value is missing, so JSON stays valid."""
    return frame.astype(object).where(frame.notna(), None).to_dict(orient="records")


def register(app: typer.Typer) -> None:
    """Add the report family's commands (and the ``results`` group) to ``app``."""
    results_app = typer.Typer(cls=ResultsGroup, invoke_without_command=True)
    results_app.callback(
        epilog="Example: bob-cache results ./bob-results --dataset digits --metric top1"
    )(results)
    results_app.command(
        "import",
        epilog="Example: bob-cache results import bob-paper.csv --source 'Goldblum et al. 2023'"
        "  ·  bob-cache results import --format timm results-imagenet-r.csv",
    )(import_results)
    app.add_typer(results_app, name="results")
    app.command(
        epilog="Example: bob-cache report ./bob-results --out ./bob-report --suite suite.yaml "
        "--bootstrap 1000 --seed 0 --prefer layer=final"
    )(report)
