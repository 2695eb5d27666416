"""The battle family: ``battle SUITE.yaml`` plans, skips what is done, and runs the rest.

On a terminal a live view shows each running job (count, images/s and ETA while it extracts,
its stage otherwise); with ``--quiet`` or off a terminal, one line per finished job. Failed
jobs get one line each (their error names the fix); their tracebacks go to the log file the
summary names. Ctrl-C stops the jobs and prints the command that resumes.
"""

from __future__ import annotations

import shlex
from contextlib import nullcontext
from typing import Annotated, Any

import typer
from rich.markup import escape

from bob_cache.commands.common import (
    EXIT_INTERRUPTED,
    EXIT_USER_ERROR,
    JsonOpt,
    QuietOpt,
    ResultsOpt,
    err,
    handle_errors,
    out,
    print_json,
    print_table,
)
from bob_cache.extras import require

MARKS = {"done": "[green]✓[/]", "failed": "[bold red]✗[/]"}


@handle_errors
def battle(
    suite: Annotated[str, typer.Argument(help="Suite file (YAML): backbones, datasets, tasks.")],
    store: Annotated[
        str | None,
        typer.Option(
            envvar="BOB_CACHE_STORE",
            help="Feature store (default: the suite's `store`, else bob-store).",
        ),
    ] = None,
    results: ResultsOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Print the plan and what is done; run nothing.")
    ] = False,
    scheduler: Annotated[
        str | None,
        typer.Option(help="A running Dask scheduler (tcp://HOST:PORT); default: run locally."),
    ] = None,
    workers: Annotated[
        int | None,
        typer.Option(
            help="Local Dask worker processes sharing the cores (default: one "
            "in-process worker, jobs one after another).",
            min=1,
        ),
    ] = None,
    device: Annotated[
        str | None, typer.Option(help="Override the suite's device (auto, cpu, cuda).")
    ] = None,
    threads: Annotated[
        int | None,
        typer.Option(
            help="Torch threads per job (default: the cores shared by the workers).", min=1
        ),
    ] = None,
    quiet: QuietOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Run a suite of backbones × datasets × tasks; a second run does only what is missing."""
    require("battle", "The battle")
    from bob_cache.pipelines import get_stage
    from bob_cache.pipelines.battle import BattleConfig
    from bob_cache.progress import JobsView

    live = err.is_terminal and not (quiet or as_json or dry_run)
    view = JobsView(err) if live else None
    console = _BattleConsole(view, as_json=as_json)
    command = _command_line(suite, {"store": store, "results": results, "scheduler": scheduler,
                                    "workers": workers, "device": device, "threads": threads,
                                    "quiet": quiet, "json": as_json})  # fmt: skip
    config = BattleConfig(
        suite=suite, store=store, results=results, dry_run=dry_run, scheduler=scheduler,
        workers=workers, device=device, threads=threads, on_plan=console.show_plan,
        on_done=console.show_done, on_progress=console.show_progress if view else None,
        command=command,
    )  # fmt: skip
    try:
        with view or nullcontext():
            summary = get_stage("battle")(config)
    except KeyboardInterrupt:
        err.print(
            "Interrupted. Finished jobs are kept (and an extraction's committed shards): "
            f"rerun `{command}` to run the rest; it skips what is done.",
            markup=False, highlight=False, soft_wrap=True,
        )  # fmt: skip
        raise typer.Exit(EXIT_INTERRUPTED) from None
    if as_json:
        print_json(summary.to_dict())
    elif not dry_run and summary.outcomes:
        _print_summary(summary)
    if summary.failed:
        raise typer.Exit(EXIT_USER_ERROR)


class _BattleConsole:
    """What the battle prints as it goes: the plan, each finished job, the live view."""

    def __init__(self, view: Any, *, as_json: bool) -> None:
        self.view, self.as_json = view, as_json
        self.labels: dict[str, str] = {}

    def show_plan(self, plan: Any) -> None:
        self.labels = {j.id: f"{j.kind} {j.dataset} × {j.backbone}" for j in plan.jobs}
        if self.as_json:
            return
        rows = [{**j.to_dict(), "state": "done" if j.done else "to do"} for j in plan.jobs]
        title = f"battle {plan.suite}: {len(plan.todo)} of {len(plan.jobs)} job(s) to run"
        print_table(rows, ("kind", "dataset", "backbone", "detail", "state"), title=title)
        for name, split in plan.splits.items():  # the rows each task sees, and how they were split
            counts = ", ".join(f"{k} {n}" for k, n in split["rows"].items())
            out.print(f"{name}: {counts} ({split['rule']})", markup=False, highlight=False)
        if not plan.todo:
            out.print("Nothing to do: every job is in the store and the results table.")

    def show_done(self, job: Any, outcome: Any) -> None:
        """One line per finished job: its time, or why it did not finish."""
        if self.view:
            self.view.ended(job.id)
        if self.as_json:
            return
        line = f"{MARKS.get(outcome.status, '·')} {escape(self.labels.get(job.id, job.id))}"
        if outcome.status == "done":
            line += " (done by another battle)" if outcome.joined else f" ({outcome.seconds:.1f} s)"
        else:
            line += f": {outcome.status}: {escape(outcome.error)}"
        err.print(line, highlight=False, soft_wrap=True)

    def show_progress(self, job: str, event: dict[str, Any]) -> None:
        """A job's progress event (from the Dask client's thread) on the live view."""
        label = self.labels.get(job, job)
        if "stage" in event:
            self.view.started(job, label, event["stage"])
        else:
            self.view.advance(job, label, event["desc"], event["n"], event["total"])


def _print_summary(summary: Any) -> None:
    failed = len(summary.failed)
    out.print(
        f"Battle {summary.suite}: {len(summary.outcomes) - failed} job(s) ran, {failed} failed "
        f"or not run, {summary.already_done} already done ({summary.seconds:.1f} s). Results: "
        f"{summary.results}; report: `bob-cache report {summary.results} --out DIR`.",
        highlight=False, markup=False, soft_wrap=True,
    )  # fmt: skip
    if failed:
        err.print(
            f"{failed} job(s) did not finish (the ✗ lines above say why); their tracebacks: "
            f"{summary.log}",
            highlight=False, markup=False, soft_wrap=True,
        )  # fmt: skip


def _command_line(suite: str, options: dict[str, Any]) -> str:
    """This battle's command line (for the rerun hint and the log): ``options`` by flag."""
    words = ["bob-cache", "battle", suite]
    for name, value in options.items():
        if value is not None and value is not False:
            flag = f"--{name.replace('_', '-')}"
            words += [flag] if value is True else [flag, str(value)]
    return shlex.join(words)


def register(app: typer.Typer) -> None:
    """Add the battle family's commands to ``app``."""
    app.command(epilog="Example: bob-cache battle suites/demo.yaml --dry-run")(battle)
