"""Results rows produced elsewhere (a paper's tables, another tool), imported from a CSV.

Required columns: ``dataset, backbone, method, setting, metric, value``; optional: ``seed,
split, stage, task, feature_key, source``. Every row needs a source: its ``source`` cell, or
the one given for the whole file. A row without a ``stage`` is ``retrieval`` when its metric
is a retrieval metric (``map``, ``mrr``, ``precision@k``, ``recall@k``) and ``probe``
otherwise. The rest is filled: one ``run_id`` per import, ``config_hash`` = a hash of the
row's identity and source (so importing a file twice adds nothing), ``versions`` {},
``train_rows``/``val_rows`` None and ``protocol`` ``imported``.
"""

from __future__ import annotations

import csv
import math
import re
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from bob_cache.errors import DataNotFoundError, ResultsImportError
from bob_cache.hashing import stable_hash
from bob_cache.provenance import utc_now
from bob_cache.stores.results import ResultsTable

REQUIRED = ("dataset", "backbone", "method", "setting", "metric", "value")
OPTIONAL = ("seed", "split", "stage", "task", "feature_key", "source")
IDENTITY = (
    "stage", "task", "dataset", "split", "backbone", "feature_key", "method", "setting",
    "metric", "seed",
)  # fmt: skip
PROTOCOL = "imported"
CLASSIFICATION_METRICS = re.compile(
    r"top1|top5|balanced_accuracy|macro_f1|roc_auc|mean_average_precision|labels_scored"
)
RETRIEVAL_METRICS = re.compile(r"map|mAP|mrr|(precision|recall)@\d+")


@dataclass
class ImportSummary:
    """What an import added, and what it noticed."""

    file: str
    results: str
    sources: list[str] = field(default_factory=list)
    rows: int = 0
    added: int = 0
    already_imported: int = 0
    unknown_metrics: list[str] = field(default_factory=list)
    ignored_columns: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def import_results(
    path: str | Path, *, results: str | Path | None = None, source: str | None = None
) -> ImportSummary:
    """Validate the CSV at ``path`` and append its rows not yet in the table.

    Raises:
        DataNotFoundError: no such file.
        ResultsImportError: missing columns or bad rows (every problem, with its line).
    """
    table = ResultsTable.open(results)
    rows, header = parse_results_csv(path, source=source)
    done = table.config_hashes()
    new = [r for r in rows if r["config_hash"] not in done]
    table.append(new)
    metrics = sorted({r["metric"] for r in rows})
    return ImportSummary(
        file=str(path), results=str(table.directory),
        sources=sorted({r["source"] for r in rows}), rows=len(rows), added=len(new),
        already_imported=len(rows) - len(new),
        unknown_metrics=[m for m in metrics if not is_known_metric(m)],
        ignored_columns=[c for c in header if c not in (*REQUIRED, *OPTIONAL)],
    )  # fmt: skip


def parse_results_csv(
    path: str | Path, *, source: str | None = None
) -> tuple[list[dict[str, Any]], list[str]]:
    """Results rows (every column filled) and the CSV's header, or every problem at once."""
    records, header = read_csv(Path(path))
    missing = [c for c in REQUIRED if c not in header]
    if missing:
        raise ResultsImportError(
            f"Cannot import '{path}': it lacks the column(s) {', '.join(missing)}. Expected a "
            f"header with {', '.join(REQUIRED)} (optional: {', '.join(OPTIONAL)})."
        )
    if not records:
        raise ResultsImportError(f"Cannot import '{path}': it has a header but no rows.")
    context = {"run_id": uuid.uuid4().hex[:12], "time": utc_now()}
    rows, problems, seen = [], [], {}
    for line, record in records:
        row, errors = _row(record, source, context)
        if row is not None:
            ident = row["config_hash"]
            if ident in seen:
                errors.append(f"repeats line {seen[ident]} (same identity and source)")
            seen.setdefault(ident, line)
        problems += [f"line {line}: {e}" for e in errors]
        rows.append(row)
    if problems:
        raise ResultsImportError(
            f"Cannot import '{path}': {len(problems)} problem(s); nothing was imported.\n  "
            + "\n  ".join(problems)
            + "\nFix the file and run `bob-cache results import` again."
        )
    return rows, header


def is_known_metric(name: str) -> bool:
    """Whether bob-cache's own stages report a metric of this name."""
    return bool(CLASSIFICATION_METRICS.fullmatch(name) or RETRIEVAL_METRICS.fullmatch(name))


def read_csv(path: Path) -> tuple[list[tuple[int, dict[str, Any]]], list[str]]:
    """``(line, record)`` pairs and the stripped header of a UTF-8 CSV file."""
    if not path.is_file():
        raise DataNotFoundError(f"No results CSV at '{path}'. Check the path.")
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            header = [c.strip() for c in reader.fieldnames or []]
            reader.fieldnames = header
            return list(_numbered(reader)), header
    except (UnicodeDecodeError, csv.Error) as exc:
        raise ResultsImportError(f"Cannot read '{path}' as a UTF-8 CSV: {exc}.") from exc


def _numbered(reader: csv.DictReader) -> Iterator[tuple[int, dict[str, Any]]]:
    """Each record with the file line it starts on (quoted cells may span lines)."""
    end = reader.line_num
    for record in reader:
        start, end = end + 1, reader.line_num
        yield start, record


def _row(
    record: dict[str, Any], source: str | None, context: dict[str, str]
) -> tuple[dict[str, Any] | None, list[str]]:
    cell = {k: (v or "").strip() for k, v in record.items() if isinstance(k, str)}
    errors = [f"empty {c}" for c in REQUIRED if not cell.get(c)]
    if None in record:
        errors.append(f"more cells than the header's {len(cell)} columns")
    value = _number(cell.get("value", ""), errors, "value")
    seed = _seed(cell.get("seed", ""), errors)
    origin = cell.get("source") or (source or "").strip()
    if not origin:
        errors.append("no source: fill its source cell or pass --source")
    if errors:
        return None, errors
    metric = cell["metric"]
    stage = cell.get("stage") or ("retrieval" if RETRIEVAL_METRICS.fullmatch(metric) else "probe")
    ident = {k: cell.get(k, "") for k in IDENTITY} | {"stage": stage, "seed": seed}
    row = {
        **context, **{k: cell[k] for k in REQUIRED}, "stage": stage, "split": cell.get("split", ""),
        "feature_key": cell.get("feature_key", ""), "task": cell.get("task", ""), "value": value,
        "seed": seed, "config_hash": stable_hash({"imported": ident, "source": origin}),
        "versions": {}, "train_rows": None, "val_rows": None, "protocol": PROTOCOL,
        "source": origin,
    }  # fmt: skip
    return row, []


def _number(text: str, errors: list[str], name: str) -> float | None:
    if not text:
        return None
    try:
        number = float(text)
    except ValueError:
        errors.append(f"{name} '{text}' is not a number")
        return None
    if not math.isfinite(number):
        errors.append(f"{name} '{text}' is not finite")
        return None
    return number


def _seed(text: str, errors: list[str]) -> int | None:
    number = _number(text, errors, "seed")
    if number is None:
        return None
    if not number.is_integer():
        errors.append(f"seed '{text}' is not an integer")
        return None
    return int(number)
