"""The fine-tuning stage end to end on synth-shapes and digits: every task and mode runs, its
figures equal pycocotools' rescoring of the written predictions, a killed run resumes to the
same weights, and each bad input exits 1 with its fix."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from bob_cache.data.synth_shapes import write_synth_shapes
from bob_cache.errors import FinetuneError
from bob_cache.finetune import checkpoint as ckpt
from bob_cache.finetune.trainer import Fitter
from bob_cache.pipelines.finetune import FinetuneConfig, finetune
from bob_cache.stores.results import ResultsTable

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny synth-shapes set (style a) and its cross-domain twin (style b)."""
    root = tmp_path_factory.mktemp("shapes")
    write_synth_shapes(root / "a", n=12, seed=0, style="a", image_size=64, val_fraction=0.34)
    write_synth_shapes(root / "b", n=6, seed=1, style="b", image_size=64, val_fraction=0.5)
    return {"a": root / "a", "b": root / "b"}


@pytest.fixture(scope="module")
def resnet_weights(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-init test_resnet saved as a checkpoint: 'pretrained' weights offline."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    net = timm.create_model("test_resnet", pretrained=False)
    path = tmp_path_factory.mktemp("weights") / "test_resnet.safetensors"
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(path))
    return path


def _config(tmp_path: Path, **kw: object) -> FinetuneConfig:
    base = dict(
        backbone="test_resnet", epochs=1, batch_size=4, image_size=64, workers=0,
        lrs=(1e-3,), out=str(tmp_path / "run"), results=str(tmp_path / "results"),
    )  # fmt: skip
    return FinetuneConfig(**{**base, **kw})  # type: ignore[arg-type]


def _coco(shapes: dict[str, Path], test: bool = True) -> dict[str, str]:
    a, b = shapes["a"], shapes["b"]
    out = {"train": str(a / "train.json"), "val": str(a / "val.json")}
    return {**out, "test": str(b / "val.json")} if test else out


def _rescore(gt: Path, predictions: Path, iou_type: str) -> float:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    coco = COCO(str(gt))
    results = json.loads(predictions.read_text())
    if not results:
        return 0.0
    evaluator = COCOeval(coco, coco.loadRes(str(predictions)), iouType=iou_type)
    evaluator.evaluate()
    evaluator.accumulate()
    evaluator.summarize()
    return float(evaluator.stats[0])


def test_detection_frozen_reports_pycocotools_numbers(
    tmp_path: Path, shapes: dict[str, Path], resnet_weights: Path
) -> None:
    config = _config(tmp_path, task="detection", mode="frozen", weights=str(resnet_weights),
                     lrs=(1e-3, 3e-3), **_coco(shapes))  # fmt: skip
    summary = finetune(config)
    run = Path(summary.files["predictions_val_bbox.json"]).parent
    for name in ("config.json", "log.jsonl", "checkpoint.pt", "best.safetensors", "metrics.json"):
        assert (run / name).is_file(), name
    assert (Path(config.out) / "best.safetensors").is_file()
    assert len(summary.runs) == 2 and summary.best_lr in (1e-3, 3e-3)
    val_gt, test_gt = shapes["a"] / "val.json", shapes["b"] / "val.json"
    assert summary.val["bbox_AP"] == _rescore(val_gt, run / "predictions_val_bbox.json", "bbox")
    assert summary.test["bbox_AP"] == _rescore(test_gt, run / "predictions_test_bbox.json", "bbox")
    assert summary.drop["bbox_AP"] == pytest.approx(
        summary.val["bbox_AP"] - summary.test["bbox_AP"]
    )
    rows = ResultsTable.open(config.results).read()
    assert set(rows["stage"]) == {"finetune"}
    assert set(rows["backbone"]) == {summary.slug} and summary.slug.startswith("test_resnet.file-")
    chosen = rows[(rows.setting == "frozen") & (rows.metric == "bbox_AP")]
    assert sorted(chosen["split"]) == ["test", "val"]
    assert set(rows["train_rows"]) == {8} and set(rows["val_rows"]) == {4}
    assert {"frozen lr=0.001", "frozen lr=0.003"} <= set(rows["setting"])
    assert "chosen by val" in chosen["protocol"].iloc[0]


def test_frozen_mode_leaves_the_backbone_unchanged(
    tmp_path: Path, shapes: dict[str, Path], resnet_weights: Path
) -> None:
    config = _config(tmp_path, task="detection", mode="frozen", weights=str(resnet_weights),
                     **_coco(shapes, test=False))  # fmt: skip
    finetune(config)
    before = load_file(str(resnet_weights))
    after = load_file(str(Path(config.out) / "best.safetensors"))
    body = {k.split("stages.net.", 1)[1]: v for k, v in after.items() if "stages.net." in k}
    assert body and all(torch.equal(before[k], v) for k, v in body.items())
    heads = [k for k in after if k.startswith("roi_heads.")]
    assert heads


def test_instance_finetune_scores_boxes_and_masks(
    tmp_path: Path, shapes: dict[str, Path], resnet_weights: Path
) -> None:
    config = _config(tmp_path, task="instance", mode="finetune", weights=str(resnet_weights),
                     steps_per_epoch=2, **_coco(shapes, test=False))  # fmt: skip
    summary = finetune(config)
    run = Path(summary.files["predictions_val_segm.json"]).parent
    gt = shapes["a"] / "val.json"
    assert summary.val["segm_AP"] == _rescore(gt, run / "predictions_val_segm.json", "segm")
    assert summary.val["bbox_AP"] == _rescore(gt, run / "predictions_val_bbox.json", "bbox")
    assert summary.primary == "segm_AP" and summary.test is None


def test_semantic_random_init_reports_miou_with_ignore_index(
    tmp_path: Path, shapes: dict[str, Path]
) -> None:
    a = shapes["a"]
    config = _config(tmp_path, task="semantic", mode="random-init", train=str(a / "train"),
                     val=str(a / "val"), test=str(shapes["b"] / "val"))  # fmt: skip
    summary = finetune(config)
    assert 0.0 <= summary.val["mIoU"] <= 1.0 and 0.0 <= summary.val["pixel_accuracy"] <= 1.0
    per_class = [v for k, v in summary.val.items() if k.startswith("iou_")]
    assert summary.val["mIoU"] == pytest.approx(np.mean(per_class))
    assert set(summary.drop) >= {"mIoU", "pixel_accuracy"}


def test_classification_on_digits_beats_chance(tmp_path: Path) -> None:
    config = _config(tmp_path, task="classification", mode="random-init", train="builtin:digits",
                     val="builtin:digits", test="builtin:digits", image_size=32, batch_size=32,
                     epochs=2, lrs=(3e-3,))  # fmt: skip
    summary = finetune(config)
    assert summary.val["top1"] > 0.2 and summary.test["top1"] > 0.2  # chance is 0.1
    rows = ResultsTable.open(config.results).read(split="test")
    assert set(rows["train_rows"]) == {1078} and set(rows["val_rows"]) == {359}


def test_one_source_without_splits_in_every_role_is_split_by_id_hash(
    tmp_path: Path, shapes: dict[str, Path]
) -> None:
    """The same split the probes see: a plain class folder (or a segmentation folder without
    split folders) named for train, val and test; a folder named for one role is taken whole."""
    from bob_cache.data import parse_source
    from tests.conftest import write_image_folder

    photos = write_image_folder(tmp_path / "photos", splits=("",), per_class=10)
    other = write_image_folder(tmp_path / "other", splits=("",), per_class=4)
    config = _config(tmp_path, task="classification", mode="random-init", train=str(photos),
                     val=str(photos), test=str(other), image_size=32)  # fmt: skip
    summary = finetune(config)
    assert (summary.info["train_rows"], summary.info["val_rows"]) == (18, 6)  # 0.6 / 0.2
    assert summary.info["test_rows"] == 12  # another folder, one role: all of it
    rows = ResultsTable.open(config.results).read()
    assert set(rows["split_rule"]) == {"id-hash 0.6/0.2/0.2"}
    flat = shapes["a"] / "train"  # images/ + masks/, classes.json beside it
    listed = {k: len(v) for k, v in parse_source(str(flat)).splits.items()}
    seg = finetune(_config(tmp_path / "seg", task="semantic", mode="random-init",
                           train=str(flat), val=str(flat), test=str(flat)))  # fmt: skip
    assert {k: seg.info[f"{k}_images"] for k in listed} == listed


class _Killed(Exception):
    pass


def test_resume_after_a_kill_equals_an_uninterrupted_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    kw = dict(task="classification", mode="random-init", train="builtin:digits",
              val="builtin:digits", image_size=32, batch_size=32, epochs=3,
              steps_per_epoch=4)  # fmt: skip
    whole = finetune(_config(tmp_path / "whole", **kw))
    end_epoch = Fitter._end_epoch
    calls = {"n": 0}

    def dying(self: Fitter, *args: object, **kwargs: object) -> object:
        best = end_epoch(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 2:
            raise _Killed  # after epoch 2's checkpoint
        return best

    monkeypatch.setattr(Fitter, "_end_epoch", dying)
    cut = _config(tmp_path / "cut", **kw)
    with pytest.raises(_Killed):
        finetune(cut)
    monkeypatch.setattr(Fitter, "_end_epoch", end_epoch)
    with pytest.raises(FinetuneError, match="pass --resume"):
        finetune(cut)
    resumed = finetune(replace(cut, resume=True))
    a = load_file(str(Path(whole.out) / "best.safetensors"))
    b = load_file(str(Path(resumed.out) / "best.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.val == whole.val
    log = [json.loads(line) for line in (Path(resumed.runs[0]["run_dir"]) / ckpt.LOG).open()]
    assert [r["epoch"] for r in log] == [0, 1, 2]  # epoch 3 alone was run after the resume


def test_resume_with_another_config_names_the_difference(tmp_path: Path) -> None:
    kw = dict(task="classification", mode="random-init", train="builtin:digits",
              val="builtin:digits", image_size=32, batch_size=32, steps_per_epoch=1)  # fmt: skip
    finetune(_config(tmp_path, **kw))
    with pytest.raises(FinetuneError, match=r"batch_size: 32 → 16.*Fix: rerun with the original"):
        finetune(_config(tmp_path, **{**kw, "batch_size": 16}, resume=True))


def test_a_torn_checkpoint_write_keeps_the_previous_one(tmp_path: Path) -> None:
    ckpt.save_checkpoint(tmp_path, {"epoch": 1})

    def torn(path: Path) -> None:
        path.write_bytes(b"half")
        raise _Killed

    with pytest.raises(_Killed):
        ckpt.atomic_write(tmp_path / ckpt.CHECKPOINT, torn)
    assert torch.load(tmp_path / ckpt.CHECKPOINT)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == [ckpt.CHECKPOINT]


def test_out_of_memory_suggests_batch_and_image_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bob_cache.finetune.task_classify import ClassificationTask

    def oom(*args: object, **kwargs: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(ClassificationTask, "loss", oom)
    config = _config(tmp_path, task="classification", mode="random-init",
                     train="builtin:digits", val="builtin:digits", image_size=32)  # fmt: skip
    with pytest.raises(FinetuneError, match="lower --batch-size.*--image-size"):
        finetune(config)


def _cli_args(tmp_path: Path, train: str, val: str, *extra: str) -> list[str]:
    return [
        "finetune", "--backbone", "test_resnet", "--train", train, "--val", val,
        "--image-size", "64", "--epochs", "1", "--batch-size", "4", "--workers", "0",
        "--out", str(tmp_path / "run"), "--results", str(tmp_path / "results"), "--quiet",
        *extra,
    ]  # fmt: skip


def _bad(tmp_path: Path, shapes: dict[str, Path], kind: str) -> tuple[list[str], str]:
    a = shapes["a"]
    if kind == "not-coco":
        bad = tmp_path / "bad.json"
        bad.write_text(json.dumps({"images": []}))
        return _cli_args(tmp_path, str(bad), str(a / "val.json"), "--task", "detection",
                         "--mode", "random-init"), "annotations"  # fmt: skip
    if kind == "missing-images":
        moved = tmp_path / "moved.json"
        moved.write_text((a / "train.json").read_text())
        return _cli_args(tmp_path, str(moved), str(a / "val.json"), "--task", "detection",
                         "--mode", "random-init"), "--images"  # fmt: skip
    if kind == "unknown-class-id":
        import shutil

        from PIL import Image

        copy = tmp_path / "seg"
        shutil.copytree(a, copy)
        mask = next((copy / "train" / "masks").iterdir())
        pixels = np.array(Image.open(mask))
        pixels[0, 0] = 7
        Image.fromarray(pixels).save(mask)
        return _cli_args(tmp_path, str(copy / "train"), str(copy / "val"), "--task", "semantic",
                         "--mode", "random-init"), "7"  # fmt: skip
    if kind == "no-pyramid":
        return _cli_args(tmp_path, str(a / "train.json"), str(a / "val.json"), "--task",
                         "detection", "--mode", "random-init", "--backbone",
                         "tv:swin_t"), "cannot give a feature pyramid"  # fmt: skip
    if kind == "bad-lr":
        return _cli_args(tmp_path, "builtin:digits", "builtin:digits", "--task",
                         "classification", "--lr", "1e-3,fast"), "--lr got 'fast'"  # fmt: skip
    return _cli_args(tmp_path, "builtin:digits", "builtin:digits", "--task", "classification",
                     "--mode", "frozn"), "Did you mean 'frozen'"  # fmt: skip


@pytest.mark.parametrize(
    "kind",
    ["not-coco", "missing-images", "unknown-class-id", "no-pyramid", "bad-lr", "bad-mode"],
)
def test_bad_input_exits_1_with_the_fix(
    tmp_path: Path, shapes: dict[str, Path], cli: object, kind: str
) -> None:
    args, hint = _bad(tmp_path, shapes, kind)
    result = cli(*args)  # type: ignore[operator]
    assert result.exit_code == 1, result.output
    assert hint in result.output
    assert not (tmp_path / "results").exists()  # nothing half-written


@pytest.mark.parametrize(
    ("task", "option", "hint"),
    [
        ("detection", "train", "expected a COCO instances json"),
        ("detection", "val", "expected a COCO instances json"),
        ("semantic", "train", "expected a folder with images/ and masks/"),
        ("classification", "val", "expected a folder of images"),
    ],
)
def test_missing_input_is_named_before_any_weights_load(
    tmp_path: Path,
    shapes: dict[str, Path],
    cli: object,
    monkeypatch: pytest.MonkeyPatch,
    task: str,
    option: str,
    hint: str,
) -> None:
    """Pretrained weights that cannot download must not hide a mistyped annotation path."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))  # empty cache: a download would fail
    a = shapes["a"]
    given = {
        "detection": (str(a / "train.json"), str(a / "val.json")),
        "semantic": (str(a / "train"), str(a / "val")),
        "classification": ("builtin:digits", "builtin:digits"),
    }[task]
    missing = str(tmp_path / "typo" / "instances.json")
    train, val = (missing, given[1]) if option == "train" else (given[0], missing)
    args = _cli_args(tmp_path, train, val, "--task", task, "--backbone", "test_resnet.r160_in1k")
    result = cli(*args)  # type: ignore[operator]
    assert result.exit_code == 1, result.output
    output = " ".join(result.output.split())
    assert f"--{option} {missing}" in output and hint in output
    assert "Fix: pass the path of an existing" in output
    assert "weights" not in output and "download" not in output
    assert not (tmp_path / "run").exists() and not (tmp_path / "results").exists()


def test_cli_prints_the_sweep_and_json(
    tmp_path: Path, shapes: dict[str, Path], cli: object
) -> None:
    a = shapes["a"]
    args = _cli_args(tmp_path, str(a / "train"), str(a / "val"), "--task", "semantic", "--mode",
                     "random-init", "--lr", "1e-3,2e-3", "--json")  # fmt: skip
    result = cli(*args)  # type: ignore[operator]
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    assert [r["lr"] for r in summary["runs"]] == [1e-3, 2e-3]
    assert summary["best_lr"] == max(summary["runs"], key=lambda r: r["val"]["mIoU"])["lr"]


@pytest.mark.slow
def test_torchrun_trains_on_two_processes(tmp_path: Path) -> None:
    import subprocess
    import sys

    out = tmp_path / "run"
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
        "--master_port", "29617", "-m", "bob_cache.cli", "finetune", "--task",
        "classification", "--backbone", "test_resnet", "--mode", "random-init", "--train",
        "builtin:digits", "--val", "builtin:digits", "--image-size", "32", "--epochs", "1",
        "--batch-size", "32", "--workers", "0", "--device", "cpu", "--out", str(out),
        "--results", str(tmp_path / "results"), "--quiet", "--json",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    summary = json.loads(done.stdout[done.stdout.index("{") :])  # rank 0 alone prints
    log = [json.loads(line) for line in (Path(summary["runs"][0]["run_dir"]) / ckpt.LOG).open()]
    assert log[0]["images"] == 512  # rank 0 trained its half: 16 of the 33 full batches
    assert summary["dataset"] == "digits" and "top1" in summary["val"]


@pytest.mark.slow
def test_detection_learns_the_shapes(
    tmp_path_factory: pytest.TempPathFactory, mobilenet_weights: Path
) -> None:
    root = tmp_path_factory.mktemp("learn")
    write_synth_shapes(root / "a", n=96, seed=0, image_size=128)
    config = FinetuneConfig(
        task="detection", backbone="tv:mobilenet_v2", weights=str(mobilenet_weights),
        mode="frozen", train=str(root / "a" / "train.json"), val=str(root / "a" / "val.json"),
        lrs=(1e-3,), epochs=3, batch_size=8, image_size=128, workers=0, out=str(root / "run"),
        results=str(root / "results"),
    )  # fmt: skip
    summary = finetune(config)
    losses = [h["train_loss"] for h in summary.runs[0]["history"]]
    aps = [h["val"]["bbox_AP50"] for h in summary.runs[0]["history"]]
    assert losses[-1] < losses[0] * 0.8, losses
    assert aps[-1] > aps[0] and summary.val["bbox_AP50"] > 0.3, aps


def test_gradient_accumulation_updates_once_per_accum_steps(tmp_path: Path) -> None:
    config = _config(tmp_path, task="classification", mode="random-init", train="builtin:digits",
                     val="builtin:digits", image_size=32, batch_size=16, steps_per_epoch=6,
                     accum_steps=3, epochs=2)  # fmt: skip
    summary = finetune(config)
    state = torch.load(Path(summary.runs[0]["run_dir"]) / ckpt.CHECKPOINT, weights_only=False)
    assert state["updates"] == 4 and state["epoch"] == 2  # 6 batches per epoch, 3 per update
    assert [h["images"] for h in summary.runs[0]["history"]] == [96, 96]


def test_detection_epoch_sees_full_batches_and_says_so(
    tmp_path: Path, cli: object, caplog: pytest.LogCaptureFixture
) -> None:
    """45 images at batch size 8: 40 per epoch (as torchvision's detection reference trains),
    stated in the log, the epoch records, the run record and every row's protocol."""
    info = write_synth_shapes(tmp_path / "s", n=60, seed=0, image_size=48, val_fraction=0.25)
    root = tmp_path / "s"
    train = json.loads((root / "train.json").read_text())
    assert len(train["images"]) == 45, info
    args = _cli_args(tmp_path, str(root / "train.json"), str(root / "val.json"), "--task",
                     "detection", "--mode", "random-init", "--batch-size", "8",
                     "--image-size", "48")  # fmt: skip
    with caplog.at_level("INFO", logger="bob_cache.finetune.trainer"):
        result = cli(*args)  # type: ignore[operator]
    assert result.exit_code == 0, result.output
    assert "each epoch trained on 40 of the 45 training images" in result.output
    assert "trains on 40 of the 45 training images: full batches of 8" in caplog.text
    run = json.loads((tmp_path / "run" / "summary.json").read_text())["runs"][0]
    assert [(h["images"], h["train_images"]) for h in run["history"]] == [(40, 45)]
    assert run["train_images_per_epoch"] == 40
    rows = ResultsTable.open(str(tmp_path / "results")).read()
    assert rows["protocol"].str.contains("40 of 45 images per epoch: full batches of 8").all()
