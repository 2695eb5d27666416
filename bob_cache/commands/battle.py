"""The battle family: ``battle SUITE.yaml`` plans, skips what is done, and runs the rest."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from bob_cache.commands.common import (
    EXIT_USER_ERROR,
    JsonOpt,
    ResultsOpt,
    err,
    handle_errors,
    out,
    print_json,
    print_table,
)
from bob_cache.extras import require


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
    as_json: JsonOpt = False,
) -> None:
    """Run a suite of backbones × datasets × tasks; a second run does only what is missing."""
    require("battle", "The battle")
    from bob_cache.pipelines import get_stage
    from bob_cache.pipelines.battle import BattleConfig

    def show_plan(plan: Any) -> None:
        if as_json:
            return
        rows = [{**j.to_dict(), "state": "done" if j.done else "to do"} for j in plan.jobs]
        title = f"battle {plan.suite}: {len(plan.todo)} of {len(plan.jobs)} job(s) to run"
        print_table(rows, ("kind", "dataset", "backbone", "detail", "state"), title=title)
        if not plan.todo:
            out.print("Nothing to do: every job is in the store and the results table.")

    def show_done(job: Any, outcome: Any) -> None:
        if as_json:
            return
        mark = {"done": "[green]✓[/]", "failed": "[bold red]✗[/]"}.get(outcome.status, "·")
        line = f"{mark} {job.kind} {job.dataset} × {job.backbone}"
        if outcome.status == "done":
            err.print(f"{line} ({outcome.seconds:.1f} s)", highlight=False)
        else:
            err.print(f"{line}: {outcome.status}: {outcome.error}", highlight=False)

    config = BattleConfig(
        suite=suite, store=store, results=results, dry_run=dry_run, scheduler=scheduler,
        workers=workers, device=device, threads=threads, on_plan=show_plan, on_done=show_done,
    )  # fmt: skip
    summary = get_stage("battle")(config)
    if as_json:
        print_json(summary.to_dict())
    elif not dry_run and summary.outcomes:
        ran = len(summary.outcomes) - len(summary.failed)
        out.print(
            f"Battle {summary.suite}: {ran} job(s) ran, {len(summary.failed)} failed or not "
            f"run, {summary.already_done} already done ({summary.seconds:.1f} s). Results: "
            f"{summary.results}; report: `bob-cache report {summary.results} --out DIR`.",
            highlight=False,
        )
    if summary.failed:
        if not as_json:
            err.print(f"{len(summary.failed)} job(s) did not finish:")
            for o in summary.failed:
                err.print(f"  {o['job']}: {o['status']}: {o['error']}", highlight=False)
        raise typer.Exit(EXIT_USER_ERROR)


def register(app: typer.Typer) -> None:
    """Add the battle family's commands to ``app``."""
    app.command(epilog="Example: bob-cache battle suites/demo.yaml --dry-run")(battle)
