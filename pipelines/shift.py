"""The shift stage: a corrupted copy of a data source (ImageNet-C's corruptions), same layout.

One output dataset per (corruption, severity), in ``OUT/<dataset>-<corruption>-<severity>/``:

* a folder source is mirrored: the same split and class sub-folders and file names (a
  folder without split folders that was split by id hash gets ``train/ val/ test/``, so the
  copy reads back with exactly the original's splits, whatever ``--split`` or ``--limit``). PNG
  files stay PNG and JPEG files stay JPEG (re-encoded at quality 95 without chroma
  subsampling, so ids do not change); any other format is written as PNG with ``.png``
  appended to its name (``a.bmp`` → ``a.bmp.png``).
* a manifest source gets a new manifest, ``<dataset>-<corruption>-<severity>.csv``, with
  the same ids, labels (as class names) and splits, pointing at PNGs under ``images/``.
* any other source (``builtin:digits``) becomes an ImageFolder tree: ``<split>/<class
  name>/<id's last part>.png``, so it reads back with the same splits and class names.

Each output also holds ``shift.json``: the source, its fingerprint, the corruption,
severity, seed and library versions. An output is written into ``.<name>.partial/`` (each
image atomically) and renamed when complete, so a finished output is never half-done; a
rerun skips finished outputs and completes a partial one whose settings match (one that
does not match is rewritten). ``--overwrite`` renames the old copy aside before the new one
takes its name and deletes it last (:func:`bob_cache.stores.atomic.replace_folder`): a kill or
a full disk at any step leaves the old copy or the new one under the final name (or neither,
with the complete new one still partial), and the same command finishes. Images the source
cannot decode are skipped and listed.
"""

from __future__ import annotations

import contextlib
import csv
import functools
import json
import shutil
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from PIL import Image

from bob_cache.data import DataSource, Sample, parse_source
from bob_cache.data.corruptions import (
    CORRUPTIONS_VERSION,
    apply_corruption,
    corruption_rng,
    get_corruption,
    parse_corruptions,
    parse_severities,
)
from bob_cache.data.source import default_name
from bob_cache.data.splits import check_fractions_apply, parse_split_fractions
from bob_cache.errors import BobCacheError
from bob_cache.hashing import stable_hash
from bob_cache.pipelines.registry import register_stage
from bob_cache.progress import progress_bar
from bob_cache.provenance import library_versions, utc_now
from bob_cache.stores.atomic import (
    RETIRED_PREFIX,
    atomic_write,
    crash_point,
    full_disk_is_reported,
    remove_leftovers,
    replace_folder,
    write_text,
)

PROVENANCE = "shift.json"
_PARTIAL_MARK = "partial.json"
_LAYOUT_VERSION = 1
_KEPT_SUFFIXES = (".png", ".jpg", ".jpeg")
JPEG_QUALITY = 95
_LIBRARIES = ("bob-cache", "numpy", "scipy", "pillow", "matplotlib")


class ShiftOutputExistsError(BobCacheError, FileExistsError):
    """The output folder already holds something else than this corrupted copy."""


@dataclass
class ShiftConfig:
    """Options of ``bob-cache shift`` (see ``bob-cache shift --help``)."""

    data: str
    out: str
    corruptions: tuple[str, ...]
    severities: tuple[int, ...]
    seed: int = 0
    split: str = "all"
    split_fractions: Any = None  # SplitFractions (or its text) for a source without splits
    name: str | None = None
    limit: int | None = None
    workers: int = 0
    overwrite: bool = False
    quiet: bool = False


@dataclass
class ShiftSummary:
    """What a shift run did; ``outputs`` has one entry per (corruption, severity)."""

    source: str
    dataset: str
    fingerprint: str
    out: str
    outputs: list[dict[str, Any]] = field(default_factory=list)
    images_written: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@register_stage("shift")
@full_disk_is_reported(
    "the corrupted copies", "rerun the same command: it completes the unfinished copies"
)
def shift(config: ShiftConfig) -> ShiftSummary:
    """Write one corrupted copy of ``config.data`` per corruption and severity."""
    started = time.perf_counter()
    corruptions = parse_corruptions(config.corruptions)  # cheap checks before listing data
    severities = parse_severities(config.severities)
    fractions = parse_split_fractions(config.split_fractions)
    source = parse_source(config.data, name=config.name, split=config.split, fractions=fractions)
    check_fractions_apply(source, fractions)
    rows = {s: samples[: config.limit] for s, samples in source.select(config.split).items()}
    summary = ShiftSummary(config.data, source.name, source.fingerprint(), config.out)
    jobs = [
        _Job(config, source, summary.fingerprint, rows, c, s)
        for c in corruptions
        for s in severities
    ]
    todo = sum(len(job.pending()) for job in jobs if not job.finished())  # conflicts fail here
    with contextlib.ExitStack() as stack:
        bar = stack.enter_context(progress_bar(todo, desc="shift", quiet=config.quiet))
        mapper = functools.partial(map, functools.partial(_corrupt_one, source=source))
        if config.workers > 0 and todo > 1:
            pool = stack.enter_context(
                ProcessPoolExecutor(config.workers, initializer=_init_worker, initargs=(source,))
            )
            mapper = functools.partial(pool.map, _corrupt_one, chunksize=16)
        for job in jobs:
            summary.outputs.append(job.run(mapper, bar.update))
    summary.images_written = sum(o["images_written"] for o in summary.outputs)
    summary.seconds = time.perf_counter() - started
    return summary


@dataclass
class _Job:
    """One (corruption, severity) output of a source."""

    config: ShiftConfig
    source: DataSource
    fingerprint: str
    rows: dict[str, list[Sample]]
    corruption: str
    severity: int

    def __post_init__(self) -> None:
        self.dirname = f"{self.source.name}-{self.corruption}-{self.severity}"
        self.final = Path(self.config.out).expanduser() / self.dirname
        self.partial = self.final.with_name(f".{self.dirname}.partial")
        flat = [(split, s) for split, samples in self.rows.items() for s in samples]
        self.paths = {
            (split, s.id): output_path(self.source, split, s, i)
            for i, (split, s) in enumerate(flat)
        }
        self.identity = {
            "source_fingerprint": self.fingerprint,
            "split": self.config.split,
            "limit": self.config.limit,
            "corruption": self.corruption,
            "severity": self.severity,
            "seed": self.config.seed,
            "corruptions_version": CORRUPTIONS_VERSION,
            "layout_version": _LAYOUT_VERSION,
        }
        self.key = stable_hash(self.identity)

    def finished(self) -> bool:
        """True when the final folder holds this very copy; raises if it holds another."""
        marker = self.final / PROVENANCE
        if not self.final.exists():
            return False
        if marker.is_file() and _read_json(marker).get("key") == self.key:
            return True
        if not marker.is_file():
            raise ShiftOutputExistsError(
                f"'{self.final}' exists but is not a corrupted copy written by `bob-cache "
                f"shift` (no {PROVENANCE}). Move it away or choose another --out."
            )
        if not self.config.overwrite:
            old = _read_json(marker)
            raise ShiftOutputExistsError(
                f"'{self.final}' holds another corrupted copy (seed {old.get('seed')}, split "
                f"{old.get('split')}, limit {old.get('limit')}, source fingerprint "
                f"{old.get('source_fingerprint')}). Pass --overwrite to replace it, or choose "
                "another --out."
            )
        return False

    def pending(self) -> list[tuple[str, Sample]]:
        """Rows whose image is not yet in the partial folder (all of them when it is stale)."""
        if not self._partial_matches():
            return [(split, s) for split, samples in self.rows.items() for s in samples]
        return [
            (split, s)
            for split, samples in self.rows.items()
            for s in samples
            if not (self.partial / self.paths[split, s.id]).is_file()
        ]

    def run(self, mapper: Callable, advance: Callable) -> dict[str, Any]:
        """Write (or complete) this output; ``mapper`` maps :func:`_corrupt_one` over tasks."""
        result = {
            "corruption": self.corruption,
            "severity": self.severity,
            "path": str(self.final),
            "data": str(self._data_path(self.final)),
        }
        remove_leftovers(self.final.parent, f"{RETIRED_PREFIX}{self.dirname}-")  # killed swaps
        if self.finished():
            return {**result, "status": "done", "images_written": 0, "unreadable": []}
        resumed = self._partial_matches()
        if not resumed:
            shutil.rmtree(self.partial, ignore_errors=True)
            self.partial.mkdir(parents=True)
            _write_json(self.partial / _PARTIAL_MARK, {"key": self.key, **self.identity})
        pending = self.pending()
        unreadable = self._corrupt_all(pending, mapper, advance)
        crash_point("shift-images")
        self._finish(unreadable)
        status = "resumed" if resumed else "written"
        written = len(pending) - len(unreadable)
        return {**result, "status": status, "images_written": written, "unreadable": unreadable}

    def _partial_matches(self) -> bool:
        """Whether the partial folder is this output's (marked, or complete but not renamed)."""
        return any(
            (self.partial / marker).is_file()
            and _read_json(self.partial / marker).get("key") == self.key
            for marker in (_PARTIAL_MARK, PROVENANCE)
        )

    def _corrupt_all(
        self, pending: list[tuple[str, Sample]], mapper: Callable, advance: Callable
    ) -> list[dict]:
        args = (self.corruption, self.severity, self.config.seed, str(self.partial))
        tasks = [(split, s, self.paths[split, s.id], *args) for split, s in pending]
        unreadable = []
        for task, reason in zip(tasks, mapper(tasks), strict=True):
            if reason:
                unreadable.append({"split": task[0], "id": task[1].id, "reason": reason})
            advance(1)
        return unreadable

    def _finish(self, unreadable: list[dict]) -> None:
        """Index file and provenance, then the rename that makes the output visible."""
        written = {key: rel for key, rel in self.paths.items() if (self.partial / rel).is_file()}
        for leftover in self.partial.rglob(".*.tmp-*"):  # images a killed worker was writing
            leftover.unlink(missing_ok=True)
        if self.source.kind == "manifest":
            self._write_manifest(written)
            crash_point("shift-manifest")
        _write_json(self.partial / PROVENANCE, self._provenance(written, unreadable))
        crash_point("shift-provenance")
        (self.partial / _PARTIAL_MARK).unlink(missing_ok=True)
        crash_point("shift-unmark")
        replace_folder(self.partial, self.final)  # --overwrite: the old copy is deleted last

    def _write_manifest(self, written: dict[tuple[str, str], str]) -> None:
        names = self.source.class_names
        multi = any(isinstance(s.label, tuple) for rows in self.rows.values() for s in rows)
        header = ["id", "path", "split"] + ([f"label:{n}" for n in names] if multi else ["label"])
        with open(self.partial / f"{self.dirname}.csv", "w", newline="", encoding="utf-8") as f:
            out = csv.writer(f)
            out.writerow(header)
            for split, samples in self.rows.items():
                for s in samples:
                    if (split, s.id) not in written:
                        continue
                    labels = list(s.label) if multi else [names[s.label] if s.label >= 0 else ""]
                    out.writerow([s.id, written[split, s.id], split, *labels])

    def _provenance(self, written: dict, unreadable: list[dict]) -> dict[str, Any]:
        corruption = get_corruption(self.corruption)
        return {
            "key": self.key,
            **self.identity,
            "family": corruption.family,
            "source": {"data": self.config.data, **self.source.describe()},
            "rows": {split: sum(1 for k in written if k[0] == split) for split in self.rows},
            "unreadable": unreadable,
            "layout": _layout(self.source),
            "jpeg_quality": JPEG_QUALITY,
            "versions": library_versions(_LIBRARIES),
            "created": utc_now(),
        }

    def _data_path(self, root: Path) -> Path:
        return root / f"{self.dirname}.csv" if self.source.kind == "manifest" else root


def _layout(source: DataSource) -> str:
    return source.kind if source.kind in ("folder", "manifest") else "imagefolder"


def output_path(source: DataSource, split: str, sample: Sample, index: int) -> str:
    """Where ``sample``'s corrupted image goes, relative to the output folder."""
    if source.kind == "folder":  # a split made by id hash becomes split folders
        hashed = source.split_rule.kind == "id-hash"
        return _output_name(f"{split}/{sample.id}" if hashed else sample.id)
    if source.kind == "manifest":
        base = default_name(PurePosixPath(str(sample.location).replace("\\", "/")).name)
        return f"images/{default_name(split)}/{index:06d}-{_output_name(base)}"
    parts = [default_name(split)]
    if isinstance(sample.label, int) and sample.label >= 0:
        parts.append(default_name(source.class_names[sample.label]))
    return "/".join([*parts, default_name(PurePosixPath(sample.id).name) + ".png"])


def _output_name(name: str) -> str:
    return name if name.lower().endswith(_KEPT_SUFFIXES) else name + ".png"


_SOURCE: DataSource | None = None


def _init_worker(source: DataSource) -> None:
    global _SOURCE
    _SOURCE = source


def _corrupt_one(task: tuple, source: DataSource | None = None) -> str:
    """Corrupt and write one image (atomically); returns '' or why the image was skipped.

    ``source`` defaults to the one a worker process was started with.
    """
    _split, sample, rel, name, severity, seed, root = task
    source = source or _SOURCE
    if source is None:
        raise RuntimeError("shift worker started without a data source")
    try:
        image = source.open_image(sample)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:
        return f"{type(exc).__name__}: {exc}"
    out = apply_corruption(image, name, severity, corruption_rng(seed, name, severity, sample.id))
    path = Path(root) / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    if rel.lower().endswith((".jpg", ".jpeg")):
        save = functools.partial(Image.fromarray(out).save, format="JPEG", quality=JPEG_QUALITY,
                                 subsampling=0)  # fmt: skip
    else:
        save = functools.partial(Image.fromarray(out).save, format="PNG")
    atomic_write(path, save)
    return ""


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, obj: dict[str, Any]) -> None:
    write_text(path, json.dumps(obj, indent=2, default=str) + "\n")
