"""The ADE20K source: ``ADEChallengeData2016`` as distributed, for the dense probe and the
semantic fine-tuning task.

A tiny copy in the exact layout: synth-shapes images (JPEG) and their PNG masks with values
0..3 renamed ``ADE_train_*``/``ADE_val_*`` under ``images/`` and ``annotations/``, and an
``objectInfo150.csv`` whose first rows are ADE20K's own. Mask value 0 ("other") is ignored and
``v`` is class ``v - 1``.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bob_cache.config import ExtractConfig
from bob_cache.data import parse_source
from bob_cache.data.catalog import get_dataset
from bob_cache.data.segfolder import image_path, mask_path
from bob_cache.data.synth_shapes import write_synth_shapes
from bob_cache.errors import AnnotationError, DataNotFoundError, DataSourceError
from bob_cache.finetune.seg_data import SegDataset, load_seg_folder
from bob_cache.pipelines.dense_probe import DenseProbeConfig, dense_probe, predict_split
from bob_cache.pipelines.extract import extract
from bob_cache.stores import open_store

HEAD = [("1", "0.1576", "11664", "1172", "wall"), ("2", "0.1072", "6046", "612",
        "building;edifice"), ("3", "0.0878", "8265", "796", "sky")]  # fmt: skip
SIZE = 64


def write_ade20k(root: Path, *, n: int = 12, txt: bool = False) -> Path:
    """``root`` in ADEChallengeData2016's layout: 9 training and 3 validation images."""
    shapes = root.parent / f"{root.name}-shapes"
    write_synth_shapes(shapes, n=n, seed=0, image_size=SIZE)
    for split, ade in (("train", "training"), ("val", "validation")):
        (root / "images" / ade).mkdir(parents=True)
        (root / "annotations" / ade).mkdir(parents=True)
        for k, image in enumerate(sorted((shapes / split / "images").iterdir()), 1):
            stem = f"ADE_{ade[:5] if split == 'train' else 'val'}_{k:08d}"
            Image.open(image).convert("RGB").save(root / "images" / ade / f"{stem}.jpg")
            mask = np.asarray(Image.open(shapes / split / "masks" / image.name))
            mask = np.where(mask == 255, 0, mask).astype(np.uint8)  # ADE's masks hold 0..150
            Image.fromarray(mask).save(root / "annotations" / ade / f"{stem}.png")
    rows = [*HEAD, *((str(i), "0.0001", "10", "1", f"thing{i};alias") for i in range(4, 151))]
    if txt:  # the zip's objectInfo150.txt: tab-separated, synonyms after ", "
        lines = ["Idx\tRatio\tTrain\tVal\tName"] + ["\t".join(r).replace(";", ", ") for r in rows]
        (root / "objectInfo150.txt").write_text("\n".join(lines) + "\n")
    else:
        lines = ["Idx,Ratio,Train,Val,Name"] + [",".join(r) for r in rows]
        (root / "objectInfo150.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def ade(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_ade20k(tmp_path_factory.mktemp("ade") / "ADEChallengeData2016")


def test_splits_ids_and_the_150_classes(ade: Path) -> None:
    source = parse_source(f"ade20k:{ade}")
    assert source.kind == "ade20k" and source.name == "ade20k" and source.catalog == "ade20k"
    assert {k: len(v) for k, v in source.splits.items()} == {"train": 9, "val": 3}
    assert [s.id for s in source.splits["val"]] == [f"ADE_val_{k:08d}.jpg" for k in (1, 2, 3)]
    assert {s.label for rows in source.splits.values() for s in rows} == {-1}
    names = source.class_names
    assert len(names) == 150 and names[:4] == ["wall", "building", "sky", "thing4"]
    assert parse_source(source.origin).fingerprint() == source.fingerprint()
    one = parse_source(f"ade20k:{ade}/val")
    assert list(one.splits) == ["val"] and one.origin == f"ade20k:{ade}/val"
    assert (
        write_ade20k(ade.parent / "txt" / "ADE", txt=True)
        and parse_source(f"ade20k:{ade.parent / 'txt' / 'ADE'}").class_names == names
    )  # the zip's objectInfo150.txt reads the same


def test_masks_pair_with_their_images_and_zero_is_ignored(ade: Path) -> None:
    source = parse_source(f"ade20k:{ade}")
    seg = source.describe()["segmentation"]
    assert seg["ignore_index"] == 255 and seg["reduce_zero_label"] is True
    sample = source.splits["val"][1]
    assert mask_path(seg, "val", sample.id) == ade / "annotations/validation/ADE_val_00000002.png"
    assert image_path(seg, "val", sample.id) == Path(sample.location)
    raw = np.asarray(Image.open(mask_path(seg, "val", sample.id))).astype(np.int64)
    assert 0 in raw and raw.max() > 0 and set(np.unique(raw)) <= {0, 1, 2, 3}
    segset = load_seg_folder(f"ade20k:{ade}/val")  # as finetune --val reads it
    assert segset.classes == tuple(source.class_names) and segset.ignore_index == 255
    assert [p.name for p in segset.image_paths] == [s.id for s in source.splits["val"]]
    image, mask = SegDataset(segset)[1]
    assert tuple(image.shape) == (3, SIZE, SIZE)
    np.testing.assert_array_equal(mask.numpy(), np.where(raw == 0, 255, raw - 1))


def test_catalog_holds_the_official_counts() -> None:
    info = get_dataset("ade20k")
    assert info.counts == {"train": 20210, "val": 2000} and info.classes == 150
    assert info.spec == "ade20k:ROOT" and info.env == "ADE20K_DIR"
    assert "sceneparsing" in info.source


def test_a_root_without_the_expected_files_names_them(ade: Path, tmp_path: Path) -> None:
    (tmp_path / "images" / "training").mkdir(parents=True)
    with pytest.raises(DataNotFoundError) as err:
        parse_source(f"ade20k:{tmp_path}")
    message = str(err.value)
    assert str(tmp_path / "annotations/validation/") in message
    assert (
        "objectInfo150.csv (or .txt)" in message
        and "Fix: download ADEChallengeData2016.zip" in message
    )
    assert str(tmp_path / "images/training/") not in message.split("missing:")[1]


def test_an_image_without_its_mask_and_a_split_less_finetune_spec(
    ade: Path, tmp_path: Path
) -> None:
    with pytest.raises(DataSourceError, match=r"both ADE20K splits.*Fix: pass --train ade20k:"):
        load_seg_folder(f"ade20k:{ade}")
    broken = write_ade20k(tmp_path / "ADE")
    (broken / "annotations/validation/ADE_val_00000003.png").unlink()
    with pytest.raises(AnnotationError, match="1 images have no mask.*pair by file stem"):
        parse_source(f"ade20k:{broken}")


def test_extract_dense_and_probe_end_to_end(ade: Path, tmp_path: Path) -> None:
    options = {"backbone": "test_vit", "random_init": True, "image_size": SIZE, "workers": 0,
               "batch_size": 8, "quiet": True, "pool": "grid"}  # fmt: skip
    summary = extract(ExtractConfig(data=f"ade20k:{ade}", store=str(tmp_path / "s"), **options))
    store = open_store(tmp_path / "s")
    sets = {f["split"]: store.get(f["group"]) for f in summary.feature_sets}
    assert {k: fs.n_rows for k, fs in sets.items()} == {"train": 9, "val": 3}
    val = sets["val"]
    assert [str(i) for i in val.array("ids")[:]] == [f"ADE_val_{k:08d}.jpg" for k in (1, 2, 3)]
    assert val.array("labels")[:].tolist() == [-1, -1, -1] and val.is_dense
    assert val.attrs["dataset"]["class_names"][:3] == ["wall", "building", "sky"]
    config = DenseProbeConfig(
        store=str(tmp_path / "s"), dataset="ade20k", backbone="test_vit",
        results=str(tmp_path / "r"), epochs=3, batch_size=8, lrs=(1e-2,),
    )  # fmt: skip
    probed = dense_probe(config)
    assert probed.scored_split == "val" and "no test split" in probed.protocol
    assert probed.train_rows == 9 and 0 <= probed.metrics["mIoU"] <= 1
    assert set(probed.per_class_iou) == set(val.attrs["dataset"]["class_names"])
    predicted, masks = predict_split(config, probed.head, "val")
    # in the network's geometry: "other" (stored 0) is the ignore index, classes 1..3 are 0..2
    assert set(np.unique(masks)) <= {0, 1, 2, 255} and (masks == 255).any()
    assert predicted.shape == masks.shape and predicted.max() < 150


@pytest.mark.slow
def test_finetune_semantic_reads_each_ade20k_split(ade: Path, tmp_path: Path) -> None:
    from bob_cache.pipelines.finetune import FinetuneConfig, finetune

    config = FinetuneConfig(
        task="semantic", backbone="test_resnet", mode="random-init", train=f"ade20k:{ade}/train",
        val=f"ade20k:{ade}/val", epochs=1, batch_size=4, image_size=SIZE, workers=0,
        lrs=(1e-3,), out=str(tmp_path / "run"), results=str(tmp_path / "results"),
    )  # fmt: skip
    summary = finetune(config)
    assert summary.info["train_images"] == 9 and summary.info["val_images"] == 3
    assert summary.info["ignore_index"] == 255 and 0 <= summary.val["mIoU"] <= 1
    stored = set()
    for mask in sorted((ade / "annotations" / "validation").iterdir()):
        stored |= set(np.unique(np.asarray(Image.open(mask))).tolist())
    present = {["wall", "building", "sky"][v - 1] for v in stored - {0}}  # v is class v - 1
    scored = {k[len("iou_") :] for k in summary.val if k.startswith("iou_")}
    assert present and present <= scored and "other" not in scored


def test_a_fine_tune_of_ade20k_is_named_as_extraction_names_it() -> None:
    from bob_cache.finetune.task_segment import dataset_name

    assert dataset_name("ade20k:/data/ADEChallengeData2016/train") == "ade20k"
    assert dataset_name("/data/shapes/train") == "shapes"
