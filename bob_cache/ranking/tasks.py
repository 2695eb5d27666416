"""Which task a results row belongs to, and which metric ranks each task.

A task kind registers a rule (a vectorised test over result rows) and its primary metrics
(the first of them that a dataset reports is the one ranked). Rules are tried in
registration order; a row's own non-empty ``task`` value wins over every rule. Later stages
(ood, finetune) add their kinds with :func:`register_ranking_task`; nothing here changes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import pandas as pd

from bob_cache.errors import SpecError
from bob_cache.registry import Registry

RowTest = Callable[[pd.DataFrame], pd.Series]
# `K-shot` and `F-fraction` settings as the probe stage names them (F formatted with :g).
FEW_SHOT_SETTING = r"\d+-shot|[0-9.e+-]+-fraction"


@dataclass(frozen=True)
class TaskKind:
    """A task: which rows belong to it and which metrics rank it (first present wins)."""

    name: str
    matches: RowTest
    primary: tuple[str, ...]


TASKS: Registry[TaskKind] = Registry("task")


def register_ranking_task(name: str, matches: RowTest, *, primary: Sequence[str]) -> TaskKind:
    """Add a task kind; ``matches(frame)`` returns a boolean Series over the rows."""
    return TASKS.register(name, TaskKind(name, matches, tuple(primary)))


def get_task(name: str) -> TaskKind | None:
    """The registered task kind called ``name``, or None."""
    return TASKS.get(name) if name in TASKS else None


def list_tasks() -> list[str]:
    """Names of the registered task kinds, in registration (and report) order."""
    return TASKS.names()


# Stages whose rows are never a ranked task, whatever their method or ``task`` value:
# transferability estimates are predictions of the battle, compared with it, not part of it.
UNRANKED_STAGES = frozenset({"transferability"})


def assign_tasks(frame: pd.DataFrame) -> pd.Series:
    """The task of every row: its own ``task`` value, else the first matching rule, else ``""``
    (always ``""`` for rows of :data:`UNRANKED_STAGES`)."""
    task = pd.Series("", index=frame.index, dtype=object)
    for kind in TASKS.values():
        free = task == ""
        task[free & kind.matches(frame).fillna(False).astype(bool)] = kind.name
    if "task" in frame:
        own = frame["task"].astype(object).where(frame["task"].notna(), "").astype(str).str.strip()
        task = own.where(own != "", task)
    if "stage" in frame:
        task[_column(frame, "stage").isin(UNRANKED_STAGES)] = ""
    return task


def resolve_primary_metrics(
    frame: pd.DataFrame, overrides: Mapping[str, str | Sequence[str]] | None = None
) -> dict[tuple[str, str], str]:
    """The ranked metric of each (dataset, task) of ``frame`` (which has a ``task`` column).

    Args:
        frame: result rows with their task.
        overrides: task → metric (or metrics in order of preference), replacing the task
            kind's own primary metrics.

    Returns:
        ``{(dataset, task): metric}``; a pair that reports none of its candidates is absent.
    """
    chosen: dict[tuple[str, str], str] = {}
    for (dataset, task), rows in frame.groupby(["dataset", "task"], sort=False):
        candidates = _candidates(str(task), overrides or {})
        present = set(rows["metric"])
        metric = next((m for m in candidates if m in present), None)
        if metric is not None:
            chosen[(str(dataset), str(task))] = metric
    return chosen


def _candidates(task: str, overrides: Mapping[str, str | Sequence[str]]) -> tuple[str, ...]:
    if task in overrides:
        given = overrides[task]
        metrics = (given,) if isinstance(given, str) else tuple(given)
        if not metrics:
            raise SpecError(f"The primary metric of task '{task}' is empty; name one, e.g. top1.")
        return metrics
    kind = get_task(task)
    return kind.primary if kind else ()


def _column(frame: pd.DataFrame, name: str) -> pd.Series:
    return frame[name].astype(object).where(frame[name].notna(), "").astype(str)


def _is_linear(f: pd.DataFrame) -> pd.Series:
    return (
        (_column(f, "stage") == "probe")
        & (_column(f, "method") == "linear")
        & (_column(f, "setting") == "full")
    )


def _is_few_shot(f: pd.DataFrame) -> pd.Series:
    return (_column(f, "stage") == "probe") & _column(f, "setting").str.fullmatch(FEW_SHOT_SETTING)


def _is_knn(f: pd.DataFrame) -> pd.Series:
    return _column(f, "method").str.fullmatch(r"knn@\d+") & (_column(f, "setting") == "full")


def _is_retrieval(f: pd.DataFrame) -> pd.Series:
    return _column(f, "stage") == "retrieval"


def _is_ood_shift(f: pd.DataFrame) -> pd.Series:
    setting = _column(f, "setting")
    return (
        (_column(f, "stage") == "ood")
        & setting.str.startswith("shift:")
        & (setting != "shift:mean")
    )


def _is_ood_detection(f: pd.DataFrame) -> pd.Series:
    return (_column(f, "stage") == "ood") & _column(f, "setting").str.startswith("detect:")


# top1 ranks classification; multi-label sets report no top1, so their ROC-AUC is used.
register_ranking_task("linear", _is_linear, primary=("top1", "roc_auc"))
register_ranking_task("few-shot", _is_few_shot, primary=("top1", "roc_auc"))
register_ranking_task("knn", _is_knn, primary=("top1", "roc_auc"))
register_ranking_task("retrieval", _is_retrieval, primary=("map", "mAP"))
# OOD generalization: top-1 on each shift set (the mean over shifts would count twice);
# OOD detection: AUROC per detector and detect set (higher = better, as z-scores assume).
register_ranking_task("ood", _is_ood_shift, primary=("top1",))
register_ranking_task("ood-detection", _is_ood_detection, primary=("auroc",))


def _is_dense(f: pd.DataFrame) -> pd.Series:
    return (_column(f, "stage") == "probe") & (_column(f, "method") == "dense-linear")


register_ranking_task("dense", _is_dense, primary=("mIoU",))


def _never(f: pd.DataFrame) -> pd.Series:
    return pd.Series(False, index=f.index)


# Fine-tuning rows name their task themselves (only the chosen model's reported split).
register_ranking_task("finetune-classification", _never, primary=("top1",))
register_ranking_task("finetune-detection", _never, primary=("bbox_AP",))
register_ranking_task("finetune-instance", _never, primary=("segm_AP", "bbox_AP"))
register_ranking_task("finetune-semantic", _never, primary=("mIoU",))
