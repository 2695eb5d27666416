"""Stages register by name; the CLI and the battle suite look them up here."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bob_cache.errors import BobCacheError, did_you_mean

Stage = Callable[..., Any]
_STAGES: dict[str, Stage] = {}


def register_stage(name: str) -> Callable[[Stage], Stage]:
    """Decorator: register a stage entry point under ``name``."""

    def wrap(fn: Stage) -> Stage:
        _STAGES[name] = fn
        return fn

    return wrap


def get_stage(name: str) -> Stage:
    """The stage called ``name``."""
    from bob_cache.pipelines import extract  # noqa: F401  (registers)

    if name not in _STAGES:
        raise BobCacheError(
            f"Unknown stage '{name}'.{did_you_mean(name, _STAGES)} Known: {', '.join(_STAGES)}."
        )
    return _STAGES[name]


def list_stages() -> list[str]:
    """Names of the registered stages."""
    from bob_cache.pipelines import extract  # noqa: F401

    return sorted(_STAGES)
