"""Segmentation folders (ADE20K style): images to extract, masks for the dense probe.

A folder holding ``images/`` and ``masks/`` is split into train/val/test by id hash (the
masks are its labels; :mod:`bob_cache.data.splits`); a folder whose ``train/``, ``val/`` or
``test/`` sub-folders each hold ``images/`` and ``masks/`` gives those splits (the
synth-shapes layout). Images and masks pair by file stem and class names come from
``classes.json`` (in the folder or its parent), as
:func:`bob_cache.finetune.seg_data.load_seg_folder` reads them.

A distributed layout (:mod:`bob_cache.data.ade20k`) records its image and mask folders per
split under ``dirs`` and, where stored 0 is ignored, ``reduce_zero_label``.

The samples are the images only (label -1, id = the file name inside ``images/``); the class
names (``background`` first) and, under ``segmentation`` in :meth:`SegFolderSource.describe`,
where each split's masks are and the ignore index land in every feature set's provenance, so
the dense probe finds each row's mask with :func:`mask_path` and reads them all, in the
geometry the network saw, with :func:`load_masks`.
"""

from __future__ import annotations

import functools
import os
import zlib
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bob_cache.data.folder import FolderSource
from bob_cache.data.source import (
    AS_DISTRIBUTED,
    SPLIT_NAMES,
    Sample,
    default_name,
    register_source,
)
from bob_cache.data.splits import SplitFractions, split_rows
from bob_cache.errors import AnnotationError, DataNotFoundError, DataSourceError

IMAGES, MASKS, MASK_SUFFIX = "images", "masks", ".png"


@dataclass
class SegFolderSource(FolderSource):
    """Images of a segmentation folder (read as a plain folder's files), with where their
    masks are."""

    segmentation: dict[str, Any] = field(default_factory=dict)

    kind = "segfolder"

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "segmentation": self.segmentation}


def is_seg_folder(spec: str) -> bool:
    """A folder with ``images/`` + ``masks/``, or with split sub-folders that hold them."""
    root = Path(spec).expanduser()
    if not root.is_dir():
        return False
    return _holds_pairs(root) or any(_holds_pairs(root / s) for s in SPLIT_NAMES)


def _holds_pairs(folder: Path) -> bool:
    return (folder / IMAGES).is_dir() and (folder / MASKS).is_dir()


@register_source(
    "segfolder",
    is_seg_folder,
    before="folder",
    syntax="FOLDER",
    layout="images/ + masks/ (PNG class indices, paired by file stem) and classes.json, "
    "optionally under train/ val/ test/.",
    example="data/shapes",
)
def load_seg_source(
    spec: str,
    *,
    name: str | None = None,
    split: str = "all",
    fractions: SplitFractions | None = None,
) -> SegFolderSource:
    """List a segmentation folder (see the module docstring for the layouts)."""
    from bob_cache.finetune.seg_data import load_seg_folder

    root = Path(spec).expanduser().resolve()
    if _holds_pairs(root):
        layout = {"": root}
    else:
        layout = {s: root / s for s in SPLIT_NAMES if (root / s).is_dir()}
        lacking = [s for s, d in layout.items() if not _holds_pairs(d)]
        if lacking:
            raise DataSourceError(
                f"Segmentation folder '{spec}' has split folder(s) {', '.join(lacking)} without "
                f"both {IMAGES}/ and {MASKS}/. Expected each of train/, val/, test/ to hold "
                f"both; add the masks, or point --data at one split folder."
            )
    sets = {s: load_seg_folder(d) for s, d in layout.items()}
    classes = {seg.classes for seg in sets.values()}
    ignores = {seg.ignore_index for seg in sets.values()}
    if len(classes) > 1 or len(ignores) > 1:
        raise DataSourceError(
            f"The splits of '{spec}' disagree on their classes or ignore index ({sorted(classes)}, "
            f"{sorted(ignores)}). Keep one classes.json beside the split folders."
        )
    splits = {
        s: [
            Sample(p.relative_to(seg.root / IMAGES).as_posix(), -1, str(p)) for p in seg.image_paths
        ]
        for s, seg in sets.items()
    }
    rule = AS_DISTRIBUTED
    if "" in splits:  # every image has a mask: the source is labelled
        splits, rule = split_rows(splits[""], split=split, fractions=fractions, labelled=True)
        layout = dict.fromkeys(splits, root)
    segmentation = {
        "root": str(root),
        "splits": {s: d.relative_to(root).as_posix() for s, d in layout.items()},
        "ignore_index": ignores.pop(),
    }
    return SegFolderSource(
        name=name or default_name(root.name),
        origin=str(root),
        splits=splits,
        class_names=list(classes.pop()),
        segmentation=segmentation,
        split_rule=rule,
    )


def mask_path(
    segmentation: dict[str, Any], split: str, sample_id: str, *, root: str | Path | None = None
) -> Path:
    """Where the mask of image ``sample_id`` of ``split`` is.

    Args:
        segmentation: the ``segmentation`` record of a feature set's ``dataset`` provenance.
        split: the split the row belongs to.
        sample_id: the row's id (the image's file name inside ``images/``).
        root: the dataset's folder now, when it moved since extraction (same layout).
    """
    folder = split_folder(segmentation, split, root=root)
    return folder / _dirs(segmentation, split)[MASKS] / f"{Path(sample_id).stem}{MASK_SUFFIX}"


def image_path(
    segmentation: dict[str, Any], split: str, sample_id: str, *, root: str | Path | None = None
) -> Path:
    """Where image ``sample_id`` of ``split`` is (see :func:`mask_path`)."""
    folder = split_folder(segmentation, split, root=root)
    return folder / _dirs(segmentation, split)[IMAGES] / sample_id


def _dirs(segmentation: dict[str, Any], split: str) -> dict[str, str]:
    """The image and mask folders of ``split`` inside its split folder: ``images/`` and
    ``masks/``, unless the record names others (``dirs``: a distributed layout such as
    ADE20K's ``images/training`` and ``annotations/training``)."""
    return segmentation.get("dirs", {}).get(split) or {IMAGES: IMAGES, MASKS: MASKS}


def split_folder(
    segmentation: dict[str, Any], split: str, *, root: str | Path | None = None
) -> Path:
    """The folder holding ``images/`` and ``masks/`` of ``split``."""
    base = Path(root).expanduser() if root is not None else Path(segmentation["root"])
    relative = segmentation["splits"].get(split)
    if relative is None:
        raise DataSourceError(
            f"Split '{split}' was not extracted from segmentation folder "
            f"'{segmentation['root']}' (it has {', '.join(segmentation['splits'])}). Pass one "
            "of those splits."
        )
    return base / relative if relative != "." else base


@dataclass(frozen=True)
class MaskBank:
    """The masks of many rows in the geometry the network saw, zlib-compressed in memory
    (a 224 × 224 mask of a few regions is a few hundred bytes instead of 50 KB)."""

    blobs: tuple[bytes, ...]
    shape: tuple[int, int]
    dtype: str

    def __len__(self) -> int:
        return len(self.blobs)

    def take(self, positions: Sequence[int] | np.ndarray) -> MaskBank:
        """The masks at ``positions``, as a bank of their own."""
        return MaskBank(tuple(self.blobs[int(p)] for p in positions), self.shape, self.dtype)

    def get(self, positions: Sequence[int] | np.ndarray) -> np.ndarray:
        """``(B, h, w)`` int64 labels of the rows at ``positions``."""
        out = np.empty((len(positions), *self.shape), dtype=np.int64)
        for i, p in enumerate(positions):
            raw = np.frombuffer(zlib.decompress(self.blobs[int(p)]), dtype=self.dtype)
            out[i] = raw.reshape(self.shape)
        return out


def load_masks(
    segmentation: dict[str, Any],
    split: str,
    ids: Sequence[str],
    *,
    preprocessing: dict[str, Any],
    num_classes: int,
    root: str | Path | None = None,
    workers: int | None = None,
) -> MaskBank:
    """Read the mask of every row id, check it, and bring it into the network's geometry: the
    resize and crop of ``preprocessing`` (a feature spec's), nearest-neighbour so labels never
    blend. Each mask pixel then lies under the grid position that saw it.

    Raises:
        DataNotFoundError: masks are missing (counted, the first named, with the fix).
        AnnotationError: masks hold values outside the classes, or differ in size from
            their image.
    """
    paths = [mask_path(segmentation, split, i, root=root) for i in ids]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise DataNotFoundError(
            f"{len(missing)} of {len(paths)} rows of split '{split}' have no mask (first: "
            f"{', '.join(missing[:3])}). The feature set records its dataset at "
            f"'{segmentation['root']}'. Fix: restore the masks, or pass --masks DIR where the "
            "dataset lives now (same layout: images/ and masks/ per split)."
        )
    geometry = _mask_geometry(preprocessing)
    ignore = int(segmentation["ignore_index"])
    dtype = "uint8" if max(num_classes - 1, ignore) < 256 else "int32"
    read = functools.partial(
        _read_one, geometry=geometry, num_classes=num_classes, ignore=ignore, dtype=dtype,
        reduce_zero_label=bool(segmentation.get("reduce_zero_label")),
    )  # fmt: skip
    images = [image_path(segmentation, split, i, root=root) for i in ids]
    with ThreadPoolExecutor(max_workers=workers or min(8, os.cpu_count() or 1)) as pool:
        done = list(pool.map(read, paths, images))
    bad = [f"{p} {v[:10]}" for p, (_, _, v) in zip(paths, done, strict=True) if v]
    if bad:
        raise AnnotationError(
            f"{len(bad)} masks of split '{split}' hold values outside the {num_classes} classes "
            f"(0..{num_classes - 1}, ignore {ignore}); first: {', '.join(bad[:3])}. Fix those "
            "masks, or list every class (background excluded) in the dataset's classes.json "
            "and extract again."
        )
    shapes = {shape for _, shape, _ in done}
    if len(shapes) > 1:  # every mask is cropped to the input size, so this means a bug
        raise AnnotationError(f"Masks of split '{split}' came out in several sizes: {shapes}.")
    return MaskBank(tuple(blob for blob, _, _ in done), shapes.pop(), dtype)


def _mask_geometry(preprocessing: dict[str, Any]) -> Callable[[Image.Image], Image.Image]:
    from torchvision.transforms import Compose

    from bob_cache.backbones.backbone import eval_steps

    config = {k: v for k, v in preprocessing.items() if k != "decode"}
    return Compose(eval_steps({**config, "interpolation": "nearest"}))


def _read_one(
    path: Path,
    image: Path,
    *,
    geometry: Callable[[Image.Image], Image.Image],
    num_classes: int,
    ignore: int,
    dtype: str,
    reduce_zero_label: bool = False,
) -> tuple[bytes, tuple[int, int], list[int]]:
    from bob_cache.finetune.seg_data import bad_mask_values, read_mask

    mask = read_mask(path, reduce_zero_label=reduce_zero_label, ignore_index=ignore)
    bad = bad_mask_values(mask, num_classes=num_classes, ignore_index=ignore)
    if image.is_file():  # images may be gone since extraction; masks alone still score
        with Image.open(image) as im:
            if im.size != (mask.shape[1], mask.shape[0]):
                raise AnnotationError(
                    f"{path} is {mask.shape[1]}x{mask.shape[0]} but its image {image} is "
                    f"{im.size[0]}x{im.size[1]} (w x h). Masks must match their image pixel "
                    "for pixel: fix the mask."
                )
    seen = np.asarray(geometry(Image.fromarray(mask.astype(np.int32)))).astype(dtype)
    return zlib.compress(seen.tobytes(), 1), (int(seen.shape[0]), int(seen.shape[1])), bad
