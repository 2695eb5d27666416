"""What ``--data`` can name: every source kind with the layout it expects, and the study's
datasets with their official counts per split (``bob-cache datasets``).

Source modules describe their kind with :func:`register_kind` and the distributed datasets they
read with :func:`register_dataset`; ``bob-cache datasets check`` compares a local copy's
counts per split with a dataset's official ones.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from bob_cache.errors import DataSourceError
from bob_cache.registry import Registry


class UnknownDatasetError(DataSourceError, KeyError):
    """A dataset name the catalog does not hold."""

    def __str__(self) -> str:  # KeyError would wrap the message in quotes
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class SourceKind:
    """One kind of ``--data`` value.

    Attributes:
        kind: the source kind (``folder``, ``torchvision``, ``webdataset``, ...).
        syntax: how the value is written (``torchvision:NAME:ROOT``).
        layout: what the location must hold.
        example: a working ``--data`` value.
    """

    kind: str
    syntax: str
    layout: str
    example: str = ""


@dataclass(frozen=True)
class DatasetInfo:
    """One dataset as it is distributed.

    Attributes:
        name: catalog name (``flowers102``); a source that reads it sets ``catalog`` to it.
        spec: the ``--data`` value, with ``ROOT`` for the local copy's folder.
        task: what the study uses it for (classification, ood, retrieval, segmentation).
        counts: official images per split (the split names bob-cache gives them).
        classes: number of classes (None where not a classification set).
        source: where the official copy comes from.
        layout: the files the root must hold.
        note: how splits are made where the distribution has none (val held out, ...).
    """

    name: str
    spec: str
    task: str
    counts: dict[str, int]
    classes: int | None
    source: str
    layout: str
    note: str = ""
    env: str = field(default="")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


SOURCE_KINDS: Registry[SourceKind] = Registry("data source kind", hint="See `bob-cache datasets`.")
DATASETS: Registry[DatasetInfo] = Registry(
    "dataset", hint="See `bob-cache datasets`.", error=UnknownDatasetError
)


def register_kind(kind: SourceKind) -> SourceKind:
    """Describe a source kind for ``bob-cache datasets``."""
    return SOURCE_KINDS.register(kind.kind, kind)


def register_dataset(info: DatasetInfo) -> DatasetInfo:
    """Add a distributed dataset and its official counts to the catalog."""
    return DATASETS.register(info.name, info)


def list_kinds() -> list[SourceKind]:
    """Every source kind, in the order ``--data`` values are tried."""
    from bob_cache.data.source import load_source_modules

    load_source_modules()
    return [SOURCE_KINDS.get(k) for k in SOURCE_KINDS]


def list_datasets() -> list[DatasetInfo]:
    """Every catalogued dataset."""
    from bob_cache.data.source import load_source_modules

    load_source_modules()
    return [DATASETS.get(k) for k in DATASETS]


def get_dataset(name: str) -> DatasetInfo:
    """The catalogued dataset ``name`` (case-insensitive)."""
    from bob_cache.data.source import load_source_modules

    load_source_modules()
    lowered = {k.lower(): k for k in DATASETS}
    return DATASETS.get(lowered.get(name.lower(), name))


@dataclass(frozen=True)
class SplitCount:
    """One split's images in a local copy against the official count."""

    split: str
    official: int | None
    found: int | None

    @property
    def ok(self) -> bool:
        return self.official == self.found

    @property
    def missing(self) -> int:
        """Official images the copy lacks (negative: it has more)."""
        return (self.official or 0) - (self.found or 0)


@dataclass(frozen=True)
class CountCheck:
    """A local copy of a catalogued dataset compared with its official counts."""

    dataset: DatasetInfo
    spec: str
    splits: list[SplitCount]
    classes_found: int | None

    @property
    def ok(self) -> bool:
        classes_ok = self.dataset.classes is None or self.classes_found in (
            None,
            self.dataset.classes,
        )
        return classes_ok and all(s.ok for s in self.splits)

    def problems(self) -> list[str]:
        """What differs, one sentence each (empty when the copy is complete)."""
        out = []
        for s in self.splits:
            if s.found is None:
                out.append(f"split '{s.split}' is missing ({s.official:,} images expected)")
            elif s.official is None:
                out.append(f"split '{s.split}' ({s.found:,} images) is not an official split")
            elif s.missing > 0:
                out.append(f"split '{s.split}' lacks {s.missing:,} of {s.official:,} images")
            elif s.missing < 0:
                out.append(
                    f"split '{s.split}' has {-s.missing:,} images more than the official "
                    f"{s.official:,}"
                )
        expected = self.dataset.classes
        if expected is not None and self.classes_found not in (None, expected):
            out.append(f"{self.classes_found} classes found, {expected} expected")
        return out

    def to_dict(self) -> dict[str, Any]:
        return {
            "dataset": self.dataset.name,
            "data": self.spec,
            "ok": self.ok,
            "splits": [
                {"split": s.split, "official": s.official, "found": s.found, "ok": s.ok}
                for s in self.splits
            ],
            "classes": {"official": self.dataset.classes, "found": self.classes_found},
            "problems": self.problems(),
        }


def check_counts(source: Any, info: DatasetInfo, *, spec: str = "") -> CountCheck:
    """Compare ``source``'s images per split (and classes) with ``info``'s official counts.

    Raises:
        DataSourceError: the catalog has no official counts for ``info`` (it lists the splits
            the copy has).
    """
    if not info.counts:
        found = ", ".join(f"{k} {len(v):,}" for k, v in source.splits.items())
        raise DataSourceError(
            f"The catalog has no official per-split counts for {info.name} ({info.note or 'none'}"
            f"), so the copy cannot be checked against them. It lists: {found}; compare them "
            f"with {info.source}."
        )
    names = list(info.counts) + [s for s in source.splits if s not in info.counts]
    splits = [
        SplitCount(
            name,
            info.counts.get(name),
            len(source.splits[name]) if name in source.splits else None,
        )
        for name in names
    ]
    classes = len(source.class_names) if source.class_names else None
    return CountCheck(info, spec or source.origin, splits, classes)
