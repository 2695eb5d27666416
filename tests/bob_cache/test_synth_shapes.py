"""synth-shapes: determinism, COCO files that pycocotools loads, masks that agree with the
polygons, the two styles, reruns and repairs, the errors, and the CLI command."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import typer
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from scipy.ndimage import binary_dilation
from typer.testing import CliRunner

from bob_cache.commands import synth
from bob_cache.data.synth_shapes import (
    IGNORE_INDEX,
    SYNTH_CLASSES,
    list_synth_styles,
    render_synth_image,
    write_synth_shapes,
)
from bob_cache.errors import DataSourceError, SpecError

SMALL = {"n": 6, "seed": 3, "image_size": 64}
# pycocotools 2.0.x's decode on numpy 2 (its own code, not ours)
pytestmark = pytest.mark.filterwarnings("ignore:__array__ implementation:DeprecationWarning")


def tree(root: Path) -> dict[str, bytes]:
    """Every file under ``root``, by relative path."""
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def png(root: Path, index: int, kind: str = "images") -> np.ndarray:
    (path,) = root.glob(f"*/{kind}/{index:06d}.png")
    return np.asarray(Image.open(path))


@pytest.fixture(scope="module")
def dataset_a(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "a"
    write_synth_shapes(out, **SMALL, style="a")
    return out


@pytest.fixture(scope="module")
def dataset_b(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("synth") / "b"
    write_synth_shapes(out, **SMALL, style="b")
    return out


def test_layout_follows_the_contract(dataset_a: Path) -> None:
    classes = json.loads((dataset_a / "classes.json").read_text())
    assert classes["classes"] == ["circle", "square", "triangle"]
    assert classes["ignore_index"] == 255 and classes["background"] == 0
    assert (classes["style"], classes["seed"], classes["n"], classes["image_size"]) == (
        "a", 3, 6, 64,
    )  # fmt: skip
    # train = first ceil(6 * 0.75) = 5 images; files named by their index in the dataset
    assert sorted(p.name for p in (dataset_a / "train/images").iterdir())[-1] == "000004.png"
    assert [p.name for p in (dataset_a / "val/masks").iterdir()] == ["000005.png"]
    image = Image.open(dataset_a / "train/images/000000.png")
    mask = Image.open(dataset_a / "train/masks/000000.png")
    assert (image.mode, image.size, mask.mode, mask.size) == ("RGB", (64, 64), "L", (64, 64))
    values = set(np.unique(np.asarray(mask)).tolist())
    assert 0 in values and IGNORE_INDEX in values and values <= {0, 1, 2, 3, 255}


def test_two_runs_are_byte_identical(dataset_a: Path, tmp_path: Path) -> None:
    write_synth_shapes(tmp_path / "again", **SMALL, style="a")
    first, second = tree(dataset_a), tree(tmp_path / "again")
    assert len(first) == 6 * 2 + 3  # an image and a mask each, three JSON files
    assert first == second


def test_image_i_does_not_depend_on_n(tmp_path: Path) -> None:
    write_synth_shapes(tmp_path / "n4", n=4, image_size=64)
    write_synth_shapes(tmp_path / "n6", n=6, image_size=64)
    for i in range(4):  # image 3 is val for n=4 and train for n=6: the same pixels
        for kind in ("images", "masks"):
            assert np.array_equal(png(tmp_path / "n4", i, kind), png(tmp_path / "n6", i, kind))
    again = render_synth_image(3, seed=0, style="a", image_size=64)
    assert np.array_equal(again.image, png(tmp_path / "n6", 3))
    other_seed = render_synth_image(3, seed=1, style="a", image_size=64)
    assert not np.array_equal(other_seed.image, again.image)


def test_coco_files_load_and_name_existing_images(dataset_a: Path) -> None:
    for split, count in (("train", 5), ("val", 1)):
        coco = COCO(str(dataset_a / f"{split}.json"))
        assert len(coco.getImgIds()) == count
        assert [c["name"] for c in coco.loadCats(coco.getCatIds())] == list(SYNTH_CLASSES)
        for img in coco.loadImgs(coco.getImgIds()):
            assert (dataset_a / img["file_name"]).is_file()
            assert img["file_name"].startswith(f"{split}/images/")
            anns = coco.loadAnns(coco.getAnnIds(imgIds=img["id"]))
            assert 1 <= len(anns) <= 4
            assert all(a["iscrowd"] == 0 and a["category_id"] in (1, 2, 3) for a in anns)
    head = json.loads((dataset_a / "train.json").read_text())
    assert list(head) == ["info", "images", "annotations", "categories"]
    assert list(head["annotations"][0]) == [
        "id", "image_id", "category_id", "bbox", "area", "segmentation", "iscrowd",
    ]  # fmt: skip


def _annotations_by_image(root: Path) -> list[tuple[np.ndarray, list[dict]]]:
    rows = []
    for split in ("train", "val"):
        coco = json.loads((root / f"{split}.json").read_text())
        for img in coco["images"]:
            anns = [a for a in coco["annotations"] if a["image_id"] == img["id"]]
            mask = np.asarray(Image.open(root / img["file_name"].replace("images", "masks")))
            rows.append((mask, anns))
    return rows


def _rasterize(ann: dict, size: int) -> np.ndarray:
    rles = mask_utils.frPyObjects(ann["segmentation"], size, size)
    return mask_utils.decode(mask_utils.merge(rles)).astype(bool)


def test_masks_agree_with_the_polygons(dataset_a: Path) -> None:
    for mask, anns in _annotations_by_image(dataset_a):
        polygons = [_rasterize(a, 64) for a in anns]
        for k in (1, 2, 3):
            union = np.zeros_like(mask, dtype=bool)
            for a, poly in zip(anns, polygons, strict=True):
                union |= poly if a["category_id"] == k else False
            # every class-k pixel of the mask lies within a class-k polygon (dilated by 1 px)
            assert not np.any((mask == k) & ~binary_dilation(union))
        # the top-most shape shows whole: its polygon is class k or the ignore band
        top, poly = anns[-1], polygons[-1]
        shown = np.isin(mask[poly], (top["category_id"], IGNORE_INDEX)).mean()
        assert shown >= 0.95
        assert (mask[poly] == top["category_id"]).sum() > 0


def test_bbox_and_area_come_from_the_polygon(dataset_a: Path) -> None:
    coco = json.loads((dataset_a / "train.json").read_text())
    for ann in coco["annotations"]:
        xy = np.asarray(ann["segmentation"][0]).reshape(-1, 2)
        x0, y0 = xy.min(axis=0)
        x1, y1 = xy.max(axis=0)
        assert ann["bbox"] == pytest.approx([x0, y0, x1 - x0, y1 - y0], abs=0.011)
        assert min(x0, y0) >= 0 and max(x1, y1) <= 64
        assert min(x1 - x0, y1 - y0) >= 11.9  # big enough for a detector at this size
        pixels = _rasterize(ann, 64).sum()
        assert ann["area"] == pytest.approx(pixels, rel=0.15)
        assert ann["area"] == round(ann["area"], 2)


def test_style_b_repaints_the_same_layouts(dataset_a: Path, dataset_b: Path) -> None:
    assert list_synth_styles() == ["a", "b"]
    for split in ("train", "val"):
        coco_a = json.loads((dataset_a / f"{split}.json").read_text())
        coco_b = json.loads((dataset_b / f"{split}.json").read_text())
        for key in ("images", "annotations", "categories"):
            assert coco_a[key] == coco_b[key]
    for i in range(6):
        assert np.array_equal(png(dataset_a, i, "masks"), png(dataset_b, i, "masks"))
    mean_a = np.mean([png(dataset_a, i).mean(axis=(0, 1)) for i in range(6)], axis=0)
    mean_b = np.mean([png(dataset_b, i).mean(axis=(0, 1)) for i in range(6)], axis=0)
    assert np.abs(mean_a - mean_b).max() > 40  # light backgrounds versus darker ones


def test_rerun_skips_a_complete_folder_and_repairs_a_partial_one(tmp_path: Path) -> None:
    out = tmp_path / "d"
    first = write_synth_shapes(out, n=4, image_size=64)
    before = tree(out)
    assert first["status"] == "written"
    assert first["splits"]["train"]["images"] == 3 and first["splits"]["val"]["images"] == 1
    annotations = [
        json.loads((out / f"{s}.json").read_text())["annotations"] for s in ("train", "val")
    ]
    assert first["splits"]["val"]["instances"] == len(annotations[1])
    assert first["instances"] == len(annotations[0]) + len(annotations[1])
    again = write_synth_shapes(out, n=4, image_size=64)
    assert again["status"] == "skipped" and tree(out) == before
    (out / "train/images/000001.png").unlink()  # a missing file: rewritten
    assert write_synth_shapes(out, n=4, image_size=64)["status"] == "written"
    assert tree(out) == before


def test_a_crash_of_another_run_is_repaired(tmp_path: Path) -> None:
    """A run of n=6 killed before classes.json, then n=4 into the same folder."""
    out = tmp_path / "d"
    write_synth_shapes(out, n=6, image_size=64)
    (out / "classes.json").unlink()
    (out / "val" / "images" / ".000005.png.tmp").write_bytes(b"torn")
    write_synth_shapes(out, n=4, image_size=64)
    write_synth_shapes(tmp_path / "fresh", n=4, image_size=64)
    assert tree(out) == tree(tmp_path / "fresh")


def test_a_folder_of_other_options_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "d"
    write_synth_shapes(out, n=4, image_size=64)
    with pytest.raises(DataSourceError, match=r"other options.*style='b'.*--out with another"):
        write_synth_shapes(out, n=4, image_size=64, style="b")
    foreign = tmp_path / "photos"
    foreign.mkdir()
    (foreign / "cat.jpg").write_bytes(b"x")
    with pytest.raises(DataSourceError, match=r"found 'cat.jpg'. Use --out with a new or empty"):
        write_synth_shapes(foreign, n=4, image_size=64)
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataSourceError, match="is a file"):
        write_synth_shapes(tmp_path / "file", n=4, image_size=64)


@pytest.mark.parametrize(
    ("options", "hint"),
    [
        ({"n": 1}, r"at least 2, got 1\. Fix: use --n 2 or more"),
        ({"n": 4, "image_size": 16}, r"from 32 to 2048, got 16\. Fix: use --image-size 128"),
        ({"n": 4, "image_size": 4096}, r"from 32 to 2048, got 4096"),
        ({"n": 4, "val_fraction": 0.0}, r"strictly between 0 and 1, got 0.0\. Fix: use --val"),
        ({"n": 4, "val_fraction": 1.5}, r"strictly between 0 and 1, got 1.5"),
        ({"n": 4, "seed": -1}, r"Fix: use --seed 0"),
        ({"n": 2}, r"leaves the val split empty .* Use a larger --n"),
        ({"n": 4, "style": "c"}, r"Unknown synth-shapes style 'c'\. Known styles: 'a', 'b'"),
    ],
)
def test_bad_options_say_the_fix(tmp_path: Path, options: dict, hint: str) -> None:
    with pytest.raises(SpecError, match=hint):
        write_synth_shapes(tmp_path / "d", **options)
    assert not (tmp_path / "d").exists()


@pytest.fixture
def app() -> typer.Typer:
    app = typer.Typer()
    app.callback()(lambda: None)  # a group, so the command keeps its name
    synth.register(app)
    return app


def test_cli_writes_and_reports(app: typer.Typer, tmp_path: Path) -> None:
    runner = CliRunner()
    args = ["synth-shapes", "--out", str(tmp_path / "d"), "--n", "4", "--image-size", "64"]
    result = runner.invoke(app, [*args, "--quiet"])
    assert result.exit_code == 0, result.output
    assert "Wrote: synth-shapes style a" in result.output
    assert "train 3 images" in result.output
    assert (tmp_path / "d" / "classes.json").is_file()
    assert (tmp_path / "d" / "val" / "masks" / "000003.png").is_file()
    result = runner.invoke(app, [*args, "--json"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["status"] == "skipped" and summary["splits"]["val"]["images"] == 1
    help_text = runner.invoke(app, ["synth-shapes", "--help"]).output
    assert "Example: bob-cache synth-shapes" in help_text


def test_cli_bad_style_exits_1_with_the_known_styles(app: typer.Typer, tmp_path: Path) -> None:
    args = ["synth-shapes", "--out", str(tmp_path / "d"), "--n", "4", "--style", "z"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert "Unknown synth-shapes style 'z'" in result.output
    assert "Known styles: 'a', 'b'" in result.output
    assert "Traceback" not in result.output
