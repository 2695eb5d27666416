"""Fine-tuning metrics: COCO AP through pycocotools, segmentation IoU against scikit-learn."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval

from bob_cache.errors import AnnotationError, SpecError
from bob_cache.finetune.coco_eval import (
    STAT_NAMES,
    evaluate_coco,
    to_coco_results,
    write_results,
)
from bob_cache.finetune.seg_metrics import SegMeter, confusion_matrix

LABEL_TO_CAT = {1: 4, 2: 7}
# image id -> (width, height, [(category, x, y, w, h, as_polygon)]): small, medium, large objects
OBJECTS = {
    1: (128, 128, [(4, 5, 6, 10, 9, False), (7, 50, 40, 40, 50, True), (4, 20, 90, 12, 30, False)]),
    2: (128, 96, [(4, 10, 4, 110, 90, True), (7, 60, 20, 30, 40, False)]),
}


def _quiet(fn: Any, *args: Any) -> Any:
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*args)


def make_gt() -> COCO:
    """Rectangles (RLE or polygon) whose bbox and area come from the mask, as COCO's do."""
    images, anns = [], []
    for image_id, (width, height, objects) in OBJECTS.items():
        images.append(
            {"id": image_id, "file_name": f"{image_id}.png", "width": width, "height": height}
        )
        for cat, x, y, w, h, as_polygon in objects:
            mask = np.zeros((height, width), np.uint8)
            mask[y : y + h, x : x + w] = 1
            rle = mask_utils.encode(np.asfortranarray(mask))
            segm: Any = [[x, y, x + w, y, x + w, y + h, x, y + h]]
            if not as_polygon:
                segm = {"size": rle["size"], "counts": rle["counts"].decode("ascii")}
            anns.append(
                {
                    "id": len(anns) + 1,
                    "image_id": image_id,
                    "category_id": cat,
                    "bbox": [float(v) for v in mask_utils.toBbox(rle)],
                    "area": float(mask_utils.area(rle)),
                    "segmentation": segm,
                    "iscrowd": 0,
                }
            )
    coco = COCO()
    coco.dataset = {
        "images": images,
        "annotations": anns,
        "categories": [{"id": 4, "name": "ant"}, {"id": 7, "name": "bee"}],
    }
    _quiet(coco.createIndex)
    return coco


def outputs_from_gt(gt: COCO, *, shrink: tuple[float, float]) -> list[dict[str, torch.Tensor]]:
    """Torchvision-style outputs equal to the truth; boxes at a model input size shrunk by
    ``shrink`` (masks at the original size, as to_coco_results expects)."""
    cat_to_label = {c: label for label, c in LABEL_TO_CAT.items()}
    outputs = []
    for image_id in sorted(gt.imgs):
        anns = gt.imgToAnns[image_id]
        xywh = torch.tensor([a["bbox"] for a in anns], dtype=torch.float64)
        boxes = torch.cat([xywh[:, :2], xywh[:, :2] + xywh[:, 2:]], dim=1)
        boxes /= torch.tensor([shrink[0], shrink[1], shrink[0], shrink[1]], dtype=torch.float64)
        masks = np.stack([gt.annToMask(a) for a in anns])[:, None].astype(np.float32)
        outputs.append(
            {
                "boxes": boxes.float(),
                "labels": torch.tensor([cat_to_label[a["category_id"]] for a in anns]),
                "scores": torch.ones(len(anns)),
                "masks": torch.from_numpy(masks),
            }
        )
    return outputs


def test_results_equal_to_truth_score_ap_one() -> None:
    gt = make_gt()
    shrink = (2.0, 1.5)
    results = to_coco_results(
        outputs_from_gt(gt, shrink=shrink),
        image_ids=sorted(gt.imgs),
        label_to_cat=LABEL_TO_CAT,
        scale=[shrink, shrink],
        masks=True,
    )
    assert len(results) == 5 and isinstance(results[0]["segmentation"]["counts"], str)
    assert results[0]["bbox"] == pytest.approx(gt.anns[1]["bbox"], abs=1e-4)
    assert results[0]["category_id"] == 4 and results[0]["score"] == 1.0
    metrics = evaluate_coco(gt, results, iou_types=("bbox", "segm"))
    assert set(metrics) == {f"{t}_{n}" for t in ("bbox", "segm") for n in STAT_NAMES}
    for iou_type in ("bbox", "segm"):
        for name in ("AP", "AP50", "AP75", "APs", "APm", "APl"):
            assert metrics[f"{iou_type}_{name}"] == pytest.approx(1.0), (iou_type, name)


def _perturbed(gt: COCO) -> list[dict[str, Any]]:
    rng = np.random.default_rng(3)
    outputs = outputs_from_gt(gt, shrink=(1.0, 1.0))
    for out in outputs:
        n = len(out["boxes"])
        out["boxes"] = out["boxes"] + torch.from_numpy(rng.uniform(-6, 6, (n, 4))).float()
        out["scores"] = torch.from_numpy(rng.uniform(0.1, 1.0, n)).float()
        out["masks"] = torch.roll(out["masks"], shifts=int(rng.integers(1, 6)), dims=-1) * 0.9
    # a false positive and a missed object
    outputs[0]["boxes"] = torch.cat([outputs[0]["boxes"], torch.tensor([[70.0, 5, 120, 30]])])
    outputs[0]["labels"] = torch.cat([outputs[0]["labels"], torch.tensor([2])])
    outputs[0]["scores"] = torch.cat([outputs[0]["scores"], torch.tensor([0.95])])
    fp_mask = torch.zeros(1, 1, 128, 128)
    fp_mask[..., 5:30, 70:120] = 0.8
    outputs[0]["masks"] = torch.cat([outputs[0]["masks"], fp_mask])
    outputs[1] = {k: v[1:] for k, v in outputs[1].items()}
    return to_coco_results(
        outputs, image_ids=[1, 2], label_to_cat=LABEL_TO_CAT, masks=True, mask_threshold=0.5
    )


def _direct_stats(gt: COCO, results: list[dict[str, Any]], iou_type: str) -> np.ndarray:
    dets = copy.deepcopy(results)
    if iou_type == "segm":  # mask areas for the size split, as detectron2 does
        for d in dets:
            d.pop("bbox")
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(dets), iouType=iou_type)
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    return ev.stats


def test_perturbed_results_equal_direct_cocoeval(tmp_path: Path) -> None:
    gt = make_gt()
    results = _perturbed(gt)
    snapshot = copy.deepcopy(results)
    metrics = evaluate_coco(gt, results, iou_types=("bbox", "segm"))
    assert results == snapshot  # loadRes mutates its input; ours passes copies
    for iou_type in ("bbox", "segm"):
        stats = _direct_stats(gt, results, iou_type)
        assert [metrics[f"{iou_type}_{n}"] for n in STAT_NAMES] == stats.tolist()
    assert 0.0 < metrics["bbox_AP"] < 1.0 and 0.0 < metrics["segm_AP"] < 1.0
    # the written file rescored by plain pycocotools gives the same numbers
    path = write_results(tmp_path / "out" / "results.json", results)
    assert json.loads(path.read_text()) == results
    with contextlib.redirect_stdout(io.StringIO()):
        ev = COCOeval(gt, gt.loadRes(str(path)), iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    assert ev.stats[0] == metrics["bbox_AP"]


def test_empty_results_score_zero_without_crash() -> None:
    gt = make_gt()
    with pytest.raises(IndexError):  # the pycocotools behaviour evaluate_coco works around
        _quiet(gt.loadRes, [])
    metrics = evaluate_coco(gt, [], iou_types=("bbox", "segm"), image_ids=[1])
    for iou_type in ("bbox", "segm"):
        assert metrics[f"{iou_type}_AP"] == 0.0 and metrics[f"{iou_type}_APs"] == 0.0
        assert metrics[f"{iou_type}_APl"] == -1.0  # image 1 has no large object: pycocotools' -1
        assert metrics[f"{iou_type}_AR100"] == 0.0


def test_evaluation_input_errors() -> None:
    gt = make_gt()
    out = outputs_from_gt(gt, shrink=(1.0, 1.0))
    with pytest.raises(SpecError, match=r"labels \[9\].*num_classes = number of categories \+ 1"):
        bad = dict(out[0], labels=torch.tensor([9, 1, 1]))
        to_coco_results([bad], image_ids=[1], label_to_cat=LABEL_TO_CAT)
    with pytest.raises(SpecError, match="one of each per image"):
        to_coco_results(out, image_ids=[1], label_to_cat=LABEL_TO_CAT)
    small = dict(out[0], masks=out[0]["masks"][..., :64, :64])
    results = to_coco_results([small], image_ids=[1], label_to_cat=LABEL_TO_CAT, masks=True)
    with pytest.raises(SpecError, match="Resize masks back to the original image size"):
        evaluate_coco(gt, results, iou_types=("segm",))
    with pytest.raises(AnnotationError, match="not in the ground truth"):
        evaluate_coco(gt, [dict(results[0], image_id=99)])
    with pytest.raises(SpecError, match="expected 'bbox' and/or 'segm'"):
        evaluate_coco(gt, results, iou_types=("keypoints",))


# --- semantic segmentation ---


def test_seg_meter_matches_hand_computation() -> None:
    meter = SegMeter(4, ignore_index=255, class_names=["bg", "a", "b", "c"])
    meter.update(np.array([[0, 1, 1], [2, 2, 0]]), np.array([[0, 0, 1], [1, 2, 255]]))
    # pairs (target, pred): (0,0) (0,1) (1,1) (1,2) (2,2); the ignored pixel is skipped
    first = meter.compute()
    assert first["per_class_iou"]["bg"] == pytest.approx(1 / 2)
    assert first["per_class_iou"]["a"] == pytest.approx(1 / 3)
    assert first["mIoU"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 2) / 3)
    assert first["pixel_accuracy"] == pytest.approx(3 / 5)
    assert first["mean_accuracy"] == pytest.approx((1 / 2 + 1 / 2 + 1) / 3)
    meter.update(torch.tensor([[0, 3]]), torch.tensor([[2, 255]]))  # (2,0); 3 on an ignored pixel
    expected_cm = [[1, 1, 0, 0], [0, 1, 1, 0], [1, 0, 1, 0], [0, 0, 0, 0]]
    assert meter.confusion.tolist() == expected_cm
    out = meter.compute()
    assert [out["per_class_iou"][k] for k in ("bg", "a", "b")] == pytest.approx([1 / 3] * 3)
    assert math.isnan(out["per_class_iou"]["c"])  # absent from both: NaN, left out of the mean
    assert out["mIoU"] == pytest.approx(1 / 3)
    assert out["pixel_accuracy"] == pytest.approx(3 / 6)
    assert out["mean_accuracy"] == pytest.approx(1 / 2)
    meter.reset()
    assert math.isnan(meter.compute()["mIoU"])


def test_seg_meter_matches_sklearn_on_random_data() -> None:
    from sklearn.metrics import confusion_matrix as sk_confusion
    from sklearn.metrics import jaccard_score

    rng = np.random.default_rng(0)
    k, ignore = 6, 255
    meter = SegMeter(k, ignore_index=ignore)
    targets, preds = [], []
    for _ in range(4):
        target = rng.integers(0, k - 1, (2, 17, 19))  # class 5 never a target
        target[rng.random(target.shape) < 0.1] = ignore
        pred = np.where(
            rng.random(target.shape) < 0.6, target % k, rng.integers(0, k, target.shape)
        )
        meter.update(torch.from_numpy(pred), torch.from_numpy(target))
        targets.append(target.ravel())
        preds.append(pred.ravel())
    y_true, y_pred = np.concatenate(targets), np.concatenate(preds)
    keep = y_true != ignore
    labels = list(range(k))
    assert np.array_equal(meter.confusion, sk_confusion(y_true[keep], y_pred[keep], labels=labels))
    assert np.array_equal(
        confusion_matrix(y_pred, y_true, num_classes=k, ignore_index=ignore), meter.confusion
    )
    sk_iou = jaccard_score(y_true[keep], y_pred[keep], labels=labels, average=None, zero_division=0)
    out = meter.compute()
    assert [out["per_class_iou"][c] for c in labels] == pytest.approx(sk_iou.tolist())
    assert out["mIoU"] == pytest.approx(sk_iou.mean())
    assert out["pixel_accuracy"] == pytest.approx(np.mean(y_true[keep] == y_pred[keep]))


def test_seg_metric_input_errors() -> None:
    with pytest.raises(AnnotationError, match=r"Target values \[7\].*Fix the masks"):
        confusion_matrix(np.zeros(3, int), np.array([0, 7, 255]), num_classes=3, ignore_index=255)
    with pytest.raises(SpecError, match="Upsample logits to the mask size"):
        confusion_matrix(np.zeros(3, int), np.zeros(4, int), num_classes=3, ignore_index=255)
    with pytest.raises(SpecError, match="Include background in both"):
        SegMeter(3, class_names=["a", "b"])
