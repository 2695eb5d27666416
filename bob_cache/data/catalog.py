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
