"""Image folders: ImageFolder layout, optionally under ``train/ val/ test/`` split folders.

Class sub-folders give labels (sorted names, shared across splits); images directly inside a
split folder (or a flat folder) are unlabeled. A folder without split sub-folders is split
into train/val/test by id hash, stratified by class (:mod:`bob_cache.data.splits`); one
without class sub-folders (nothing to stratify or score) stays whole, ``train`` unless
``--split`` names another.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from bob_cache.data.images import IMAGE_EXTENSIONS, is_image_file, open_image_file
from bob_cache.data.source import (
    AS_DISTRIBUTED,
    SPLIT_NAMES,
    DataSource,
    Sample,
    default_name,
    register_source,
)
from bob_cache.data.splits import SplitFractions, split_rows
from bob_cache.errors import DataSourceError


@dataclass
class FolderSource(DataSource):
    """Images on a local filesystem; ``location`` is the absolute path."""

    kind = "folder"

    def open_image(self, sample: Sample) -> Image.Image:
        return open_image_file(sample.location)

    def read_bytes(self, sample: Sample) -> bytes | None:
        with open(sample.location, "rb") as f:
            return f.read()

    def fingerprint_rows(self) -> list[Any]:
        return [
            (split, s.id, s.label, os.path.getsize(s.location))
            for split, rows in self.splits.items()
            for s in rows
        ]


@register_source(
    "folder",
    lambda spec: Path(spec).expanduser().is_dir(),
    syntax="FOLDER",
    layout="Class sub-folders of images (ImageFolder), optionally under train/ val/ test/; "
    "without split folders, split by id hash (--split-fractions).",
    example="~/photos",
)
def load_folder(
    spec: str,
    *,
    name: str | None = None,
    split: str = "all",
    fractions: SplitFractions | None = None,
) -> FolderSource:
    """List an image folder (see module docstring for the layouts)."""
    root = Path(spec).expanduser().resolve()
    subdirs = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    split_dirs = [d for d in subdirs if d in SPLIT_NAMES]
    if split_dirs:
        others = [d for d in subdirs if d not in SPLIT_NAMES]
        if others:
            raise DataSourceError(
                f"Folder '{spec}' mixes split folders ({', '.join(split_dirs)}) with other "
                f"folders ({', '.join(others[:5])}). Move class folders under train/, val/ or "
                "test/, or point --data at one split folder."
            )
        layout = {s: root / s for s in split_dirs}
    else:
        layout = {"": root}
    class_names = sorted(
        {
            c.name
            for d in layout.values()
            for c in d.iterdir()
            if c.is_dir() and not c.name.startswith(".")
        }
    )
    index = {c: i for i, c in enumerate(class_names)}
    splits = {s: _list_split(d, root, index) for s, d in layout.items()}
    rule = AS_DISTRIBUTED
    if "" in splits:
        splits, rule = split_rows(splits[""], split=split, fractions=fractions)
    if not any(splits.values()):
        raise DataSourceError(
            f"Folder '{spec}' holds no images. Expected files ending in "
            f"{', '.join(IMAGE_EXTENSIONS[:5])}, ... in class sub-folders, optionally under "
            "train/, val/ and test/."
        )
    return FolderSource(
        name=name or default_name(root.name),
        origin=str(root),
        splits=splits,
        class_names=class_names,
        split_rule=rule,
    )


def _list_split(directory: Path, root: Path, index: dict[str, int]) -> list[Sample]:
    samples = []
    for dirpath, dirnames, filenames in os.walk(directory, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        rel_dir = Path(dirpath).relative_to(directory)
        label = index[rel_dir.parts[0]] if rel_dir.parts else -1
        for filename in sorted(filenames):
            if is_image_file(filename):
                path = Path(dirpath) / filename
                samples.append(Sample(path.relative_to(root).as_posix(), label, str(path)))
    return samples
