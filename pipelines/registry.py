"""Stages register by name; the CLI and the battle suite look them up here."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from bob_cache.errors import BobCacheError
from bob_cache.registry import Registry

Stage = Callable[..., Any]
STAGES: Registry[Stage] = Registry("stage", error=BobCacheError)
# Stage modules register themselves on import; a lookup imports only the module of the stage
# it names (``retrieval-eval`` lives in ``retrieval_eval``), so `import bob_cache` and each
# command stay light (torch, faiss and zarr load only when a stage that needs them runs).
_STAGE_NAMES = (
    "extract", "probe", "predict", "index", "query", "retrieval-eval", "ood", "battle", "report",
    "shift", "finetune", "dense-probe", "transferability", "export",
)  # fmt: skip


def _load_stages(*names: str) -> None:
    """Import the modules of ``names`` (all stages when none is given)."""
    for name in names or _STAGE_NAMES:
        if name in _STAGE_NAMES:
            importlib.import_module(f"bob_cache.pipelines.{name.replace('-', '_')}")


def register_stage(name: str) -> Callable[[Stage], Stage]:
    """Decorator: register a stage entry point under ``name``."""
    return STAGES.register(name)


def get_stage(name: str) -> Stage:
    """The stage called ``name``."""
    _load_stages(name)
    if name not in STAGES:
        _load_stages()  # an unknown name: list them all
    return STAGES.get(name)


def list_stages() -> list[str]:
    """Names of the registered stages."""
    _load_stages()
    return sorted(STAGES)
