"""Semantic segmentation folders, ADE20K style.

A folder holds ``images/`` (``.jpg .jpeg .png .bmp .webp``) and ``masks/`` (single-channel
``.png``: ``L``, ``P`` or 16-bit), paired by file stem. Mask value 0 is background, ``k`` is
class ``k`` and the ignore index (255 by default) marks pixels left out of the loss and metrics.
The label space is ``["background", *classes]``; the classes come from the ``classes`` argument
or from a ``classes.json`` (``{"classes": [...], "background": 0, "ignore_index": 255}``, the
list without background) in the folder or its parent.

A distributed dataset's split is named as a data source (``ade20k:ROOT/train``,
:mod:`bob_cache.data.ade20k`): its own layout and label space, where mask value 0 may be
ignored rather than background (``reduce_zero_label``: 0 becomes the ignore index and ``v``
class ``v - 1``, as mmsegmentation reads ADE20K).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bob_cache.errors import AnnotationError, DataNotFoundError, SpecError, first_few
from bob_cache.finetune.coco_data import resize_image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
MASK_SUFFIX = ".png"
CLASSES_FILE = "classes.json"
DEFAULT_IGNORE_INDEX = 255
DATASET_PREFIXES = ("ade20k:",)  # data sources that name one split of a distributed dataset
_MASK_MODES = ("L", "P", "I", "I;16", "I;16B", "I;16L")
SegTransform = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


@dataclass(frozen=True, eq=False)
class SegSet:
    """Paired image and mask paths of one segmentation folder.

    Attributes:
        root: the folder holding ``images/`` and ``masks/``.
        image_paths: images, sorted by stem.
        mask_paths: the mask of each image.
        classes: the label space, ``"background"`` first.
        ignore_index: mask value left out of loss and metrics.
        reduce_zero_label: stored value 0 is ignored and ``v`` is class ``v - 1``.
    """

    root: Path
    image_paths: tuple[Path, ...]
    mask_paths: tuple[Path, ...]
    classes: tuple[str, ...]
    ignore_index: int
    reduce_zero_label: bool = False

    def __len__(self) -> int:
        return len(self.image_paths)

    @property
    def num_classes(self) -> int:
        """Classes including background."""
        return len(self.classes)


def load_seg_folder(
    path: str | Path, *, classes: Sequence[str] | None = None, ignore_index: int | None = None
) -> SegSet:
    """Pair a folder's images and masks and resolve its classes.

    Args:
        path: folder with ``images/`` and ``masks/`` sub-folders, or a distributed dataset's
            split named as a data source (``ade20k:ROOT/train``).
        classes: class names WITHOUT background (``--classes a,b,c``); default ``classes.json``.
        ignore_index: mask value to ignore; default the ``classes.json`` value, else 255.
    """
    if str(path).startswith(DATASET_PREFIXES):
        from bob_cache.data.ade20k import load_ade20k_split

        return load_ade20k_split(str(path), classes=classes, ignore_index=ignore_index)
    root = Path(path)
    folders = {name: root / name for name in ("images", "masks")}
    missing = [str(f) for f in folders.values() if not f.is_dir()]
    if missing:
        raise DataNotFoundError(
            f"Expected a segmentation folder with images/ and masks/ sub-folders at {root}; "
            f"missing: {', '.join(missing)}. Point --data at the folder holding both "
            "(e.g. train/ of a synth-shapes dataset)."
        )
    names, ignore = _resolve_classes(root, classes, ignore_index)
    image_paths, mask_paths = pair_by_stem(root, folders["images"], folders["masks"])
    return SegSet(
        root=root,
        image_paths=image_paths,
        mask_paths=mask_paths,
        classes=("background", *names),
        ignore_index=ignore,
    )


def pair_by_stem(
    root: Path, images: Path, masks: Path
) -> tuple[tuple[Path, ...], tuple[Path, ...]]:
    """The images of folder ``images`` sorted by stem, and the mask of each from ``masks``.

    Raises:
        DataNotFoundError: no images.
        AnnotationError: a stem occurs twice, or an image has no mask (or a mask no image).
    """
    found = _by_stem(images, IMAGE_SUFFIXES)
    paired = _by_stem(masks, (MASK_SUFFIX,))
    _check_pairs(root, found, paired, images_dir=images)
    stems = sorted(found)
    return tuple(found[s] for s in stems), tuple(paired[s] for s in stems)


def split_seg_set(seg: SegSet, split: str, fractions: Any) -> SegSet:
    """The ``split`` part of a folder without split folders, by the id-hash rule
    (:mod:`bob_cache.data.splits`): the same images the dense probe's feature sets of that
    folder hold as ``split``."""
    from bob_cache.data.source import Sample
    from bob_cache.data.splits import split_rows

    ids = [p.relative_to(seg.root / "images").as_posix() for p in seg.image_paths]
    rows = [Sample(i, -1, n) for n, i in enumerate(ids)]
    parts, rule = split_rows(rows, split="all", fractions=fractions, labelled=True)
    keep = [s.location for s in parts.get(split, [])]
    if not keep:
        raise SpecError(
            f"Splitting {seg.root} by id hash ({rule.text}) leaves no {split} images: it has "
            f"{len(ids)}. Add images, pass other --split-fractions, or give --{split} a folder "
            "of its own."
        )
    return replace(seg, image_paths=tuple(seg.image_paths[i] for i in keep),
                   mask_paths=tuple(seg.mask_paths[i] for i in keep))  # fmt: skip


def _resolve_classes(
    root: Path, classes: Sequence[str] | None, ignore_index: int | None
) -> tuple[list[str], int]:
    info: dict[str, Any] = {}
    if classes is None:
        found = [p for p in (root / CLASSES_FILE, root.parent / CLASSES_FILE) if p.is_file()]
        if not found:
            raise AnnotationError(
                f"No class names for {root}: no --classes given and no {CLASSES_FILE} in the "
                f"folder or its parent. Pass --classes a,b,c (without background) or write "
                f'{root / CLASSES_FILE} as {{"classes": ["a", "b", "c"], "background": 0, '
                '"ignore_index": 255}.'
            )
        info = _read_classes_file(found[0])
        classes = info["classes"]
    names = [str(c) for c in classes]
    if not names or len(set(names)) != len(names):
        raise SpecError(
            f"Expected one or more distinct class names (without background), got {names}. "
            "Pass --classes a,b,c with each name once."
        )
    ignore = ignore_index if ignore_index is not None else info.get("ignore_index")
    ignore = DEFAULT_IGNORE_INDEX if ignore is None else int(ignore)
    if 0 <= ignore <= len(names):
        raise SpecError(
            f"ignore_index {ignore} is a class label (0..{len(names)} are background and the "
            f"{len(names)} classes). Use a value outside them, e.g. 255."
        )
    return names, ignore


def _read_classes_file(path: Path) -> dict[str, Any]:
    try:
        info = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AnnotationError(f"{path} is not valid JSON ({exc}). Fix or rewrite it.") from exc
    if not isinstance(info, dict) or not isinstance(info.get("classes"), list):
        raise AnnotationError(
            f'{path} has no "classes" list; expected {{"classes": ["a", "b"], "background": 0, '
            '"ignore_index": 255}. Fix the file or pass --classes a,b.'
        )
    if info.get("background", 0) != 0:
        raise AnnotationError(
            f"{path} sets background to {info['background']}; only background 0 is supported. "
            "Remap the masks so background is 0."
        )
    return info


def _by_stem(folder: Path, suffixes: tuple[str, ...]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    clashes: list[str] = []
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in suffixes:
            if p.stem in found:
                clashes.append(p.stem)
            found[p.stem] = p
    if clashes:
        raise AnnotationError(
            f"{len(clashes)} file stems occur twice in {folder} (first: {first_few(clashes)}), so "
            "masks cannot be paired by stem. Keep one file per stem."
        )
    return found


def _check_pairs(
    root: Path, images: dict[str, Path], masks: dict[str, Path], *, images_dir: Path | None = None
) -> None:
    if not images:
        raise DataNotFoundError(
            f"No images ({' '.join(IMAGE_SUFFIXES)}) in {images_dir or root / 'images'}. "
            "Put the images there, or point --data at the right folder."
        )
    no_mask = [str(images[s]) for s in sorted(images.keys() - masks.keys())]
    no_image = [str(masks[s]) for s in sorted(masks.keys() - images.keys())]
    for orphans, what, fix in (
        (no_mask, "images have no mask", f"add masks/<stem>{MASK_SUFFIX} for each"),
        (no_image, "masks have no image", "add the images or remove those masks"),
    ):
        if orphans:
            raise AnnotationError(
                f"{len(orphans)} {what} of the same stem in {root} (first: {first_few(orphans)}). "
                f"Images and masks pair by file stem: {fix}."
            )


def read_mask(
    path: Path, *, reduce_zero_label: bool = False, ignore_index: int = DEFAULT_IGNORE_INDEX
) -> np.ndarray:
    """A mask file as an int64 H x W array of labels (with ``reduce_zero_label``, stored 0
    becomes ``ignore_index`` and ``v`` becomes ``v - 1``)."""
    with Image.open(path) as im:
        if im.mode not in _MASK_MODES:
            raise AnnotationError(
                f"{path} is a {im.mode} image; expected a single-channel label mask (L, P or "
                "16-bit). Save masks as class indices, not colours."
            )
        mask = np.asarray(im).astype(np.int64)
    if reduce_zero_label:
        zero = mask == 0
        mask -= 1
        mask[zero] = ignore_index
    return mask


def read_set_mask(segset: SegSet, path: Path) -> np.ndarray:
    """A mask of ``segset`` in its label space."""
    return read_mask(
        path, reduce_zero_label=segset.reduce_zero_label, ignore_index=segset.ignore_index
    )


def bad_mask_values(mask: np.ndarray, *, num_classes: int, ignore_index: int) -> list[int]:
    """Values of a mask that are neither a class label nor the ignore index."""
    values = np.unique(mask)
    bad = values[((values < 0) | (values >= num_classes)) & (values != ignore_index)]
    return [int(v) for v in bad]


def _bad_values_error(path: Path, bad: list[int], segset: SegSet) -> AnnotationError:
    return AnnotationError(
        f"{path} holds values {bad[:10]} outside the {segset.num_classes} classes "
        f"(0..{segset.num_classes - 1}, ignore {segset.ignore_index}). Fix the mask, or pass "
        "the full class list (--classes or classes.json, without background)."
    )


def check_masks(segset: SegSet) -> None:
    """Scan every mask once: values in the label space, size equal to its image's."""
    bad_files: list[str] = []
    for image_path, mask_path in zip(segset.image_paths, segset.mask_paths, strict=True):
        mask = read_set_mask(segset, mask_path)
        bad = bad_mask_values(
            mask, num_classes=segset.num_classes, ignore_index=segset.ignore_index
        )
        if bad:
            bad_files.append(f"{mask_path} {bad[:10]}")
        with Image.open(image_path) as im:
            size = im.size
        if mask.shape != (size[1], size[0]):
            raise _size_error(image_path, mask_path, size, mask.shape)
    if bad_files:
        raise AnnotationError(
            f"{len(bad_files)} masks hold values outside the {segset.num_classes} classes "
            f"(0..{segset.num_classes - 1}, ignore {segset.ignore_index}); first: "
            f"{first_few(bad_files)}. Fix those masks, or pass the full class list (--classes or "
            "classes.json, without background)."
        )


def _size_error(
    image_path: Path, mask_path: Path, size: tuple[int, int], shape: tuple[int, ...]
) -> AnnotationError:
    return AnnotationError(
        f"{mask_path} is {shape[1]}x{shape[0]} but its image {image_path} is "
        f"{size[0]}x{size[1]} (w x h). Masks must match their image pixel for pixel."
    )


class SegDataset(torch.utils.data.Dataset):
    """``(uint8 C x H x W RGB image, int64 H x W mask)`` pairs over a :class:`SegSet`.

    Args:
        segset: the loaded folder.
        transform: optional ``(image, mask) -> (image, mask)``, e.g. :func:`resize_seg_pair`.
        check_values: check each mask's values as it is read (False where
            :func:`check_masks` already scanned them all).
    """

    def __init__(
        self, segset: SegSet, *, transform: SegTransform | None = None, check_values: bool = True
    ) -> None:
        self.segset = segset
        self.transform = transform
        self.check_values = check_values

    def __len__(self) -> int:
        return len(self.segset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        image_path = self.segset.image_paths[index]
        mask_path = self.segset.mask_paths[index]
        with Image.open(image_path) as im:
            image = np.asarray(im.convert("RGB"))
        mask = read_set_mask(self.segset, mask_path)
        if mask.shape != image.shape[:2]:
            raise _size_error(image_path, mask_path, (image.shape[1], image.shape[0]), mask.shape)
        if self.check_values and (
            bad := bad_mask_values(
                mask, num_classes=self.segset.num_classes, ignore_index=self.segset.ignore_index
            )
        ):
            raise _bad_values_error(mask_path, bad, self.segset)
        pair = (
            torch.from_numpy(image.copy()).permute(2, 0, 1).contiguous(),
            torch.from_numpy(mask),
        )
        return self.transform(*pair) if self.transform is not None else pair


def resize_seg_pair(
    image: torch.Tensor, mask: torch.Tensor, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize to ``size x size``: bilinear image, nearest mask (labels never blend)."""
    mask = torch.nn.functional.interpolate(
        mask[None, None].float(), size=(size, size), mode="nearest-exact"
    )[0, 0]
    return resize_image(image, size), mask.to(torch.int64)


def horizontal_flip_seg(
    image: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mirror an image and its mask left-right."""
    return image.flip(-1), mask.flip(-1)
