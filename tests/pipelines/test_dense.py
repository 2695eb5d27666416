"""Dense features: ``extract --dense`` on a segmentation folder, and the dense linear probe.

A tiny synth-shapes set (64-px images) and random-init timm test models: the stored grids
equal the backbone's own forward, dense sets follow the same commit and ``--part`` rules,
and the dense probe beats predicting background everywhere, with an mIoU that scikit-learn
recomputes from its predictions.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bob_cache.backbones import create_backbone
from bob_cache.config import ExtractConfig
from bob_cache.data import parse_source
from bob_cache.data.synth_shapes import write_synth_shapes
from bob_cache.errors import AnnotationError, DataNotFoundError, SpecError
from bob_cache.finetune.seg_metrics import SegMeter
from bob_cache.pipelines.dense_probe import DenseProbeConfig, dense_probe, predict_split
from bob_cache.pipelines.extract import extract
from bob_cache.stores import FeatureSetRequest, open_store, resolve_layout, verify_store

SIZE = 64
CLASSES = ["background", "circle", "square", "triangle"]


def run_extract(data: Path, store: Path, backbone: str = "test_vit", **kwargs: object):
    options = {"backbone": backbone, "random_init": True, "image_size": SIZE, "workers": 0,
               "batch_size": 8, "quiet": True, "pool": "grid", **kwargs}  # fmt: skip
    return extract(ExtractConfig(data=str(data), store=str(store), **options))


def probe_config(store: Path, results: Path, **kwargs: object) -> DenseProbeConfig:
    options = {"epochs": 10, "batch_size": 8, "lrs": (1e-3, 1e-2, 1e-1), **kwargs}
    return DenseProbeConfig(
        store=str(store), dataset="shapes", backbone="test_vit", results=str(results), **options
    )


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Eight 64-px synth-shapes images: train 000000-000005, val 000006-000007."""
    out = tmp_path_factory.mktemp("shapes") / "shapes"
    write_synth_shapes(out, n=8, seed=0, image_size=SIZE)
    return out


@pytest.fixture(scope="module")
def probed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """Forty images (30 train, 10 val) extracted with test_vit --dense and probed once."""
    root = tmp_path_factory.mktemp("probed")
    write_synth_shapes(root / "shapes", n=40, seed=0, image_size=SIZE)
    run_extract(root / "shapes", root / "store")
    config = probe_config(root / "store", root / "results")
    return {"root": root, "config": config, "summary": dense_probe(config)}


# --- the source ---------------------------------------------------------------------------
def test_a_segmentation_folder_lists_images_with_classes_and_masks(shapes: Path) -> None:
    source = parse_source(str(shapes))
    assert source.kind == "segfolder"  # tried before the plain image-folder kind
    assert source.class_names == CLASSES
    assert [s.id for s in source.splits["val"]] == ["000006.png", "000007.png"]
    assert {s.label for rows in source.splits.values() for s in rows} == {-1}
    seg = source.describe()["segmentation"]
    assert seg == {"root": str(shapes), "splits": {"train": "train", "val": "val"},
                   "ignore_index": 255}  # fmt: skip
    one = parse_source(str(shapes / "train"))  # one folder without splits: split by id hash
    assert one.split_rule.kind == "id-hash" and {k: len(v) for k, v in one.splits.items()} == {
        "train": 4, "val": 1, "test": 1}  # fmt: skip
    assert one.describe()["segmentation"]["splits"] == {"train": ".", "val": ".", "test": "."}


# --- extraction ---------------------------------------------------------------------------
@pytest.mark.parametrize("backbone", ["test_vit", "test_resnet"])
def test_dense_grids_equal_the_backbones_own_forward(
    shapes: Path, tmp_path: Path, backbone: str
) -> None:
    summary = run_extract(shapes, tmp_path / "s", backbone)
    fs = open_store(tmp_path / "s").get(summary.feature_sets[1]["group"])  # val
    bb = create_backbone(backbone, random_init=True, image_size=SIZE)
    source = parse_source(str(shapes))
    x = torch.cat([bb.preprocess(source.open_image(s)) for s in source.splits["val"]])
    with torch.no_grad():
        out = bb.model.forward_features(x)
    if out.ndim == 3:  # ViT tokens: drop the prefix (class) tokens, patches back on a grid
        tokens = out[:, bb.model.num_prefix_tokens :]
        side = round(tokens.shape[1] ** 0.5)
        expected = tokens.reshape(len(x), side, side, -1).numpy()
    else:  # CNN map, channels last
        expected = out.permute(0, 2, 3, 1).numpy()
    stored = fs.array("features")
    assert stored.shape == expected.shape and fs.grid == expected.shape[1:3]
    assert stored.chunks == (1, *expected.shape[1:]) and stored.dtype == np.float16
    assert stored.metadata.dimension_names == ("sample", "y", "x", "feature")
    np.testing.assert_allclose(stored[:].astype(np.float32), expected, rtol=2e-3, atol=2e-3)
    assert fs.attrs["spec"]["pool"] == "grid" and fs.attrs["dataset"]["class_names"] == CLASSES

    pooled = run_extract(shapes, tmp_path / "s", backbone, pool="default")
    assert pooled.feature_sets[0]["key"] != summary.feature_sets[0]["key"]
    with pytest.raises(SpecError, match="dense grids .*--method dense-linear"):
        fs.features  # noqa: B018  (every reader of one vector per image refuses)


def test_dense_sets_share_shards_between_parts_and_verify(shapes: Path, tmp_path: Path) -> None:
    run_extract(shapes, tmp_path / "one", shard_rows=2)
    first = run_extract(shapes, tmp_path / "parts", shard_rows=2, split="train", part=(0, 2))
    assert not first.feature_sets[0]["complete"]  # shards 0 and 2 of 3
    with pytest.raises(Exception, match="incomplete"):
        dense_probe(probe_config(tmp_path / "parts", tmp_path / "r", val_split="train"))
    second = run_extract(shapes, tmp_path / "parts", shard_rows=2, split="train", part=(1, 2))
    assert second.shards_computed == 1 and second.feature_sets[0]["complete"]
    ref = open_store(tmp_path / "one").get("shapes/train")
    got = open_store(tmp_path / "parts").get("shapes/train")
    assert got.path == ref.path and got.layout.shard_rows == 2
    for name in ("features", "labels", "ids", "digest", "valid"):
        np.testing.assert_array_equal(got.array(name)[:], ref.array(name)[:], err_msg=name)
    assert all(r.ok for r in verify_store(open_store(tmp_path / "parts")))


def test_dense_extraction_defaults_to_one_image_chunks_and_small_shards(
    shapes: Path, tmp_path: Path, cli
) -> None:
    args = ["extract", "--data", shapes, "--store", tmp_path / "s", "--backbone", "test_vit",
            "--random-init", "--image-size", SIZE, "--workers", 0]  # fmt: skip
    done = cli(*args, "--dense", "--json")
    assert done.exit_code == 0, done.output
    info = json.loads(done.output)["feature_sets"][0]
    assert (info["pool"], info["grid"], info["dim"]) == ("grid", [4, 4], 64)
    fs = open_store(tmp_path / "s").get(info["group"])
    assert (fs.layout.chunk_rows, fs.layout.shard_rows) == (1, 256)
    bad = cli(*args, "--dense", "--pool", "avg")
    assert bad.exit_code == 1 and "Drop --pool, or drop --dense" in bad.output


# --- the dense probe ----------------------------------------------------------------------
def test_dense_probe_beats_predicting_background_everywhere(probed: dict) -> None:
    summary, config = probed["summary"], probed["config"]
    assert (summary.train_rows, summary.val_rows, summary.scored_split) == (30, 10, "val")
    assert summary.lr in config.lrs and set(summary.per_class_iou) == set(CLASSES)
    _, masks = predict_split(config, summary.head, "val")
    majority = SegMeter(len(CLASSES), ignore_index=255)
    majority.update(np.zeros_like(masks), masks)
    baseline = majority.compute()["mIoU"]
    assert summary.metrics["mIoU"] > baseline + 0.05, (summary.metrics, baseline)


def test_reported_miou_equals_sklearn_on_the_predictions(probed: dict) -> None:
    from sklearn.metrics import accuracy_score, jaccard_score

    summary = probed["summary"]
    pred, masks = predict_split(probed["config"], summary.head, "val")
    assert pred.shape == masks.shape == (10, SIZE, SIZE)
    keep = masks != 255
    y, p = masks[keep], pred[keep]
    labels = np.union1d(np.unique(y), np.unique(p))  # classes with a non-empty union
    assert summary.metrics["mIoU"] == pytest.approx(
        jaccard_score(y, p, labels=labels, average="macro"), abs=1e-9
    )
    assert summary.metrics["pixel_accuracy"] == pytest.approx(accuracy_score(y, p), abs=1e-9)


def test_dense_probe_rows_state_the_protocol_and_a_rerun_skips(probed: dict) -> None:
    import pandas as pd

    again = dense_probe(probed["config"])
    assert (again.units_run, again.units_skipped) == (0, 1)
    frame = pd.concat(pd.read_parquet(p) for p in (probed["root"] / "results").glob("*.parquet"))
    assert set(frame["stage"]) == {"probe"} and set(frame["method"]) == {"dense-linear"}
    assert {"mIoU", "pixel_accuracy", "mean_accuracy", "lr", "iou:circle"} <= set(frame["metric"])
    assert set(frame["train_rows"]) == {30} and set(frame["val_rows"]) == {10}
    (protocol,) = set(frame["protocol"])
    assert "chosen from [0.001, 0.01, 0.1] by mIoU on val_rows images of 'val'" in protocol
    assert "no test split" in protocol


# --- errors -------------------------------------------------------------------------------
def test_a_pooled_set_is_refused_with_the_fix(shapes: Path, tmp_path: Path) -> None:
    summary = run_extract(shapes, tmp_path / "s", pool="default")
    config = probe_config(tmp_path / "s", tmp_path / "r")
    with pytest.raises(Exception, match="only pooled feature sets.*extract it with --dense"):
        dense_probe(config)
    key = summary.feature_sets[0]["key"]
    with pytest.raises(SpecError, match="not dense grids.*extract with --dense"):
        dense_probe(probe_config(tmp_path / "s", tmp_path / "r", feature=key))


def test_a_dense_set_without_masks_names_the_fix(tmp_path: Path) -> None:
    fstore = open_store(tmp_path / "s", mode="a")
    request = FeatureSetRequest(
        path="shapes/train/test_vit.x/k1", key="k1", spec={"pool": "grid"},
        provenance={"dataset": {"name": "shapes", "kind": "folder"}, "split": "train",
                    "backbone": {"slug": "test_vit.x", "name": "test_vit"}},
        n_rows=2, dim=3, dtype="float32", grid=(2, 2),
    )  # fmt: skip
    fs = fstore.require(request, resolve_layout(shard_rows=2))
    fs.write_rows(np.ones((2, 2, 2, 3), np.float32), labels=np.array([-1, -1]), ids=["a", "b"])
    with pytest.raises(SpecError, match="'folder' source, which has no masks.*segmentation folder"):
        dense_probe(probe_config(tmp_path / "s", tmp_path / "r"))


def test_missing_or_bad_masks_name_the_fix(probed: dict, tmp_path: Path) -> None:
    moved = tmp_path / "moved"
    shutil.copytree(probed["root"] / "shapes", moved)
    config = probe_config(probed["config"].store, tmp_path / "r", masks=str(moved), epochs=1)
    (moved / "val" / "masks" / "000031.png").unlink()
    with pytest.raises(
        DataNotFoundError, match="1 of 10 rows of split 'val' have no mask.*--masks"
    ):
        dense_probe(config)
    Image.fromarray(np.full((SIZE, SIZE), 7, np.uint8)).save(moved / "val/masks/000031.png")
    with pytest.raises(AnnotationError, match=r"outside the 4 classes.*\[7\].*classes.json"):
        dense_probe(config)


def test_readers_of_vectors_refuse_a_dense_set(probed: dict) -> None:
    from bob_cache.pipelines.index import IndexConfig, build_index
    from bob_cache.pipelines.probe import ProbeConfig, probe

    store = probed["config"].store
    with pytest.raises(SpecError, match="holds dense grids.*--method dense-linear"):
        probe(ProbeConfig(store, "shapes", "test_vit", test_split="val", methods=("linear",)))
    with pytest.raises(SpecError, match="holds dense grids.*--method dense-linear"):
        build_index(IndexConfig(store, "shapes", "test_vit", kind="flat", quiet=True))


def test_sampled_pixels_get_the_logits_full_upsampling_gives() -> None:
    import torch.nn.functional as F

    from bob_cache.probes.dense import sample_bilinear

    for grid, size in (((14, 14), (224, 224)), ((2, 3), (17, 33)), ((5, 5), (3, 3))):
        low = torch.randn(2, 6, *grid)
        full = F.interpolate(low, size=size, mode="bilinear", align_corners=False).flatten(2)
        pixels = torch.randint(0, size[0] * size[1], (2, 300))
        expected = full.gather(2, pixels[:, None, :].expand(2, 6, -1))
        torch.testing.assert_close(sample_bilinear(low, pixels, size), expected)


def test_probe_cli_runs_dense_linear_alone_and_with_one_seed(probed: dict, cli) -> None:
    base = ["probe", "--store", probed["config"].store, "--dataset", "shapes", "--backbone",
            "test_vit", "--results", probed["root"] / "cli-results"]  # fmt: skip
    done = cli(*base, "--method", "dense-linear", "--epochs", 2, "--lrs", "0.01,0.1", "--json")
    assert done.exit_code == 0, done.output
    summary = json.loads(done.output)
    assert summary["units_run"] == 1 and summary["lr"] in (0.01, 0.1) and "head" not in summary
    assert "epochs" in summary["protocol"] and summary["table"][0]["method"] == "dense-linear"
    mixed = cli(*base, "--method", "linear,dense-linear")
    assert mixed.exit_code == 1 and "run it on its own" in mixed.output
    seeds = cli(*base, "--method", "dense-linear", "--seeds", "0,1")
    assert seeds.exit_code == 1 and "Run it once per seed" in seeds.output
