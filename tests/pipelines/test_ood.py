"""The ood stage: generalization under shift with class maps, detection with stored detector
state, every number recomputed here with numpy and scikit-learn, streaming equal to in-memory,
crash repair, bad input, and the CLI end to end on real digits."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from sklearn.metrics import average_precision_score, roc_auc_score

from bob_cache.errors import (
    ClassMapError,
    DetectorDamagedError,
    FeatureSetNotFoundError,
    HeadMismatchError,
    SpecError,
    UnknownDetectorError,
)
from bob_cache.ood import create_detector
from bob_cache.pipelines.ood import OODConfig, ood, raw_head
from bob_cache.pipelines.probe import ProbeConfig, probe
from bob_cache.stores import feature_set as feature_set_module
from bob_cache.stores import open_store
from bob_cache.stores.head_store import list_heads, read_head
from bob_cache.stores.results import ResultsTable
from tests.conftest import TINY, blobs, write_feature_sets

NAMES = ["cat", "dog", "fish", "bird"]
TRAIN = "toy/train/model.tag/feat00000001"


def world(location: Path) -> dict[str, np.ndarray]:
    """ID toy set (4 named classes), a shifted copy of 3 classes named differently, and a
    far-off detect set; returns the arrays written."""
    x, y = blobs(900, classes=4, dim=12, spread=3.0)
    write_feature_sets(location, {"train": (x[:500], y[:500]), "val": (x[500:700], y[500:700]),
                                  "test": (x[700:], y[700:])}, class_names=NAMES)  # fmt: skip
    xs, ys = blobs(400, classes=4, dim=12, spread=3.0, seed=0)
    xs = xs + np.random.default_rng(1).normal(0, 4.0, xs.shape).astype(np.float32)
    keep = ys != 2  # the shift set has no fish; its labels index its own class list
    shift_names = ["Bird", "CAT", "dog"]
    relabel = {3: 0, 0: 1, 1: 2}
    ys_own = np.array([relabel[v] for v in ys[keep]])
    write_feature_sets(location, {"test": (xs[keep], ys_own)}, dataset="toyc",
                       key="feat00000002", class_names=shift_names)  # fmt: skip
    far = np.random.default_rng(2).normal(0, 5, (200, 12)).astype(np.float32)
    write_feature_sets(location, {"test": (far, -np.ones(200, np.int64))}, dataset="far",
                       key="feat00000003")  # fmt: skip
    return {"x": x, "y": y, "xs": xs[keep], "ys": ys[keep], "far": far}


def run(location: Path, results: Path, **kw: object):
    fields = {"shifts": ("toyc",), "detect": ("far",), **kw}
    return ood(OODConfig(store=str(location), backbone="model", dataset="toy",
                         results=str(results), **fields))  # fmt: skip


def test_generalization_is_the_stored_heads_top1_on_shared_classes(tmp_path: Path) -> None:
    data = world(tmp_path / "s")
    report = run(tmp_path / "s", tmp_path / "res", detect=())
    store = open_store(tmp_path / "s")
    (record,) = list_heads(store.get(TRAIN))  # fitted by the probe protocol: none existed
    assert record.setting == "full" and record.train_rows == 500 and record.val_rows == 200
    params = read_head(store.get(TRAIN), record)
    shared = np.array([0, 1, 3])  # cat, dog, bird: fish is absent from the shift set
    logits = params.scores(data["xs"])[:, shared]
    top1 = np.mean(shared[logits.argmax(1)] == data["ys"])
    xt, yt = data["x"][700:], data["y"][700:]
    same = np.isin(yt, shared)
    id_shared = np.mean(shared[params.scores(xt[same])[:, shared].argmax(1)] == yt[same])
    (g,) = report.generalization
    assert g["classes_shared"] == 3 and g["rows"] == len(data["ys"]) and g["rows_left_out"] == 0
    assert g["top1"] == pytest.approx(top1, abs=1e-12)
    assert g["id_top1_shared"] == pytest.approx(id_shared, abs=1e-12)
    assert g["drop"] == pytest.approx(id_shared - top1, abs=1e-12) and g["drop"] > 0.03
    assert report.id_top1 == pytest.approx(np.mean(params.scores(xt).argmax(1) == yt))
    assert report.id_top1 == record.metrics["top1"]  # the probe's own test top-1
    frame = ResultsTable.open(tmp_path / "res").read(stage="ood")
    value = frame.set_index(["setting", "metric"])["value"]
    assert value["shift:toyc", "top1"] == pytest.approx(top1)
    assert value["shift:mean", "drop"] == pytest.approx(id_shared - top1)
    assert set(frame["train_rows"]) == {500} and set(frame["val_rows"]) == {200}
    assert all("3 shared classes" in p for p in frame[frame.setting == "shift:toyc"].protocol)


def test_a_class_map_file_replaces_name_matching(tmp_path: Path) -> None:
    data = world(tmp_path / "s")
    cmap = tmp_path / "map.csv"
    cmap.write_text("shift,id\nBird,bird\nCAT,cat\n")  # dog left out on purpose
    report = run(tmp_path / "s", tmp_path / "res", detect=(), class_map=str(cmap))
    (g,) = report.generalization
    assert g["classes_shared"] == 2
    assert g["rows"] == int(np.isin(data["ys"], [0, 3]).sum()) and g["rows_left_out"] > 0
    (tmp_path / "map.json").write_text(json.dumps({"Bird": "bird", "CAT": "cat"}))
    again = run(tmp_path / "s", tmp_path / "res2", detect=(), class_map=str(tmp_path / "map.json"))
    assert again.generalization[0]["top1"] == g["top1"]


def test_detection_metrics_equal_sklearn_on_detectors_fitted_here(tmp_path: Path) -> None:
    data = world(tmp_path / "s")
    report = run(tmp_path / "s", tmp_path / "res", shifts=())
    store = open_store(tmp_path / "s")
    (record,) = list_heads(store.get(TRAIN))
    head = raw_head(read_head(store.get(TRAIN), record))
    train = [(data["x"][:500], data["y"][:500])]
    is_id = np.r_[np.ones(200), np.zeros(200)]
    by_name = {d["detector"]: d for d in report.detection}
    assert set(by_name) == {"energy", "knn", "mahalanobis", "maxlogit", "msp", "react",
                            "relative-mahalanobis", "vim"}  # fmt: skip
    for name, got in by_name.items():
        detector = create_detector(name).fit(train, head=head)
        scores = np.r_[detector.score(data["x"][700:]), detector.score(data["far"])]
        assert got["auroc"] == pytest.approx(roc_auc_score(is_id, scores), abs=1e-9), name
        assert got["aupr_in"] == pytest.approx(average_precision_score(is_id, scores), abs=1e-9)
        assert got["aupr_out"] == pytest.approx(average_precision_score(1 - is_id, -scores))
        threshold = np.sort(scores[:200])[::-1][int(np.ceil(0.95 * 200)) - 1]
        assert got["fpr95"] == pytest.approx(np.mean(scores[200:] >= threshold)), name
    assert by_name["mahalanobis"]["auroc"] > 0.9  # far-off rows are found
    frame = ResultsTable.open(tmp_path / "res").read(stage="ood")
    assert set(frame.setting) == {"detect:far"}
    rows_seen = frame.groupby("method")[["train_rows", "val_rows"]].first().T.to_dict()
    assert rows_seen["knn"] == rows_seen["mahalanobis"] == {"train_rows": 500, "val_rows": 0}
    assert rows_seen["msp"] == rows_seen["vim"] == {"train_rows": 500, "val_rows": 200}  # head
    assert set(frame.metric) == {"auroc", "aupr_in", "aupr_out", "fpr95"}


def test_head_logits_on_raw_features_equal_the_standardized_head(tmp_path: Path) -> None:
    data = world(tmp_path / "s")
    run(tmp_path / "s", tmp_path / "res", shifts=(), detectors=("msp",))
    store = open_store(tmp_path / "s")
    params = read_head(store.get(TRAIN), list_heads(store.get(TRAIN))[0])
    x = data["x"][:50]
    assert np.allclose(raw_head(params).logits(x.astype(np.float64)), params.scores(x), atol=1e-4)


def test_detector_state_is_stored_reused_and_refit_when_shards_change(tmp_path: Path) -> None:
    data = world(tmp_path / "s")
    first = run(tmp_path / "s", tmp_path / "res", shifts=())
    states = {d["detector"]: d["state"] for d in first.detection}
    assert states["knn"] == states["vim"] == "fitted" and states["msp"] == "computed"
    second = run(tmp_path / "s", tmp_path / "res", shifts=())
    assert {d["detector"]: d["state"] for d in second.detection}["knn"] == "stored"
    assert second.detection == [{**d, "state": s["state"]} for d, s in
                                zip(first.detection, second.detection, strict=True)]  # fmt: skip
    assert second.rows_written == 0  # the results table already has every unit
    fs = open_store(tmp_path / "s", mode="a").get(TRAIN)
    fs.uncommit([1])
    x, y = data["x"][:500], data["y"][:500]
    fs.write_rows(x, labels=y, ids=[f"train/{i:05d}" for i in range(500)], shards=[1])
    probe(ProbeConfig(store=str(tmp_path / "s"), dataset="toy", backbone="model",
                      methods=("linear",), results=str(tmp_path / "res"), force=True))  # fmt: skip
    third = run(tmp_path / "s", tmp_path / "res", shifts=())
    assert {d["detector"]: d["state"] for d in third.detection}["mahalanobis"] == "fitted"
    refit = run(tmp_path / "s", tmp_path / "res", shifts=(), refit=True, detectors=("knn",))
    assert refit.detection[0]["state"] == "fitted"


def test_streaming_under_a_tiny_budget_equals_in_memory(tmp_path: Path) -> None:
    world(tmp_path / "s")
    in_memory = run(tmp_path / "s", tmp_path / "res", refit=True)
    streamed = run(tmp_path / "s", tmp_path / "res", refit=True, max_memory_gb=1e-6)
    for a, b in zip(in_memory.detection, streamed.detection, strict=True):
        assert a["detector"] == b["detector"]
        for metric in ("auroc", "aupr_in", "aupr_out", "fpr95"):
            assert a[metric] == pytest.approx(b[metric], abs=1e-9), (a["detector"], metric)
    assert in_memory.generalization == streamed.generalization
    group = open_store(tmp_path / "s").get(TRAIN).group["detectors"]
    (knn,) = [g for name, g in group.groups() if name.startswith("knn-")]
    assert knn["bank"].shape == (500, 12)  # the bank is kept beside the set


# Every array a detector stores, in the order written; the record follows the last.
DETECTOR_STEPS = [
    ("vim", "weight"), ("vim", "bias"), ("vim", "origin"), ("vim", "residual_space"),
    ("mahalanobis", "classes"), ("mahalanobis", "means"), ("mahalanobis", "precision"),
    ("relative-mahalanobis", "background_mean"),
    ("relative-mahalanobis", "background_precision"), ("knn", "bank"),
]  # fmt: skip
FAST_STEPS = {("vim", "residual_space"), ("knn", "bank")}  # the others: -m slow


@pytest.mark.parametrize(
    ("detector", "array"),
    [pytest.param(*step, marks=() if step in FAST_STEPS else pytest.mark.slow)
     for step in DETECTOR_STEPS],
)  # fmt: skip
def test_a_fit_killed_while_storing_is_repaired_by_rerunning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, detector: str, array: str
) -> None:
    world(tmp_path / "s")
    steps: list[str] = []
    with monkeypatch.context() as mp:
        mp.setattr(feature_set_module, "crash_point", steps.append)
        clean = run(tmp_path / "s", tmp_path / "clean", shifts=(), detectors=(detector,))
    assert f"detector-{array}" in steps
    (tmp_path / "s2").mkdir()
    world(tmp_path / "s2")

    def kill(step: str) -> None:
        if step == f"detector-{array}":
            raise KeyboardInterrupt

    with monkeypatch.context() as mp, pytest.raises(KeyboardInterrupt):
        mp.setattr(feature_set_module, "crash_point", kill)
        run(tmp_path / "s2", tmp_path / "res", shifts=(), detectors=(detector,))
    repaired = run(tmp_path / "s2", tmp_path / "res", shifts=(), detectors=(detector,))
    assert repaired.detection[0]["state"] == "fitted"  # the half-written state was not used
    for metric in ("auroc", "aupr_in", "aupr_out", "fpr95"):
        assert repaired.detection[0][metric] == clean.detection[0][metric], metric
    again = run(tmp_path / "s2", tmp_path / "res", shifts=(), detectors=(detector,))
    assert again.detection[0]["state"] != "fitted"  # stored whole: reused, not refitted


def test_a_damaged_detector_file_is_named_with_the_refit(tmp_path: Path) -> None:
    world(tmp_path / "s")
    run(tmp_path / "s", tmp_path / "res", shifts=(), detectors=("mahalanobis",))
    root = tmp_path / "s" / TRAIN / "detectors"
    (maha,) = [p for p in root.iterdir() if p.name.startswith("mahalanobis-")]
    for chunk in (maha / "precision" / "c").rglob("*"):
        if chunk.is_file():
            chunk.write_bytes(b"garbage")
    with pytest.raises(DetectorDamagedError, match="'precision' array cannot be read") as exc:
        run(tmp_path / "s", tmp_path / "res", shifts=(), detectors=("mahalanobis",))
    assert "--refit" in str(exc.value) and maha.name in str(exc.value)
    fixed = run(tmp_path / "s", tmp_path / "res", shifts=(), detectors=("mahalanobis",),
                refit=True)  # fmt: skip
    assert fixed.detection[0]["state"] == "fitted"


def test_bad_input_is_refused_with_the_fix(tmp_path: Path) -> None:
    location = tmp_path / "s"
    world(location)
    other = ["ant", "bee"]
    x, _ = blobs(40, classes=2, dim=12)
    write_feature_sets(location, {"test": (x, np.arange(40) % 2)}, dataset="bugs",
                       key="feat00000004", class_names=other)  # fmt: skip
    with pytest.raises(ClassMapError, match="shares no class") as exc:
        run(location, tmp_path / "r", shifts=("bugs",), detect=())
    assert "'ant', 'bee'" in str(exc.value) and "'cat', 'dog'" in str(exc.value)
    assert "--class-map" in str(exc.value)
    bad_map = tmp_path / "map.json"
    bad_map.write_text(json.dumps({"Bird": "parrot", "wolf": "dog"}))
    with pytest.raises(ClassMapError, match=r"shift classes \['wolf'\].*ID classes \['parrot'\]"):
        run(location, tmp_path / "r", detect=(), class_map=str(bad_map))
    write_feature_sets(location, {"test": (np.zeros((0, 12), np.float32), np.zeros(0, np.int64))},
                       dataset="empty", key="feat00000005")  # fmt: skip
    with pytest.raises(SpecError, match="Detect set 'empty' .* has no valid rows"):
        run(location, tmp_path / "r", shifts=(), detect=("empty",))
    write_feature_sets(location, {"test": (x, np.arange(40) % 2)}, dataset="layer2",
                       key="feat00000006", spec={"layer": "stage2", "pool": "avg",
                                                 "dtype": "float32"})  # fmt: skip
    with pytest.raises(FeatureSetNotFoundError, match="not with the ID set's recipe") as exc:
        run(location, tmp_path / "r", shifts=(), detect=("layer2",))
    assert "layer: ID 'final' vs 'stage2'" in str(exc.value)
    with pytest.raises(FeatureSetNotFoundError, match="No feature set of detect dataset 'nope'"):
        run(location, tmp_path / "r", shifts=(), detect=("nope",))
    with pytest.raises(UnknownDetectorError, match="Did you mean 'mahalanobis'"):
        run(location, tmp_path / "r", detectors=("mahalanobis2",))
    with pytest.raises(SpecError, match="Nothing to evaluate"):
        run(location, tmp_path / "r", shifts=(), detect=())
    assert not (tmp_path / "r").exists()  # nothing was written by a refused call


def test_a_head_of_another_feature_key_is_refused(tmp_path: Path) -> None:
    location = tmp_path / "s"
    world(location)
    x, y = blobs(300, classes=4, dim=8)
    spec = {"layer": "stage3", "pool": "avg", "dtype": "float32"}
    splits = {"train": (x[:200], y[:200]), "test": (x[200:], y[200:])}
    write_feature_sets(location, splits, key="feat00000009", spec=spec, class_names=NAMES)
    config = ProbeConfig(
        store=str(location),
        dataset="toy",
        backbone="model",
        feature="feat00000009",
        methods=("linear",),
        results=str(tmp_path / "r"),
    )
    other = probe(config)
    (head,) = other.heads
    with pytest.raises(HeadMismatchError, match="was fitted on feature key feat00000009"):
        run(location, tmp_path / "r", feature="feat00000001", head=head, detect=())


@pytest.mark.slow
def test_cli_end_to_end_on_digits_and_a_generated_shift(cli, tmp_path: Path) -> None:
    store, results, shifted = tmp_path / "store", tmp_path / "res", tmp_path / "shifted"
    assert cli("extract", "--data", "builtin:digits", "--store", store, *TINY).exit_code == 0
    made = cli("shift", "--data", "builtin:digits", "--out", shifted, "--corruption",
               "gaussian_noise", "--severity", "5", "--split", "test", "--json")  # fmt: skip
    assert made.exit_code == 0, made.output
    copy = json.loads(made.stdout)["outputs"][0]["data"]
    assert cli("extract", "--data", copy, "--store", store, *TINY).exit_code == 0
    name = Path(copy).name
    args = ("ood", "--store", store, "--backbone", "test_resnet", "--id", "digits",
            "--results", results)  # fmt: skip
    done = cli(*args, "--shift", name, "--detect", name, "--knn-k", "5", "--json")
    assert done.exit_code == 0, done.output
    report = json.loads(done.stdout)
    (g,) = report["generalization"]
    assert g["classes_shared"] == 10 and g["rows"] == 360 and g["top1"] < report["id_top1"]
    assert len(report["detection"]) == 8 and all(0 <= d["auroc"] <= 1 for d in report["detection"])
    frame = ResultsTable.open(results).read(stage="ood")
    assert {f"shift:{name}", f"detect:{name}", "id", "shift:mean"} == set(frame.setting)
    table = cli(*args, "--shift", name, "--detect", name, "--detector", "knn,energy")
    assert table.exit_code == 0 and "Generalization" in table.stdout and "knn" in table.stdout
    bad = cli(*args, "--detect", name, "--detector", "enrgy")
    assert bad.exit_code == 1 and "Did you mean 'energy'" in bad.output
    none = cli(*args, "--detect", "missing")
    assert none.exit_code == 1 and "bob-cache extract" in " ".join(none.output.split())
