"""Fine-tuning data: COCO instances files, segmentation folders, their transforms and errors."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from bob_cache.errors import AnnotationError, DataNotFoundError, SpecError
from bob_cache.finetune.coco_data import (
    CocoDetectionDataset,
    collate_detection,
    horizontal_flip,
    load_coco,
    resize_pair,
)
from bob_cache.finetune.seg_data import (
    SegDataset,
    check_masks,
    horizontal_flip_seg,
    load_seg_folder,
    resize_seg_pair,
)

# image id -> (file_name, width, height)
IMAGES = {10: ("a.png", 40, 30), 20: ("sub/b.png", 32, 32), 30: ("c.png", 16, 24)}


def _rle_box(x: int, y: int, w: int, h: int, *, width: int, height: int) -> dict[str, Any]:
    mask = np.zeros((height, width), np.uint8)
    mask[y : y + h, x : x + w] = 1
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {"size": rle["size"], "counts": rle["counts"].decode("ascii")}


def coco_dict() -> dict[str, Any]:
    """Three images; kept: 1, 2 (clipped), 6; dropped: 3 outside, 4 zero area, 5 crowd."""
    anns = [
        (1, 10, 5, [2, 3, 10, 8], [[2, 3, 12, 3, 12, 11, 2, 11]]),
        (2, 10, 3, [30, 20, 20, 20], _rle_box(30, 20, 10, 10, width=40, height=30)),
        (3, 10, 5, [50, 5, 5, 5], [[50, 5, 55, 5, 55, 10]]),
        (4, 20, 3, [5, 5, 0, 7], [[5, 5, 5, 12, 5, 8]]),
        (5, 20, 9, [0, 0, 4, 4], {"size": [32, 32], "counts": [0, 4, 28, 4, 28, 4, 28, 4, 924]}),
        (6, 20, 9, [1, 1, 6, 6], [[1, 1, 7, 1, 7, 7, 1, 7]]),
    ]
    return {
        "images": [
            {"id": i, "file_name": f, "width": w, "height": h} for i, (f, w, h) in IMAGES.items()
        ],
        "annotations": [
            {
                "id": a,
                "image_id": img,
                "category_id": cat,
                "bbox": box,
                "area": float(box[2] * box[3]),
                "segmentation": seg,
                "iscrowd": int(a == 5),
            }
            for a, img, cat, box, seg in anns
        ],
        "categories": [
            {"id": 9, "name": "bird"},
            {"id": 3, "name": "cat"},
            {"id": 5, "name": "dog"},
        ],
    }


def write_coco(root: Path, data: dict[str, Any] | None = None, *, images: bool = True) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for file_name, width, height in IMAGES.values() if images else ():
        (root / file_name).parent.mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / file_name)
    path = root / "instances.json"
    path.write_text(json.dumps(coco_dict() if data is None else data))
    return path


@pytest.fixture
def coco_file(tmp_path: Path) -> Path:
    return write_coco(tmp_path / "coco")


def test_load_coco_counts_drops_and_maps_labels(coco_file: Path) -> None:
    cs = load_coco(coco_file, masks=True)
    assert len(cs) == 3 and cs.image_ids == (10, 20, 30)
    assert cs.paths[1] == coco_file.parent / "sub/b.png"
    assert cs.categories == ("cat", "dog", "bird") and cs.num_classes == 4
    assert cs.cat_to_label == {3: 1, 5: 2, 9: 3}
    assert cs.label_to_cat == {1: 3, 2: 5, 3: 9}
    assert cs.dropped == {"crowd": 1, "outside": 1, "zero_area": 1}
    assert cs.empty_images == 1
    assert [a.tolist() for a in cs.ann_ids] == [[1, 2], [6], []]
    # the ground truth keeps every annotation of the original file
    assert sorted(cs.coco.anns) == [1, 2, 3, 4, 5, 6]


def test_dataset_items_shapes_boxes_and_masks(coco_file: Path) -> None:
    cs = load_coco(coco_file, masks=True)
    ds = CocoDetectionDataset(cs)
    image, target = ds[0]
    assert image.dtype == torch.uint8 and image.shape == (3, 30, 40)
    expected_pixels = np.array(Image.open(coco_file.parent / "a.png"))
    assert torch.equal(image, torch.from_numpy(expected_pixels).permute(2, 0, 1))
    assert target["image_id"] == 10
    assert target["boxes"].dtype == torch.float32
    assert target["boxes"].tolist() == [[2, 3, 12, 11], [30, 20, 40, 30]]  # second one clipped
    assert target["labels"].tolist() == [2, 1] and target["labels"].dtype == torch.int64
    assert target["area"].tolist() == [80.0, 400.0] and target["iscrowd"].tolist() == [0, 0]
    assert target["masks"].dtype == torch.uint8 and target["masks"].shape == (2, 30, 40)
    for mask, ann_id in zip(target["masks"], (1, 2), strict=True):
        assert np.array_equal(mask.numpy(), cs.coco.annToMask(cs.coco.anns[ann_id]))
    assert int(target["masks"][1].sum()) == 100
    _, empty = ds[2]
    assert empty["boxes"].shape == (0, 4) and empty["masks"].shape == (0, 24, 16)
    assert "masks" not in CocoDetectionDataset(load_coco(coco_file, masks=False))[0][1]
    images, targets = collate_detection([ds[0], ds[1]])
    assert [i.shape[1:] for i in images] == [(30, 40), (32, 32)]
    assert [t["image_id"] for t in targets] == [10, 20]


def test_resize_pair_scales_boxes_masks_and_flip(coco_file: Path) -> None:
    ds = CocoDetectionDataset(load_coco(coco_file, masks=True))
    image, target = ds[0]
    small, out = resize_pair(image, target, 20)
    assert small.shape == (3, 20, 20) and small.dtype == torch.uint8
    # x by 20/40, y by 20/30
    expected = [[1, 2, 6, 22 / 3], [15, 40 / 3, 20, 20]]
    np.testing.assert_allclose(out["boxes"].numpy(), expected, rtol=1e-6)
    np.testing.assert_allclose(out["area"].numpy(), [80 / 3, 400 / 3], rtol=1e-6)
    assert out["orig_size"] == (30, 40) and target["boxes"][0, 2] == 12  # input untouched
    assert out["masks"].shape == (2, 20, 20) and out["masks"].dtype == torch.uint8
    block = torch.zeros(20, 20, dtype=torch.uint8)
    block[13:, 15:] = 1  # rows 20..29 of 30 -> output rows whose centre maps there: 13..19
    assert torch.equal(out["masks"][1], block)
    ds_resized = CocoDetectionDataset(ds.cocoset, transform=lambda i, t: resize_pair(i, t, 16))
    assert ds_resized[2][1]["masks"].shape == (0, 16, 16)
    flipped, ft = horizontal_flip(image, target)
    assert torch.equal(flipped[..., 0], image[..., -1])
    assert ft["boxes"].tolist() == [[28, 3, 38, 11], [0, 20, 10, 30]]
    assert torch.equal(ft["masks"], target["masks"].flip(-1))


def test_images_resolve_against_images_option(tmp_path: Path) -> None:
    write_coco(tmp_path / "pics")
    path = write_coco(tmp_path / "ann", images=False)
    with pytest.raises(AnnotationError, match=r"3 of 3 images .* Pass --images DIR") as err:
        load_coco(path, masks=False)
    assert "a.png" in str(err.value)
    cs = load_coco(path, images=tmp_path / "pics", masks=False)
    assert cs.paths[0] == tmp_path / "pics" / "a.png"


def test_bad_coco_inputs_raise_with_fix(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="Pass the path of an existing annotation file"):
        load_coco(tmp_path / "nope.json", masks=False)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(AnnotationError, match="not valid JSON.*Expected a COCO instances file"):
        load_coco(bad, masks=False)
    data = coco_dict()
    del data["categories"]
    with pytest.raises(AnnotationError, match="lacks the list.*'categories'.*instances_"):
        load_coco(write_coco(tmp_path / "nocat", data), masks=False)
    bad.write_text("[]")
    with pytest.raises(AnnotationError, match="A list is a results file"):
        load_coco(bad, masks=False)


def test_masks_require_segmentation(tmp_path: Path) -> None:
    data = coco_dict()
    del data["annotations"][0]["segmentation"]
    data["annotations"][5]["segmentation"] = []
    path = write_coco(tmp_path / "noseg", data)
    with pytest.raises(
        AnnotationError, match=r"2 without a segmentation \(ids 1, 6\).*train boxes only"
    ):
        load_coco(path, masks=True)
    assert load_coco(path, masks=False).dropped["crowd"] == 1


def test_unknown_category_and_defaults_filled(tmp_path: Path) -> None:
    data = coco_dict()
    data["annotations"][0]["category_id"] = 77
    with pytest.raises(AnnotationError, match=r"category id not in 'categories' \(ids 1\)"):
        load_coco(write_coco(tmp_path / "cat", data), masks=False)
    data = coco_dict()
    for ann in data["annotations"]:
        del ann["iscrowd"], ann["area"]
    cs = load_coco(write_coco(tmp_path / "defaults", data), masks=False)
    assert cs.dropped["crowd"] == 0 and cs.coco.anns[6]["area"] == 36.0
    assert cs.coco.anns[6]["iscrowd"] == 0


def test_image_size_mismatch_is_reported(tmp_path: Path) -> None:
    data = coco_dict()
    data["images"][0]["width"] = 41
    cs = load_coco(write_coco(tmp_path / "size", data), masks=False)
    with pytest.raises(AnnotationError, match="40x30.*says 41x30.*Fix the width/height"):
        CocoDetectionDataset(cs)[0]


# --- semantic segmentation folders ---


def write_seg_folder(
    root: Path, stems: tuple[str, ...] = ("x0", "x1", "x2"), *, values: tuple[int, ...] = (0, 1, 2)
) -> Path:
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rng = np.random.default_rng(1)
    for i, stem in enumerate(stems):
        pixels = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / "images" / f"{stem}{'.png' if i % 2 else '.jpg'}")
        mask = np.resize(np.array(values, np.uint8), (12, 10))
        mask[0, 0] = 255
        Image.fromarray(mask, mode="L").save(root / "masks" / f"{stem}.png")
    return root


def test_seg_folder_with_classes_json_in_parent(tmp_path: Path) -> None:
    root = write_seg_folder(tmp_path / "shapes" / "train")
    info = {"classes": ["circle", "square"], "background": 0, "ignore_index": 254}
    (tmp_path / "shapes" / "classes.json").write_text(json.dumps(info))
    ss = load_seg_folder(root)
    assert ss.classes == ("background", "circle", "square") and ss.num_classes == 3
    assert ss.ignore_index == 254
    assert [p.name for p in ss.image_paths] == ["x0.jpg", "x1.png", "x2.jpg"]
    assert [p.name for p in ss.mask_paths] == ["x0.png", "x1.png", "x2.png"]
    ss = load_seg_folder(root, classes=["a", "b"], ignore_index=255)
    assert ss.classes == ("background", "a", "b") and ss.ignore_index == 255
    check_masks(ss)
    image, mask = SegDataset(ss)[1]
    assert image.shape == (3, 12, 10) and image.dtype == torch.uint8
    assert mask.shape == (12, 10) and mask.dtype == torch.int64
    assert set(mask.unique().tolist()) == {0, 1, 2, 255}
    expected = np.array(Image.open(root / "images" / "x1.png"))
    assert torch.equal(image, torch.from_numpy(expected).permute(2, 0, 1))
    small_image, small_mask = resize_seg_pair(image, mask, 6)
    assert small_image.shape == (3, 6, 6) and small_mask.dtype == torch.int64
    assert set(small_mask.unique().tolist()) <= {0, 1, 2, 255}
    _, flipped_mask = horizontal_flip_seg(image, mask)
    assert torch.equal(flipped_mask[:, 0], mask[:, -1])


def test_seg_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="images/ and masks/ sub-folders.*Point --data"):
        load_seg_folder(tmp_path, classes=["a"])
    root = write_seg_folder(tmp_path / "s")
    with pytest.raises(AnnotationError, match=r"Pass --classes a,b,c .*or write .*classes\.json"):
        load_seg_folder(root)
    (root / "images" / "extra.png").write_bytes((root / "images" / "x1.png").read_bytes())
    with pytest.raises(AnnotationError, match=r"1 images have no mask.*extra\.png.*add masks/"):
        load_seg_folder(root, classes=["a", "b"])
    (root / "images" / "extra.png").unlink()
    (root / "masks" / "lonely.png").write_bytes((root / "masks" / "x1.png").read_bytes())
    with pytest.raises(AnnotationError, match=r"1 masks have no image.*lonely\.png"):
        load_seg_folder(root, classes=["a", "b"])
    (root / "masks" / "lonely.png").unlink()
    with pytest.raises(SpecError, match="ignore_index 2 is a class label"):
        load_seg_folder(root, classes=["a", "b"], ignore_index=2)


def test_bad_class_ids_in_masks(tmp_path: Path) -> None:
    root = write_seg_folder(tmp_path / "s", values=(0, 1, 2, 7))
    ss = load_seg_folder(root, classes=["a", "b"])
    with pytest.raises(AnnotationError, match=r"3 masks hold values .*\[7\].*pass the full class"):
        check_masks(ss)
    with pytest.raises(AnnotationError, match=r"x0\.png holds values \[7\].*Fix the mask"):
        SegDataset(ss)[0]
    check_masks(load_seg_folder(root, classes=["a", "b", "c", "d", "e", "f", "g"]))
