"""The battle stage: a suite of backbones × datasets × tasks, planned against what the store
and the results table already hold, and run on Dask.

``battle(config)`` loads and checks the suite (every problem at once), plans every job,
skips the done ones, runs the rest (extraction first, each task after its extraction), and
records the backbones' display metadata beside the results for the report. The tracebacks
of jobs that did not finish go to a log file beside the results (:mod:`.failures`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bob_cache.pipelines.battle.claims import JOB_CLAIMS
from bob_cache.pipelines.battle.execute import Outcome, ProgressHandler, execute
from bob_cache.pipelines.battle.failures import FailureLog, new_run_id
from bob_cache.pipelines.battle.plan import Job, Plan, plan_battle, store_exists
from bob_cache.pipelines.battle.tasks import TaskKind, list_tasks, register_battle_task
from bob_cache.pipelines.cluster import dask_client
from bob_cache.pipelines.registry import register_stage
from bob_cache.stores.claims import release_held
from bob_cache.stores.results import DEFAULT_RESULTS
from bob_cache.suite import BackboneSpec, Suite, load_suite

__all__ = [
    "BattleConfig",
    "BattleSummary",
    "Job",
    "Plan",
    "TaskKind",
    "battle",
    "load_battle_suite",
    "register_battle_task",
]
DEFAULT_STORE = "bob-store"
METADATA_FILE = "backbones-{suite}.json"


@dataclass
class BattleConfig:
    """Options of ``bob-cache battle``."""

    suite: str
    store: str | None = None
    results: str | None = None
    dry_run: bool = False
    scheduler: str | None = None
    workers: int | None = None
    device: str | None = None
    threads: int | None = None
    on_plan: Callable[[Plan], None] | None = None
    on_done: Callable[[Job, Outcome], None] | None = None
    on_progress: ProgressHandler | None = None  # (job id, event): see execute's docstring
    command: str = ""  # how the battle was started, for the failure log


@dataclass
class BattleSummary:
    """What the battle planned and how each job ended."""

    suite: str
    store: str
    results: str
    jobs: list[dict[str, Any]] = field(default_factory=list)
    splits: dict[str, dict[str, Any]] = field(default_factory=dict)  # per extracted dataset
    outcomes: list[dict[str, Any]] = field(default_factory=list)
    already_done: int = 0
    seconds: float = 0.0
    run_id: str = ""
    log: str | None = None  # the failure log (tracebacks of the jobs that did not finish)

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [o for o in self.outcomes if o["status"] != "done"]

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "failed": self.failed}


def load_battle_suite(path: str | Path) -> Suite:
    """Load a suite checked against the registered task kinds and backbone names."""
    checkers = {name: kind.check for name, kind in list_tasks().items()}
    return load_suite(path, task_kinds=checkers, check_backbone=_check_backbone)


@register_stage("battle")
def battle(config: BattleConfig) -> BattleSummary:
    """Plan the suite, run what is not done, and say how every job ended."""
    started = time.perf_counter()
    suite = load_battle_suite(config.suite)
    store = config.store or suite.model.store or DEFAULT_STORE
    results = config.results or suite.model.results or DEFAULT_RESULTS
    plan = plan_battle(suite, store=store, results=results, device=config.device)
    summary = BattleSummary(
        suite.name, store, results, jobs=[j.to_dict() for j in plan.jobs], splits=plan.splits
    )
    summary.already_done = len(plan.jobs) - len(plan.todo)
    if config.on_plan:
        config.on_plan(plan)
    if plan.todo and not config.dry_run:
        summary.run_id = new_run_id()
        log = FailureLog(results, suite=suite.name, run_id=summary.run_id, command=config.command)
        outcomes = _run(plan, config, log)
        summary.outcomes = [outcomes[j.id].to_dict() for j in plan.todo if j.id in outcomes]
        summary.log = log.path
    if not config.dry_run:
        write_metadata(suite, store, results)
    summary.seconds = time.perf_counter() - started
    return summary


def _run(plan: Plan, config: BattleConfig, log: FailureLog) -> dict[str, Outcome]:
    """Run the plan's jobs on the configured cluster; failures are logged as they come."""

    def done(job: Job, outcome: Outcome) -> None:
        log.add_outcome(outcome)
        if config.on_done:
            config.on_done(job, outcome)

    gpus = sum(1 for j in plan.todo if j.gpu) and _local_gpus()
    try:
        with dask_client(scheduler=config.scheduler, workers=config.workers, gpus=gpus) as client:
            return execute(plan, client, threads=config.threads, on_done=done,
                           on_progress=config.on_progress)  # fmt: skip
    except KeyboardInterrupt:  # this process's job claims go now, not when its jobs stop
        release_held(JOB_CLAIMS)
        raise


def backbone_metadata(backbone: BackboneSpec) -> dict[str, Any]:
    """Display metadata: the suite's values, filled from the registry where it knows them.

    A random-init backbone's method is ``random init`` and it has no pretraining data (null;
    the registry's describe the pretrained weights); a parameter count neither gives is counted
    from the architecture, built without weights on the meta device (never downloaded).
    """
    from bob_cache.backbones.params import count_params
    from bob_cache.backbones.registry import get_backbone_entry
    from bob_cache.ranking.metadata import RANDOM_INIT

    entry = get_backbone_entry(backbone.name)
    known = entry.to_dict() if entry else {}
    if backbone.random_init:
        known.update(method=RANDOM_INIT, data=None)
    meta = {
        "label": backbone.display, "name": backbone.name,
        **{k: getattr(backbone, k) if getattr(backbone, k) is not None else known.get(k)
           for k in ("family", "method", "data", "params")},
    }  # fmt: skip
    if backbone.random_init:
        meta["data"] = None  # `data: none` in the suite says the same
    if meta["params"] is None:
        meta["params"] = count_params(backbone.name, image_size=backbone.image_size)
    return meta


def write_metadata(suite: Suite, store: str, results: str) -> str | None:
    """``{backbone slug: metadata}`` for every backbone extracted so far, beside the results
    (the report reads it to label, size and colour the backbones)."""
    from bob_cache.stores import open_store
    from bob_cache.stores.results import ResultsTable

    if not store_exists(store):
        return None
    names = {d.name for d in suite.datasets}
    mapping: dict[str, dict[str, Any]] = {}
    for fs in open_store(store).feature_sets():
        b = fs.attrs.get("backbone", {})
        if fs.attrs["dataset"]["name"] not in names or b.get("slug") in mapping:
            continue
        spec = _suite_backbone_of(suite, b)
        if spec is not None:
            mapping[b["slug"]] = backbone_metadata(spec)
    table = ResultsTable.open(results)
    name = METADATA_FILE.format(suite=suite.name)
    table.write_bytes(name, json.dumps(mapping, indent=2, sort_keys=True).encode())
    return table.path(name)


def _suite_backbone_of(suite: Suite, attrs: dict[str, Any]) -> BackboneSpec | None:
    """The suite backbone a feature set's backbone attrs came from: same name, and for random
    init the same seed (two seeds of one architecture are two backbones with two labels)."""
    weights = attrs.get("weights") or {}
    random = weights.get("kind") == "random"
    same = [b for b in suite.backbones if b.name == attrs.get("name")]
    exact = [b for b in same if b.random_init == random
             and (not random or b.seed == weights.get("seed"))]  # fmt: skip
    return (exact or same or [None])[0]


def _check_backbone(backbone: BackboneSpec) -> str | None:
    from bob_cache.backbones.factory import resolve_backbone_name
    from bob_cache.errors import BackboneUnavailableError, UnknownBackboneError

    try:
        resolve_backbone_name(backbone.name)
    except UnknownBackboneError as exc:
        return str(exc)
    except BackboneUnavailableError as exc:
        return None if backbone.weights else str(exc)
    if backbone.weights and backbone.random_init:
        return "weights and random_init exclude each other"
    if backbone.weights and "${" not in backbone.weights and not Path(backbone.weights).is_file():
        return f"weights file '{backbone.weights}' does not exist"
    return None


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0
