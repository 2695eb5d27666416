"""COCO instances files as torchvision detection data.

:func:`load_coco` parses and checks a COCO instances json once; :class:`CocoDetectionDataset`
serves ``(image, target)`` pairs in the form torchvision's Faster/Mask R-CNN take. Category ids
map to contiguous labels ``1..K`` in sorted id order (label 0 is torchvision's background).
Boxes are clipped to the image; crowd boxes, boxes fully outside the image and boxes with no
area are dropped for training and counted, while :attr:`CocoSet.coco` keeps the original file
so that evaluation scores against the exact ground truth. Pixels are read as stored: the EXIF
orientation is ignored, as the COCO tools do.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from bob_cache.errors import AnnotationError, DataNotFoundError, first_few
from bob_cache.extras import require

DROP_REASONS = ("crowd", "outside", "zero_area")
REQUIRED_KEYS = ("images", "annotations", "categories")
Target = dict[str, Any]
Transform = Callable[[torch.Tensor, Target], tuple[torch.Tensor, Target]]


@dataclass(frozen=True, eq=False)
class CocoSet:
    """A checked COCO instances file; per-image arrays hold the annotations kept for training.

    Attributes:
        coco: the pycocotools ``COCO`` object of the original file (evaluation ground truth).
        image_ids: COCO image ids, in the file's order.
        paths: resolved image paths, aligned with ``image_ids``.
        sizes: ``(height, width)`` per image, from the file.
        categories: category names of labels ``1..K`` (``categories[label - 1]``).
        label_to_cat: contiguous label -> COCO category id.
        cat_to_label: COCO category id -> contiguous label.
        dropped: annotations left out of training, per reason (``crowd``, ``outside``,
            ``zero_area``).
        empty_images: images that kept no annotation (they stay, with empty targets).
        masks: whether targets carry instance masks.
        boxes: per image, float32 ``N x 4`` xyxy boxes clipped to the image.
        labels: per image, int64 labels.
        ann_ids: per image, the COCO annotation ids of the kept boxes.
    """

    coco: Any
    image_ids: tuple[int, ...]
    paths: tuple[Path, ...]
    sizes: tuple[tuple[int, int], ...]
    categories: tuple[str, ...]
    label_to_cat: dict[int, int]
    cat_to_label: dict[int, int]
    dropped: dict[str, int]
    empty_images: int
    masks: bool
    boxes: tuple[np.ndarray, ...]
    labels: tuple[np.ndarray, ...]
    ann_ids: tuple[np.ndarray, ...]

    def __len__(self) -> int:
        return len(self.image_ids)

    @property
    def num_classes(self) -> int:
        """Classes including background, as torchvision's ``num_classes`` wants."""
        return len(self.categories) + 1


def load_coco(path: str | Path, *, images: str | Path | None = None, masks: bool) -> CocoSet:
    """Load and check a COCO instances json.

    Args:
        path: the json file.
        images: folder that image ``file_name`` values resolve against; default the json's folder.
        masks: whether instance masks are needed (every annotation must have a segmentation).

    Missing ``iscrowd`` values default to 0 and missing ``area`` values to the box area, written
    into :attr:`CocoSet.coco` so that ``COCOeval`` can run on the file.
    """
    require("finetune", "Detection and instance segmentation (COCO annotations)")
    path = Path(path)
    data = _read_json(path)
    _check_images(data["images"], path)
    cat_ids = _check_categories(data["categories"], path)
    _check_annotations(data["annotations"], data, path, masks=masks)
    coco = _make_coco(data)
    root = Path(images) if images is not None else path.parent
    image_ids = tuple(int(img["id"]) for img in data["images"])
    paths = tuple(root / coco.imgs[i]["file_name"] for i in image_ids)
    _check_files(paths, path, images)
    cat_to_label = {cat: label for label, cat in enumerate(cat_ids, start=1)}
    dropped = dict.fromkeys(DROP_REASONS, 0)
    boxes, labels, ann_ids = [], [], []
    for image_id in image_ids:
        kept = _keep_annotations(coco, image_id, cat_to_label, dropped)
        boxes.append(kept[0])
        labels.append(kept[1])
        ann_ids.append(kept[2])
    return CocoSet(
        coco=coco,
        image_ids=image_ids,
        paths=paths,
        sizes=tuple((int(coco.imgs[i]["height"]), int(coco.imgs[i]["width"])) for i in image_ids),
        categories=tuple(str(coco.cats[c].get("name", c)) for c in cat_ids),
        label_to_cat={label: cat for cat, label in cat_to_label.items()},
        cat_to_label=cat_to_label,
        dropped=dropped,
        empty_images=sum(len(a) == 0 for a in ann_ids),
        masks=masks,
        boxes=tuple(boxes),
        labels=tuple(labels),
        ann_ids=tuple(ann_ids),
    )


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        what = "a folder" if path.is_dir() else "nothing"
        raise DataNotFoundError(
            f"Expected a COCO instances json at {path}, found {what}. "
            "Pass the path of an existing annotation file (e.g. instances_val2017.json)."
        )
    try:
        data = json.loads(path.read_bytes())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise AnnotationError(
            f"{path} is not valid JSON ({exc}). Expected a COCO instances file; "
            "pass the annotations json, not an image or a results file."
        ) from exc
    if not isinstance(data, dict):
        raise AnnotationError(
            f"{path} holds a JSON {type(data).__name__}, expected a COCO instances file (an "
            "object with 'images', 'annotations', 'categories'). A list is a results file; "
            "pass the ground-truth annotations instead."
        )
    missing = [key for key in REQUIRED_KEYS if not isinstance(data.get(key), list)]
    if missing:
        raise AnnotationError(
            f"{path} lacks the list(s) {', '.join(repr(k) for k in missing)}: expected a COCO "
            "instances file with 'images', 'annotations' and 'categories' lists. Pass an "
            "instances_*.json file (captions and keypoints-only files will not do)."
        )
    return data


def _check_images(entries: list[Any], path: Path) -> None:
    bad, seen, dupes = [], set(), []
    for img in entries:
        ok = isinstance(img, dict) and "id" in img and isinstance(img.get("file_name"), str)
        ok = ok and all(isinstance(img.get(k), int) and img[k] > 0 for k in ("width", "height"))
        if not ok:
            bad.append(img.get("id", "?") if isinstance(img, dict) else repr(img)[:40])
        elif img["id"] in seen:
            dupes.append(img["id"])
        else:
            seen.add(img["id"])
    if bad:
        raise AnnotationError(
            f"{len(bad)} image entries in {path} lack an id, a file_name or a positive integer "
            f"width/height (first ids: {first_few(bad)}). Add them to every entry of 'images'."
        )
    if dupes:
        raise AnnotationError(
            f"{len(dupes)} duplicate image ids in {path} (first: {first_few(dupes)}). "
            "Each entry of 'images' needs its own id."
        )


def _check_categories(entries: list[Any], path: Path) -> list[int]:
    ids = [c.get("id") for c in entries if isinstance(c, dict)]
    if not ids or len(ids) != len(entries) or not all(isinstance(i, int) for i in ids):
        raise AnnotationError(
            f"{path} has {len(entries)} categories, expected at least one and each with an "
            "integer 'id' (and a 'name'). Fix the 'categories' list."
        )
    if len(set(ids)) != len(ids):
        raise AnnotationError(f"{path} repeats category ids; each category needs its own id.")
    return sorted(ids)


def _check_annotations(anns: list[Any], data: dict[str, Any], path: Path, *, masks: bool) -> None:
    """Check the fields training and evaluation use; fill default iscrowd/area."""
    image_ids = {img["id"] for img in data["images"]}
    cat_ids = {cat["id"] for cat in data["categories"]}
    problems: dict[str, list[Any]] = {}
    seen: set[Any] = set()
    for ann in anns:
        problem = _annotation_problem(ann, image_ids, cat_ids, seen, masks=masks)
        if problem:
            problems.setdefault(problem, []).append(ann.get("id", "?"))
            continue
        seen.add(ann["id"])
        ann.setdefault("iscrowd", 0)
        ann.setdefault("area", float(ann["bbox"][2]) * float(ann["bbox"][3]))
    if problems:
        detail = "; ".join(
            f"{len(ids)} {what} (ids {first_few(ids)})" for what, ids in problems.items()
        )
        fix = "Fix or remove those annotations"
        if "without a segmentation" in problems:
            fix += ", or train boxes only (no masks)"
        raise AnnotationError(f"Unusable annotations in {path}: {detail}. {fix}.")


def _annotation_problem(
    ann: Any, image_ids: set[Any], cat_ids: set[Any], seen: set[Any], *, masks: bool
) -> str | None:
    if not isinstance(ann, dict) or "id" not in ann:
        return "without an id"
    if ann["id"] in seen:
        return "with a duplicate id"
    if ann.get("image_id") not in image_ids:
        return "naming an image id not in 'images'"
    if ann.get("category_id") not in cat_ids:
        return "naming a category id not in 'categories'"
    bbox = ann.get("bbox")
    if not isinstance(bbox, list) or len(bbox) != 4 or not all(_is_number(v) for v in bbox):
        return "without a bbox of 4 numbers [x, y, w, h]"
    if masks:
        return _segmentation_problem(ann.get("segmentation"))
    return None


def _segmentation_problem(segm: Any) -> str | None:
    if not segm:
        return "without a segmentation"
    if isinstance(segm, dict):
        return None if "counts" in segm and "size" in segm else "with an RLE lacking counts/size"
    polys_ok = isinstance(segm, list) and all(
        isinstance(p, list) and len(p) >= 6 and len(p) % 2 == 0 for p in segm
    )
    return None if polys_ok else "with a polygon of fewer than 3 points or an odd length"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and np.isfinite(value)


def _make_coco(data: dict[str, Any]) -> Any:
    from pycocotools.coco import COCO

    with contextlib.redirect_stdout(io.StringIO()):
        coco = COCO()
        coco.dataset = data
        coco.createIndex()
    return coco


def _check_files(paths: tuple[Path, ...], path: Path, images: str | Path | None) -> None:
    missing = [p for p in paths if not p.is_file()]
    if not missing:
        return
    where = (
        f"the --images folder {images}"
        if images is not None
        else f"the json's folder {path.parent}"
    )
    raise AnnotationError(
        f"{len(missing)} of {len(paths)} images listed in {path} are missing (file_name resolves "
        f"against {where}); first: {first_few([str(p) for p in missing])}. "
        "Pass --images DIR with the folder the file_name values are relative to."
    )


def _keep_annotations(
    coco: Any, image_id: int, cat_to_label: dict[int, int], dropped: dict[str, int]
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    img = coco.imgs[image_id]
    boxes, labels, ids = [], [], []
    for ann in coco.imgToAnns.get(image_id, []):
        reason, box = clip_box(ann["bbox"], width=img["width"], height=img["height"])
        if ann.get("iscrowd", 0):
            reason = "crowd"
        if reason:
            dropped[reason] += 1
            continue
        boxes.append(box)
        labels.append(cat_to_label[ann["category_id"]])
        ids.append(ann["id"])
    return (
        np.asarray(boxes, dtype=np.float32).reshape(-1, 4),
        np.asarray(labels, dtype=np.int64),
        np.asarray(ids, dtype=np.int64),
    )


def clip_box(bbox: list[float], *, width: float, height: float) -> tuple[str | None, list[float]]:
    """COCO ``[x, y, w, h]`` -> ``(drop reason or None, xyxy clipped to the image)``."""
    x, y, w, h = (float(v) for v in bbox)
    if w <= 0 or h <= 0:
        return "zero_area", []
    x1, y1, x2, y2 = x, y, x + w, y + h
    if x1 >= width or y1 >= height or x2 <= 0 or y2 <= 0:
        return "outside", []
    return None, [max(x1, 0.0), max(y1, 0.0), min(x2, float(width)), min(y2, float(height))]


class CocoDetectionDataset(torch.utils.data.Dataset):
    """``(uint8 C x H x W RGB image, target)`` pairs over a :class:`CocoSet`.

    The target has ``boxes`` (float32 N x 4 xyxy), ``labels`` (int64), ``image_id`` (int),
    ``area`` (float32, the file's area), ``iscrowd`` (int64, zeros) and, when the set was
    loaded with ``masks=True``, ``masks`` (uint8 N x H x W from ``COCO.annToMask``).

    Args:
        cocoset: the loaded file.
        transform: optional ``(image, target) -> (image, target)``, e.g. :func:`resize_pair`.
    """

    def __init__(self, cocoset: CocoSet, *, transform: Transform | None = None) -> None:
        self.cocoset = cocoset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.cocoset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, Target]:
        image = self._read_image(index)
        target = self.target(index)
        if self.transform is not None:
            image, target = self.transform(image, target)
        return image, target

    def _read_image(self, index: int) -> torch.Tensor:
        path = self.cocoset.paths[index]
        with Image.open(path) as im:
            array = np.asarray(im.convert("RGB"))
        height, width = self.cocoset.sizes[index]
        if array.shape[:2] != (height, width):
            raise AnnotationError(
                f"{path} is {array.shape[1]}x{array.shape[0]} (w x h) but the COCO file says "
                f"{width}x{height}. Fix the width/height of image id "
                f"{self.cocoset.image_ids[index]} or replace the image."
            )
        return torch.from_numpy(array.copy()).permute(2, 0, 1).contiguous()

    def target(self, index: int) -> Target:
        """The target of one image, without reading the image."""
        cs = self.cocoset
        anns = [cs.coco.anns[int(a)] for a in cs.ann_ids[index]]
        target: Target = {
            "boxes": torch.from_numpy(cs.boxes[index].copy()),
            "labels": torch.from_numpy(cs.labels[index].copy()),
            "image_id": int(cs.image_ids[index]),
            "area": torch.tensor([float(a["area"]) for a in anns], dtype=torch.float32),
            "iscrowd": torch.zeros(len(anns), dtype=torch.int64),
        }
        if cs.masks:
            height, width = cs.sizes[index]
            masks = [cs.coco.annToMask(a) for a in anns]
            stacked = np.stack(masks) if masks else np.zeros((0, height, width), np.uint8)
            target["masks"] = torch.from_numpy(stacked.astype(np.uint8))
        return target


def collate_detection(
    batch: list[tuple[torch.Tensor, Target]],
) -> tuple[list[torch.Tensor], list[Target]]:
    """Batch of pairs -> ``(images, targets)`` lists (detection images differ in size)."""
    return [image for image, _ in batch], [target for _, target in batch]


def resize_image(image: torch.Tensor, size: int) -> torch.Tensor:
    """A uint8 ``C x H x W`` image resized to ``size x size`` (bilinear, antialiased)."""
    resized = torch.nn.functional.interpolate(
        image[None].float(), size=(size, size), mode="bilinear", align_corners=False, antialias=True
    )
    return resized[0].round().clamp(0, 255).to(torch.uint8)


def resize_pair(image: torch.Tensor, target: Target, size: int) -> tuple[torch.Tensor, Target]:
    """Resize to ``size x size``: bilinear image, boxes and area scaled, nearest masks.

    The target gains ``orig_size`` ``(height, width)`` (kept when already set), so predictions
    can be scaled back by ``(width / size, height / size)``.
    """
    height, width = image.shape[-2:]
    sx, sy = size / width, size / height
    out = dict(target)
    out.setdefault("orig_size", (int(height), int(width)))
    out["boxes"] = target["boxes"] * torch.tensor([sx, sy, sx, sy], dtype=torch.float32)
    if "area" in target:
        out["area"] = target["area"] * (sx * sy)
    if "masks" in target:
        masks = target["masks"][None].float()
        if masks.shape[1] == 0:
            out["masks"] = target["masks"].new_zeros((0, size, size))
        else:
            scaled = torch.nn.functional.interpolate(masks, size=(size, size), mode="nearest-exact")
            out["masks"] = scaled[0].to(target["masks"].dtype)
    return resize_image(image, size), out


def horizontal_flip(image: torch.Tensor, target: Target) -> tuple[torch.Tensor, Target]:
    """Mirror left-right: the image, the boxes (``x -> width - x``) and the masks."""
    width = image.shape[-1]
    out = dict(target)
    boxes = target["boxes"]
    out["boxes"] = torch.stack(
        [width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], 1
    )
    if "masks" in target:
        out["masks"] = target["masks"].flip(-1)
    return image.flip(-1), out
