"""Stages register by name; the CLI and the battle suite look them up here."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from bob_cache.errors import BobCacheError, did_you_mean

Stage = Callable[..., Any]
_STAGES: dict[str, Stage] = {}
# Stage modules register themselves on import; they are imported on first lookup so that
# `import bob_cache` stays light (torch, faiss and zarr load only when a stage runs).
_STAGE_MODULES = (
    "extract", "probe", "predict", "index", "query", "retrieval_eval", "ood", "battle", "report",
    "shift", "finetune", "dense_probe",
)  # fmt: skip


def _load_stages() -> None:
    for module in _STAGE_MODULES:
        importlib.import_module(f"bob_cache.pipelines.{module}")


def register_stage(name: str) -> Callable[[Stage], Stage]:
    """Decorator: register a stage entry point under ``name``."""

    def wrap(fn: Stage) -> Stage:
        _STAGES[name] = fn
        return fn

    return wrap


def get_stage(name: str) -> Stage:
    """The stage called ``name``."""
    _load_stages()
    if name not in _STAGES:
        raise BobCacheError(
            f"Unknown stage '{name}'.{did_you_mean(name, _STAGES)} Known: {', '.join(_STAGES)}."
        )
    return _STAGES[name]


def list_stages() -> list[str]:
    """Names of the registered stages."""
    _load_stages()
    return sorted(_STAGES)
