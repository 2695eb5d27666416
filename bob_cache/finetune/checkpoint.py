"""A fine-tuning run's files: the resumable checkpoint (every epoch), the best weights
(safetensors), the per-epoch log and the final metrics.

Every file is written to a temporary name and renamed into place
(:mod:`bob_cache.stores.atomic`), so a kill or a full disk at any point leaves either the
previous version or the new one, never a partial file that a resume would load. In an epoch
the best weights come first, then the checkpoint (the commit: a rerun with ``--resume``
repeats at most the epoch that was cut short, and since each epoch reseeds every random draw
from (seed, epoch), the repeat is the same computation), then the log, rewritten whole from
the checkpoint's history (one line per epoch that counted, as in an uninterrupted run).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from bob_cache.errors import FinetuneError
from bob_cache.stores.atomic import atomic_write

CHECKPOINT = "checkpoint.pt"
BEST = "best.safetensors"
LOG = "log.jsonl"
METRICS = "metrics.json"
CONFIG = "config.json"


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(json.dumps(data, indent=2, default=str)))


def save_checkpoint(run_dir: Path, state: dict[str, Any]) -> None:
    """``state``: model, optimizer and scaler state dicts, epochs done, updates, best, history."""
    atomic_write(run_dir / CHECKPOINT, lambda tmp: torch.save(state, tmp))


def save_best(run_dir: Path, model: nn.Module) -> None:
    from safetensors.torch import save_model

    atomic_write(run_dir / BEST, lambda tmp: save_model(model, str(tmp)))


def load_best(run_dir: Path, model: nn.Module) -> None:
    from safetensors.torch import load_model

    load_model(model, str(run_dir / BEST))


def check_run_dir(run_dir: Path, config: dict[str, Any], *, resume: bool) -> dict[str, Any] | None:
    """The checkpoint to continue from, or None for a fresh run.

    Raises:
        FinetuneError: the folder holds a run and ``--resume`` was not given, or its config
            differs from this one (the message lists the differences).
    """
    saved_config = run_dir / CONFIG
    if not saved_config.exists():
        return None
    old = json.loads(saved_config.read_text())
    if not resume:
        raise FinetuneError(
            f"{run_dir} already holds a fine-tuning run. Fix: pass --resume to continue it, or "
            "choose another --out folder."
        )
    changed = sorted(k for k in old.keys() | config.keys() if old.get(k) != config.get(k))
    if changed:
        detail = "; ".join(f"{k}: {old.get(k)!r} → {config.get(k)!r}" for k in changed[:6])
        raise FinetuneError(
            f"--resume: the run in {run_dir} was started with another config ({detail}). Fix: "
            "rerun with the original options, or choose another --out folder for the new ones."
        )
    path = run_dir / CHECKPOINT
    if not path.exists():
        return None  # killed before its first epoch ended: start over
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:
        raise FinetuneError(
            f"The checkpoint {path} cannot be read ({type(exc).__name__}). Fix: delete it to "
            "restart the run from its beginning."
        ) from exc


def write_log(run_dir: Path, history: list[dict[str, Any]]) -> None:
    """The per-epoch log, one JSON line per epoch of ``history``, rewritten whole."""
    lines = "".join(json.dumps(record, default=str) + "\n" for record in history)
    atomic_write(run_dir / LOG, lambda tmp: tmp.write_text(lines, encoding="utf-8"))
