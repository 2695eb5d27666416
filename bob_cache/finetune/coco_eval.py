"""COCO box and mask AP with pycocotools, on the original ground truth.

:func:`to_coco_results` turns torchvision detection outputs into COCO result dicts,
:func:`evaluate_coco` scores them with ``COCO.loadRes`` + ``COCOeval`` and returns exactly the
numbers of ``COCOeval.stats``, and :func:`write_results` saves them so that anyone can rescore
them with pycocotools.

pycocotools details handled here: ``loadRes`` fails on an empty list (an empty result set is
built by hand and scored, giving 0 where there is ground truth); it adds ``id``/``area``/
``iscrowd`` to the dicts it gets (a copy is passed); and when a result holds both ``bbox`` and
``segmentation`` it takes the box area as the instance area, so mask results are passed without
their boxes (as detectron2 does) to keep the small/medium/large split on mask areas.
"""

from __future__ import annotations

import contextlib
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bob_cache.errors import AnnotationError, SpecError
from bob_cache.stores.atomic import write_text

IOU_TYPES = ("bbox", "segm")
STAT_NAMES = (
    "AP", "AP50", "AP75", "APs", "APm", "APl",
    "AR1", "AR10", "AR100", "ARs", "ARm", "ARl",
)  # fmt: skip


def _numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def to_coco_results(
    outputs: Sequence[Mapping[str, Any]],
    *,
    image_ids: Sequence[int],
    label_to_cat: Mapping[int, int],
    scale: Sequence[tuple[float, float]] | None = None,
    masks: bool = False,
    mask_threshold: float = 0.5,
) -> list[dict[str, Any]]:
    """Torchvision detection outputs -> COCO result dicts.

    Args:
        outputs: per image, a dict with ``boxes`` (N x 4 xyxy), ``labels``, ``scores`` and, for
            masks, ``masks`` (N x 1 x H x W probabilities). The masks must already be at the
            ORIGINAL image size: the caller resizes them back (e.g. bilinear on the
            probabilities) before calling; only boxes are scaled here.
        image_ids: the COCO image id of each output.
        label_to_cat: contiguous label -> COCO category id (``CocoSet.label_to_cat``).
        scale: per image ``(sx, sy)`` multiplying box x and y coordinates back to original
            pixels (``original width / model input width``, ...); None when the model saw the
            original size.
        masks: also encode masks (``masks > mask_threshold``) as compressed RLE.
        mask_threshold: probability above which a pixel belongs to the instance.

    Returns:
        Dicts with ``image_id``, ``category_id``, ``bbox`` ``[x, y, w, h]``, ``score`` and,
        with masks, ``segmentation`` (RLE whose ``counts`` is a str, so it is JSON-ready).
    """
    if len(outputs) != len(image_ids) or (scale is not None and len(scale) != len(outputs)):
        n_scale = "no" if scale is None else len(scale)
        raise SpecError(
            f"Got {len(outputs)} outputs, {len(image_ids)} image ids and {n_scale} scales; "
            "expected one of each per image. Pass them in the same order as the images."
        )
    results: list[dict[str, Any]] = []
    for i, (output, image_id) in enumerate(zip(outputs, image_ids, strict=True)):
        sx, sy = (1.0, 1.0) if scale is None else scale[i]
        results.extend(
            _image_results(
                output,
                image_id=int(image_id),
                label_to_cat=label_to_cat,
                factors=np.array([sx, sy, sx, sy], dtype=np.float64),
                masks=masks,
                mask_threshold=mask_threshold,
            )
        )
    return results


def _image_results(
    output: Mapping[str, Any],
    *,
    image_id: int,
    label_to_cat: Mapping[int, int],
    factors: np.ndarray,
    masks: bool,
    mask_threshold: float,
) -> list[dict[str, Any]]:
    boxes = _numpy(output["boxes"]).astype(np.float64).reshape(-1, 4) * factors
    labels = _numpy(output["labels"]).reshape(-1)
    scores = _numpy(output["scores"]).astype(np.float64).reshape(-1)
    unknown = sorted({int(v) for v in labels} - {int(k) for k in label_to_cat})
    if unknown:
        raise SpecError(
            f"Predicted labels {unknown} for image {image_id} have no COCO category; expected "
            f"labels in {sorted(label_to_cat)}. Build the model with num_classes = "
            "number of categories + 1 (background)."
        )
    rles = _encode_masks(output, mask_threshold) if masks else None
    results = []
    for j, (x1, y1, x2, y2) in enumerate(boxes):
        result = {
            "image_id": image_id,
            "category_id": int(label_to_cat[int(labels[j])]),
            "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
            "score": float(scores[j]),
        }
        if rles is not None:
            result["segmentation"] = rles[j]
        results.append(result)
    return results


def _encode_masks(output: Mapping[str, Any], threshold: float) -> list[dict[str, Any]]:
    from pycocotools import mask as mask_utils

    if "masks" not in output:
        raise SpecError(
            "masks=True but the detection output has no 'masks'; use a Mask R-CNN model or "
            "pass masks=False."
        )
    probs = _numpy(output["masks"])
    if probs.ndim == 4:
        probs = probs[:, 0]
    binary = np.asfortranarray((probs > threshold).transpose(1, 2, 0).astype(np.uint8))
    rles = mask_utils.encode(binary) if binary.shape[2] else []
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return list(rles)


def evaluate_coco(
    coco_gt: Any,
    results: Sequence[Mapping[str, Any]],
    *,
    iou_types: Sequence[str] = ("bbox",),
    image_ids: Sequence[int] | None = None,
) -> dict[str, float]:
    """Score COCO results against a ground truth with pycocotools' ``COCOeval``.

    Args:
        coco_gt: the ground truth ``COCO`` object (``CocoSet.coco``).
        results: COCO result dicts (:func:`to_coco_results`); may be empty.
        iou_types: ``"bbox"`` and/or ``"segm"``.
        image_ids: restrict scoring to these images; default all images of the ground truth.

    Returns:
        ``{iou_type}_{name}`` for AP, AP50, AP75, APs, APm, APl (``stats[0..5]``) and AR1, AR10,
        AR100, ARs, ARm, ARl (``stats[6..11]``), exactly as pycocotools computes them: -1 means
        no ground truth in that area range (it is not replaced or averaged away).
    """
    unknown_types = [t for t in iou_types if t not in IOU_TYPES]
    if unknown_types or not iou_types:
        raise SpecError(
            f"iou_types {list(iou_types)} are not supported; expected 'bbox' and/or 'segm'."
        )
    _check_results(coco_gt, results, iou_types)
    metrics: dict[str, float] = {}
    for iou_type in iou_types:
        stats = _run_cocoeval(coco_gt, results_for(results, iou_type), iou_type, image_ids)
        metrics.update(
            {f"{iou_type}_{n}": float(v) for n, v in zip(STAT_NAMES, stats, strict=True)}
        )
    return metrics


def _check_results(
    coco_gt: Any, results: Sequence[Mapping[str, Any]], iou_types: Sequence[str]
) -> None:
    needed = {"bbox": "bbox", "segm": "segmentation"}
    for iou_type in iou_types:
        lacking = sum(needed[iou_type] not in r for r in results)
        if lacking:
            raise SpecError(
                f"{lacking} results lack '{needed[iou_type]}', needed for {iou_type} AP. "
                "Build them with to_coco_results(..., masks=True) for 'segm'."
            )
    unknown = sorted({r["image_id"] for r in results} - set(coco_gt.getImgIds()))
    if unknown:
        raise AnnotationError(
            f"{len(unknown)} result image ids are not in the ground truth (first: {unknown[:5]}). "
            "Score results against the COCO file their images came from."
        )
    for r in results if "segm" in iou_types else ():
        img = coco_gt.imgs[r["image_id"]]
        if list(r["segmentation"]["size"]) != [img["height"], img["width"]]:
            raise SpecError(
                f"A mask for image {r['image_id']} is {r['segmentation']['size']} (h, w), the "
                f"image is {[img['height'], img['width']]}. Resize masks back to the original "
                "image size before to_coco_results."
            )


def results_for(results: Sequence[Mapping[str, Any]], iou_type: str) -> list[dict[str, Any]]:
    """Copies of ``results`` for one IoU type (loadRes mutates them): boxes dropped for segm,
    masks for bbox."""
    drop = "bbox" if iou_type == "segm" else "segmentation"
    return [{k: v for k, v in r.items() if k != drop} for r in results]


def _run_cocoeval(
    coco_gt: Any, results: list[dict[str, Any]], iou_type: str, image_ids: Sequence[int] | None
) -> np.ndarray:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        if results:
            coco_dt = coco_gt.loadRes(results)
        else:  # loadRes indexes results[0]; an empty result set scores 0 where there is truth
            coco_dt = COCO()
            coco_dt.dataset = {
                "images": list(coco_gt.dataset["images"]),
                "categories": list(coco_gt.dataset["categories"]),
                "annotations": [],
            }
            coco_dt.createIndex()
        evaluator = COCOeval(coco_gt, coco_dt, iouType=iou_type)
        if image_ids is not None:
            evaluator.params.imgIds = sorted(int(i) for i in image_ids)
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return evaluator.stats


def write_results(path: str | Path, results: Sequence[Mapping[str, Any]]) -> Path:
    """Write COCO results json (atomically) for rescoring with pycocotools; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(list(results)))
    return path
