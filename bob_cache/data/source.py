"""Data sources: what ``--data`` can name, and the registry that parses it.

A source lists its samples per split (id, label, location) and opens one image at a time;
it never decodes images while listing. Kinds register with :func:`register_source` and
:func:`parse_source` tries them in order.
"""

from __future__ import annotations

import hashlib
import io
import re
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

from PIL import Image

from bob_cache.data.splits import (  # noqa: F401  (re-exported for the loaders)
    AS_DISTRIBUTED,
    DEFAULT_SPLIT,
    SPLIT_NAMES,
    SplitFractions,
    SplitRule,
)
from bob_cache.errors import DataNotFoundError, DataSourceError, did_you_mean
from bob_cache.hashing import stable_hash

_UNSAFE = re.compile(r"[^A-Za-z0-9._+-]+")


@dataclass(frozen=True)
class Sample:
    """One image: its id (relative path or manifest id), label (-1 unlabeled) and location."""

    id: str
    label: int
    location: Any


@dataclass
class DataSource(ABC):
    """A listed dataset: samples per split, class names, and how the splits were made.

    ``origin`` is a ``--data`` value that lists the same source again (thumbnails and workers
    re-parse it); ``catalog`` names the distributed dataset it reads
    (:mod:`bob_cache.data.catalog`), where it reads one.
    """

    name: str
    origin: str
    splits: dict[str, list[Sample]]
    class_names: list[str] = field(default_factory=list)
    split_rule: SplitRule = AS_DISTRIBUTED
    catalog: str | None = None

    kind: ClassVar[str] = "abstract"

    @abstractmethod
    def open_image(self, sample: Sample) -> Image.Image:
        """Decode ``sample`` as an RGB image (raises on unreadable data)."""

    def read_bytes(self, sample: Sample) -> bytes | None:
        """The encoded file of ``sample`` (None where images are not files)."""
        return None

    def digest(self, sample: Sample) -> str:
        """Hash of ``sample``'s stored content (its file's bytes); raises if unreadable."""
        data = self.read_bytes(sample)
        if data is None:
            raise NotImplementedError(f"{type(self).__name__} must define digest()")
        return content_digest(data)

    def load(self, sample: Sample) -> tuple[Image.Image, str]:
        """Read ``sample`` once: the decoded RGB image and the digest of the bytes read."""
        data = self.read_bytes(sample)
        if data is None:
            return self.open_image(sample), self.digest(sample)
        from bob_cache.data.images import open_image_file

        return open_image_file(io.BytesIO(data)), content_digest(data)

    def fingerprint_rows(self) -> list[Any]:
        """Per-sample facts that identify the data (overridden to add file sizes)."""
        return [(split, s.id, s.label) for split, rows in self.splits.items() for s in rows]

    def fingerprint(self) -> str:
        """Hash of the kind, class names and every split's rows."""
        return stable_hash([self.kind, self.class_names, self.fingerprint_rows()], length=32)

    def select(self, split: str) -> dict[str, list[Sample]]:
        """The requested split (or every split for ``all``), checked to exist and be non-empty."""
        if split == "all":
            chosen = self.splits
        elif split in self.splits:
            chosen = {split: self.splits[split]}
        else:
            raise DataSourceError(
                f"Split '{split}' is not in dataset '{self.name}'."
                f"{did_you_mean(split, self.splits)} "
                f"Available: {', '.join(self.splits)} (or --split all)."
            )
        if not any(chosen.values()):
            raise DataSourceError(
                f"Dataset '{self.name}' has no images in split(s) {list(chosen)}."
            )
        return chosen

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "kind": self.kind,
            "origin": self.origin,
            "fingerprint": self.fingerprint(),
            "class_names": self.class_names,
            "splits": {k: len(v) for k, v in self.splits.items()},
            "split_rule": self.split_rule.describe(),
            **({"catalog": self.catalog} if self.catalog else {}),
        }


def content_digest(data: bytes | memoryview) -> str:
    """The content hash stored per row: BLAKE2b, 128 bits, hex."""
    return hashlib.blake2b(data, digest_size=16).hexdigest()


def default_name(stem: str) -> str:
    """A store-safe dataset name from a folder or file stem (``My Photos`` → ``My-Photos``)."""
    return _UNSAFE.sub("-", stem).strip("-.") or "dataset"


SourceLoader = Callable[..., DataSource]
_KINDS: list[tuple[str, Callable[[str], bool], SourceLoader]] = []
_PRECEDES: dict[str, str | None] = {}
# The modules that register source kinds, imported on first use (in this order).
SOURCE_MODULES = (
    "builtin", "torchvision_source", "webdataset", "parquet", "imagenet", "revisitop", "ade20k",
    "folder", "manifest", "segfolder",
)  # fmt: skip


def register_source(
    kind: str,
    matches: Callable[[str], bool],
    *,
    before: str | None = None,
    syntax: str = "",
    layout: str = "",
    example: str = "",
) -> Callable[[SourceLoader], SourceLoader]:
    """Decorator: register a loader for data specs that ``matches`` accepts; ``before`` names
    a kind it must be tried ahead of (a more specific folder layout), wherever that one is.
    ``syntax``, ``layout`` and ``example`` describe the kind in ``bob-cache datasets``."""
    from bob_cache.data.catalog import SourceKind, register_kind

    if syntax:
        register_kind(SourceKind(kind, syntax, layout, example))

    def wrap(loader: SourceLoader) -> SourceLoader:
        if any(k == kind for k, _, _ in _KINDS):
            return loader  # the module was imported again
        _KINDS.append((kind, matches, loader))
        _PRECEDES[kind] = before
        return loader

    return wrap


def load_source_modules() -> None:
    """Import every module that registers a source kind."""
    import importlib

    for module in SOURCE_MODULES:
        importlib.import_module(f"bob_cache.data.{module}")


def _ordered_kinds() -> list[tuple[str, Callable[[str], bool], SourceLoader]]:
    """Registration order, except that a kind registered ``before`` another comes just ahead
    of it (first of all when that one is not registered)."""
    order = [k for k in _KINDS if not _PRECEDES.get(k[0])]
    for entry in _KINDS:
        target = _PRECEDES.get(entry[0])
        if target:
            names = [k[0] for k in order]
            order.insert(names.index(target) if target in names else 0, entry)
    return order


def parse_source(
    spec: str,
    *,
    name: str | None = None,
    split: str = "all",
    fractions: SplitFractions | None = None,
) -> DataSource:
    """Turn a ``--data`` value into a listed :class:`DataSource`.

    Args:
        spec: a folder, a ``.csv``/``.jsonl`` manifest, or ``builtin:<name>``.
        name: dataset name (defaults to the folder or manifest stem).
        split: for an unlabelled source without splits, the split its images form.
        fractions: train/val/test fractions for a labelled source without splits
            (:mod:`bob_cache.data.splits`; None: the defaults). Ignored where the source has
            splits of its own.
    """
    load_source_modules()
    for _kind, matches, loader in _ordered_kinds():
        if matches(spec):
            return loader(spec, name=name, split=split, fractions=fractions)
    raise DataNotFoundError(
        f"Data source '{spec}' does not exist. Expected a folder of images (class "
        "sub-folders, optionally under train/ val/ test/), a .csv or .jsonl manifest with "
        "path,label[,split] columns, builtin:digits, or a dataset as it is distributed "
        "(torchvision:NAME:ROOT, WebDataset .tar shards, parquet, imagenet:ROOT, ...). "
        "`bob-cache datasets` lists every kind and the layout it expects."
    )
