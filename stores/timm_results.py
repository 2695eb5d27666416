"""timm's published results tables (``results-imagenet-r.csv`` and its siblings), imported.

timm's ``results/`` folder has one CSV per evaluation set, with the columns ``model, top1,
top1_err, top5, top5_err, param_count, img_size, crop_pct, interpolation`` (the shifted sets
add ``top1_diff, top5_diff, rank_diff``). ``model`` is a timm name (``arch.tag``), top-1/5 are
percentages, and ``param_count`` is in millions (``"1,013.01"``). The file is read as
distributed; ``model, top1, top5, param_count, img_size`` are required.

Each model gives rows of the trained classifier timm published, marked ``source`` (the file,
or ``--source``) and ``protocol`` (what timm measured, at which size and crop):

* ``results-imagenet.csv`` and ``results-imagenet-real.csv``: stage ``finetune``, task
  ``finetune-classification``, method ``classification``, setting ``full``, split ``val``, on
  the ID dataset (``imagenet``) or ``imagenet-real``;
* ``results-<set>-clean.csv`` (ImageNet val restricted to ``<set>``'s classes): stage ``ood``,
  setting ``shift:<set>``, metrics ``id_top1_shared``/``id_top5_shared``;
* any other ``results-<set>.csv`` (``imagenet-r``, ``imagenet-a``, ``sketch``,
  ``imagenetv2-matched-frequency``): stage ``ood``, task ``ood``, method ``finetuned``,
  setting ``shift:<set>``, metrics ``top1``/``top5`` (as fractions).

Model names map to backbone-registry entries by their timm name (``resnet50.tv_in1k`` is
``resnet50``); rows are imported for models that map to an entry or are backbones of the
results table already. The others are listed, not imported, unless ``all_models`` is set.
"""

from __future__ import annotations

import math
import re
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bob_cache.errors import ResultsImportError
from bob_cache.hashing import stable_hash
from bob_cache.provenance import utc_now
from bob_cache.stores.results import ResultsTable
from bob_cache.stores.results_import import read_csv

REQUIRED = ("model", "top1", "top5", "param_count", "img_size")
KNOWN = (*REQUIRED, "top1_err", "top5_err", "crop_pct", "interpolation", "top1_diff",
         "top5_diff", "rank_diff")  # fmt: skip
ID_SETS = ("imagenet", "imagenet-real")  # the ID validation set, and its ReaL relabelling
FILE_NAME = re.compile(r"results-(?P<set>[A-Za-z0-9._-]+?)\.csv")
SHOWN = 10  # names listed in a message before "..."


@dataclass
class TimmImportSummary:
    """What a timm import added, mapped and left out."""

    file: str
    results: str
    source: str
    dataset: str
    set: str
    stage: str
    setting: str
    models: int = 0
    rows: int = 0
    added: int = 0
    already_imported: int = 0
    registry: dict[str, str] = field(default_factory=dict)  # timm model → registry entry
    not_imported: list[str] = field(default_factory=list)  # no entry, no rows of their own
    ignored_columns: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def import_timm_results(
    path: str | Path,
    *,
    results: str | Path | None = None,
    source: str | None = None,
    dataset: str = "imagenet",
    eval_set: str | None = None,
    all_models: bool = False,
    registry: Mapping[str, str] | None = None,
) -> TimmImportSummary:
    """Import the timm results table at ``path`` (nothing is written when it has a problem).

    Args:
        path: a timm ``results-<set>.csv``.
        results: the results table.
        source: recorded on every row; default ``timm <file name>``.
        dataset: the ID dataset the models were trained on (the suite's name for ImageNet).
        eval_set: the evaluated set's name; default from the file name (``imagenet-r``).
        all_models: import every model, not only those of the registry or the table.
        registry: timm model name → registry entry name (default: the backbone registry).

    Raises:
        ResultsImportError: missing columns, duplicate models, bad cells, or a file name
            that names no set (without ``eval_set``).
    """
    path = Path(path)
    records, header = read_csv(path)
    evaluated = eval_set or _set_from_name(path)
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise ResultsImportError(
            f"Cannot import '{path}' as a timm results table: it lacks the column(s) "
            f"{', '.join(missing)}. timm's results-*.csv files have {', '.join(REQUIRED)} "
            "(and top1_err, top5_err, crop_pct, interpolation, ...); for rows in bob-cache's "
            "own layout, drop --format timm."
        )
    models = _parse(path, records)
    table = ResultsTable.open(results)
    mapping = dict(_registry() if registry is None else registry)
    origin = (source or "").strip() or f"timm {path.name}"
    stage, setting, _ = _placement(evaluated, dataset)
    keep = set(models) if all_models else _wanted(models, mapping, table)
    context = {"run_id": uuid.uuid4().hex[:12], "time": utc_now(), "source": origin}
    rows = [
        row
        for model in models
        if model in keep
        for row in _rows(model, models[model], evaluated, dataset, context, path.name)
    ]
    done = table.config_hashes()
    new = [r for r in rows if r["config_hash"] not in done]
    table.append(new)
    return TimmImportSummary(
        file=str(path), results=str(table.directory), source=origin,
        dataset=rows[0]["dataset"] if rows else _dataset(evaluated, dataset), set=evaluated,
        stage=stage, setting=setting, models=len(keep), rows=len(rows), added=len(new),
        already_imported=len(rows) - len(new),
        registry={m: mapping[m] for m in models if m in keep and m in mapping},
        not_imported=sorted(set(models) - keep),
        ignored_columns=[c for c in header if c not in KNOWN],
    )  # fmt: skip


def _set_from_name(path: Path) -> str:
    match = FILE_NAME.fullmatch(path.name)
    if match is None:
        raise ResultsImportError(
            f"Cannot tell which set '{path.name}' evaluates: timm names its tables "
            "results-<set>.csv (results-imagenet-r.csv). Pass --set NAME (e.g. imagenet-r)."
        )
    return match["set"]


def _parse(path: Path, records: list[tuple[int, dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    """``{model: parsed cells}``, or every problem at once (duplicates with their lines)."""
    if not records:
        raise ResultsImportError(f"Cannot import '{path}': it has a header but no rows.")
    models: dict[str, dict[str, Any]] = {}
    first: dict[str, int] = {}
    problems = []
    for line, record in records:
        cell = {k: (v or "").strip() for k, v in record.items() if isinstance(k, str)}
        model, errors = cell.get("model", ""), []
        if not model:
            errors.append("empty model")
        elif model in first:
            errors.append(f"model '{model}' repeats line {first[model]}")
        parsed = {k: _number(cell.get(k, ""), k, errors) for k in ("top1", "top5", "param_count")}
        parsed["img_size"] = _number(cell.get("img_size", ""), "img_size", errors)
        for name in ("top1", "top5"):
            if parsed[name] is not None and not 0 <= parsed[name] <= 100:
                errors.append(f"{name} {parsed[name]:g} is not a percentage (0 to 100)")
        parsed["crop_pct"] = cell.get("crop_pct", "")
        parsed["interpolation"] = cell.get("interpolation", "")
        problems += [f"line {line}: {e}" for e in errors]
        if model and model not in first:
            first[model] = line
            models[model] = parsed
    if problems:
        shown = problems[:50] + (
            [f"... and {len(problems) - 50} more"] if len(problems) > 50 else []
        )
        raise ResultsImportError(
            f"Cannot import '{path}': {len(problems)} problem(s); nothing was imported.\n  "
            + "\n  ".join(shown)
            + "\nFix the file (one row per model) and run `bob-cache results import` again."
        )
    return models


def _number(text: str, name: str, errors: list[str]) -> float | None:
    """A number as timm writes it (``1,013.01`` has a thousands separator)."""
    if not text:
        errors.append(f"empty {name}")
        return None
    try:
        number = float(text.replace(",", ""))
    except ValueError:
        errors.append(f"{name} '{text}' is not a number")
        return None
    if not math.isfinite(number):
        errors.append(f"{name} '{text}' is not finite")
        return None
    return number


def _wanted(
    models: dict[str, dict[str, Any]], mapping: Mapping[str, str], table: ResultsTable
) -> set[str]:
    """Models of the registry, or whose name the results table has as a backbone already."""
    frame = table.read()
    present = set(frame["backbone"].astype(str)) if len(frame) else set()
    return {m for m in models if m in mapping or m in present}


def _registry() -> dict[str, str]:
    from bob_cache.backbones.registry import list_backbones

    return {e.model: e.name for e in list_backbones() if e.model}


def _dataset(evaluated: str, dataset: str) -> str:
    return evaluated if evaluated in ID_SETS[1:] else dataset


def _placement(evaluated: str, dataset: str) -> tuple[str, str, str]:
    """``(stage, setting, task)`` of the rows of one evaluated set."""
    if evaluated in ID_SETS or evaluated == dataset:
        return "finetune", "full", "finetune-classification"
    base = evaluated.removesuffix("-clean")
    return "ood", f"shift:{base}", "ood" if base == evaluated else ""


def _rows(
    model: str,
    cells: dict[str, Any],
    evaluated: str,
    dataset: str,
    context: dict[str, str],
    file: str,
) -> list[dict[str, Any]]:
    stage, setting, task = _placement(evaluated, dataset)
    clean = stage == "ood" and evaluated.endswith("-clean")
    params = f"{cells['param_count']:g}M params" if cells["param_count"] is not None else ""
    how = ", ".join(p for p in (
        f"{int(cells['img_size'])} px", f"crop {cells['crop_pct']}" if cells["crop_pct"] else "",
        cells["interpolation"], params,
    ) if p)  # fmt: skip
    what = (f"ImageNet val top-1 on {evaluated.removesuffix('-clean')}'s classes" if clean
            else f"top-1 on {evaluated}")  # fmt: skip
    protocol = (f"imported: timm's published {file} ({what} of the trained classifier, "
                f"percent / 100; {how})")  # fmt: skip
    base = {
        **context, "stage": stage, "dataset": _dataset(evaluated, dataset), "split": "val",
        "backbone": model, "feature_key": "", "setting": setting, "seed": None,
        "method": "classification" if stage == "finetune" else "finetuned", "task": task,
        "versions": {}, "train_rows": None, "val_rows": None, "protocol": protocol,
    }  # fmt: skip
    out = []
    for name in ("top1", "top5"):
        metric = f"id_{name}_shared" if clean else name
        ident = {k: base[k] for k in ("stage", "dataset", "backbone", "method", "setting")}
        out.append({**base, "metric": metric, "value": cells[name] / 100,
                    "config_hash": stable_hash({"timm": {**ident, "metric": metric},
                                                "source": context["source"]})})  # fmt: skip
    return out
