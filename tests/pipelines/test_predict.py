"""Stored probe heads and ``predict``: the head predicts exactly what the probe scored, on
stored rows and on images embedded from the set's provenance, and is refused when it does
not fit (another feature key, recomputed shards, damage)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from zarr.storage import MemoryStore

import bob_cache.pipelines.probe as probe_module
from bob_cache.errors import HeadDamagedError, HeadMismatchError, HeadNotFoundError, StaleHeadError
from bob_cache.pipelines.predict import PredictConfig, predict
from bob_cache.pipelines.probe import ProbeConfig, probe
from bob_cache.probes import Features
from bob_cache.stores import feature_set as feature_set_module
from bob_cache.stores import open_store
from bob_cache.stores.head_store import list_heads, read_head
from bob_cache.stores.results import ResultsTable
from tests.conftest import TINY, blobs, write_feature_sets, write_image_folder

TRAIN = "toy/train/model.tag/feat00000001"


def toy(location: object) -> np.ndarray:
    """Overlapping clusters (the probe gets some test rows wrong); returns the test rows."""
    x, y = blobs(500, classes=4, dim=12, spread=4.0)
    splits = {"train": (x[:300], y[:300]), "val": (x[300:400], y[300:400])}
    write_feature_sets(location, {**splits, "test": (x[400:], y[400:])})
    return x[400:]


def run_probe(location: object, results: Path, **kw: object):
    return probe(
        ProbeConfig(store=location, dataset="toy", backbone="model", results=str(results), **kw)
    )


def predicting(location: object, **kw: object):
    return predict(PredictConfig(store=location, dataset="toy", backbone="model", **kw))


@pytest.mark.parametrize("backend", ["local", "memory-store"])
def test_a_stored_head_predicts_exactly_what_the_probe_scored(
    backend: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    location = str(tmp_path / "store") if backend == "local" else MemoryStore()
    x_test = toy(location)
    fitted: list = []
    real_sweep = probe_module.sweep
    monkeypatch.setattr(probe_module, "sweep", lambda *a, **kw: _keep(real_sweep, fitted, a, kw))
    summary = run_probe(location, tmp_path / "res", methods=("linear",))
    (model,) = fitted
    frame = ResultsTable.open(tmp_path / "res").read()
    top1 = frame[(frame.metric == "top1") & (frame.setting == "full")]["value"].item()
    assert 0.6 < top1 < 0.95  # some rows wrong: the comparison below means something
    (name,) = summary.heads
    result = predicting(location, split="test")
    assert result.head.name == name and result.feature_set.startswith("toy/test/")
    assert result.accuracy == top1  # recomputed from predict's outputs
    records = result.records()
    labels = np.array([r["label"] for r in records])
    assert np.mean([r["predicted"] for r in records] == labels) == top1
    expected = model.scores(Features.in_memory(x_test))
    assert np.abs(result.scores - expected).max() <= 1e-6
    assert result.head.C == model.C and result.head.train_rows == 300
    assert result.head.val_rows == 100
    assert set(result.head.generations) == {TRAIN, "toy/val/model.tag/feat00000001"}
    store = open_store(location)
    (record,) = list_heads(store.get(TRAIN))
    stored = read_head(store.get(TRAIN), record)
    assert np.array_equal(stored.weight, model.weight) and stored.weight.dtype == np.float32
    assert np.array_equal(stored.mean, model.standardizer.mean)
    probs = np.array([[t["probability"] for t in r["top"]] for r in records])
    assert np.allclose(probs.sum(axis=1), 1.0) and (np.diff(probs, axis=1) <= 0).all()


def _keep(real, fitted, args, kw):
    result = real(*args, **kw)
    fitted.append(result.model)
    return result


def test_few_shot_heads_are_stored_and_the_full_one_is_the_default(tmp_path: Path) -> None:
    location = tmp_path / "store"
    toy(location)
    summary = run_probe(location, tmp_path / "res", methods=("linear",), shots=(5,), seeds=(0, 1))
    assert len(summary.heads) == 3  # full once, 5-shot × 2 seeds
    by_setting = {r.setting: r for r in list_heads(open_store(location).get(TRAIN))}
    assert by_setting["5-shot"].train_rows == 20 and by_setting["5-shot"].val_rows == 0
    assert set(by_setting["5-shot"].generations) == {TRAIN}  # only train rows fitted it
    assert predicting(location, split="test").head.setting == "full"
    shot = next(n for n in summary.heads if n != by_setting["full"].name)
    chosen = predicting(location, split="test", head=shot[:6])  # a prefix is enough
    assert chosen.head.setting == "5-shot"
    with pytest.raises(HeadNotFoundError, match="No probe head 'nope'.*Stored heads: .*--head"):
        predicting(location, split="test", head="nope")


def test_no_head_for_multi_label_sets_or_knn(tmp_path: Path) -> None:
    location = tmp_path / "store"
    x, y = blobs(200, classes=3, dim=8)
    multi = np.eye(3, dtype=np.int64)[y]
    write_feature_sets(location, {"train": (x[:150], multi[:150]), "test": (x[150:], multi[150:])})
    assert run_probe(location, tmp_path / "res", methods=("linear",)).heads == []
    toy(tmp_path / "single")
    assert run_probe(tmp_path / "single", tmp_path / "r2", methods=("knn",)).heads == []
    with pytest.raises(HeadNotFoundError, match="No probe head is stored.*--method linear"):
        predicting(tmp_path / "single", split="test")


def test_a_head_is_refused_for_another_feature_key(tmp_path: Path) -> None:
    location = tmp_path / "store"
    toy(location)
    x, y = blobs(200, classes=4, dim=12, seed=1)
    write_feature_sets(
        location, {"train": (x[:150], y[:150]), "test": (x[150:], y[150:])},
        key="feat00000002", spec={"layer": "layer3", "pool": "avg", "dtype": "float32"},
    )  # fmt: skip
    (name,) = run_probe(
        location, tmp_path / "res", methods=("linear",), feature="feat00000001"
    ).heads
    with pytest.raises(HeadMismatchError) as exc:
        predicting(location, split="test", head=name, feature="feat00000002")
    message = str(exc.value)
    assert f"'{name}' was fitted on feature key feat00000001" in message
    assert "layer layer3, pool avg" in message and "--feature feat00000001" in message
    assert predicting(location, split="test", head=name).feature_set.endswith("feat00000001")
    with pytest.raises(HeadNotFoundError, match="No probe head is stored"):
        predicting(location, split="test", feature="feat00000002")  # none fitted on that key


def test_a_head_over_recomputed_shards_is_stale_until_refit(tmp_path: Path) -> None:
    location = tmp_path / "store"
    toy(location)
    run_probe(location, tmp_path / "res", methods=("linear",))
    fs = open_store(location, mode="a").get(TRAIN)
    x, y = blobs(500, classes=4, dim=12, spread=4.0)
    fs.uncommit([2])
    fs.write_rows(x[:300], labels=y[:300], ids=[f"train/{i:05d}" for i in range(300)], shards=[2])
    with pytest.raises(StaleHeadError, match=r"shards \[2\] of .* recomputed") as exc:
        predicting(location, split="test")
    assert "bob-cache probe --store" in str(exc.value) and "--force" in str(exc.value)
    run_probe(location, tmp_path / "res", methods=("linear",), force=True)
    assert predicting(location, split="test").accuracy is not None


def test_a_probe_killed_while_storing_a_head_is_repaired_by_rerunning(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    location = tmp_path / "store"
    toy(location)

    def kill(step: str) -> None:
        if step == "head-mean":
            raise KeyboardInterrupt

    monkeypatch.setattr(feature_set_module, "crash_point", kill)
    with pytest.raises(KeyboardInterrupt):
        run_probe(location, tmp_path / "res", methods=("linear",))
    monkeypatch.undo()
    with pytest.raises(HeadDamagedError, match="is incomplete.*--force"):
        predicting(location, split="test")
    again = run_probe(location, tmp_path / "res", methods=("linear",))  # no --force needed
    assert again.units_run == 1 and len(again.heads) == 1
    assert predicting(location, split="test").head.name == again.heads[0]


def test_cli_predict_split_ls_and_a_damaged_head(cli, tmp_path: Path) -> None:
    location = tmp_path / "store"
    toy(location)
    done = cli(
        "probe", "--store", location, "--dataset", "toy", "--backbone", "model",
        "--method", "linear", "--results", tmp_path / "res", "--json",
    )  # fmt: skip
    assert done.exit_code == 0, done.output
    (name,) = json.loads(done.stdout)["heads"]
    base = ["predict", "--store", location, "--dataset", "toy", "--backbone", "model"]
    shown = cli(*base, "--split", "test", "--json", "-k", "2")
    assert shown.exit_code == 0, shown.output
    data = json.loads(shown.stdout)
    assert data["head"]["name"] == name and data["labeled"] == 100
    hits = [p["predicted"] == p["label"] for p in data["predictions"]]
    assert np.mean(hits) == data["accuracy"] == data["head"]["metrics"]["top1"]
    assert len(data["predictions"][0]["top"]) == 2
    human = cli(*base, "--split", "test")
    assert "Accuracy on 100 labeled row(s)" in human.stdout and name in human.stdout
    listing = json.loads(cli("ls", location, "--json").stdout)
    assert {r["split"]: r["heads"] for r in listing} == {"train": 1, "val": 0, "test": 0}
    (head,) = json.loads(cli("ls", location, "--heads", "--json").stdout)
    assert (head["name"], head["setting"], head["state"]) == (name, "full", "ok")
    del open_store(location, mode="a").get(TRAIN).group[f"heads/{name}/weight"]
    broken = cli(*base, "--split", "test")
    assert broken.exit_code == 1 and "Traceback" not in broken.stderr
    assert f"Probe head '{name}'" in broken.stderr and "'weight' array" in broken.stderr
    assert "bob-cache probe --store" in broken.stderr and "--force" in broken.stderr
    both = cli(*base, "--split", "test", "--image", tmp_path / "x.png")
    assert both.exit_code == 1 and "exactly one of --split NAME or --image FILE" in both.stderr


def test_predict_help_has_an_example(cli) -> None:
    result = cli("predict", "--help")
    assert result.exit_code == 0 and "Example: bob-cache predict" in result.output


def test_an_image_of_a_stored_row_gets_that_rows_class(cli, tmp_path: Path) -> None:
    photos = write_image_folder(tmp_path / "photos", splits=("train", "test"), per_class=4)
    store = tmp_path / "store"
    done = cli("extract", "--data", photos, "--store", store, *TINY)  # float16 rows
    assert done.exit_code == 0, done.output
    probe(ProbeConfig(str(store), "photos", "test_resnet", methods=("linear",),
                      val_fraction=0.25, results=str(tmp_path / "res")))  # fmt: skip
    images = sorted((photos / "test").rglob("*.png"))
    rows = predict(PredictConfig(str(store), "photos", "test_resnet", split="test"))
    by_id = {r["query"]: r for r in rows.records()}
    found = predict(PredictConfig(str(store), "photos", "test_resnet", images=images))
    assert found.feature_set.startswith("photos/train/")  # the head's own set's provenance
    for image, got in zip(images, found.records(), strict=True):
        (stored,) = [r for q, r in by_id.items() if q.endswith(f"{image.parent.name}/{image.name}")]
        assert got["query"] == str(image) and got["label"] == -1
        assert got["predicted_class"] == stored["predicted_class"]
        assert abs(got["probability"] - stored["probability"]) < 1e-3
    cli_run = cli("predict", "--store", store, "--dataset", "photos", "--backbone",
                      "test_resnet", "--image", images[0], "--json")  # fmt: skip
    assert cli_run.exit_code == 0, cli_run.output
    (one,) = json.loads(cli_run.stdout)["predictions"]
    assert one["predicted_class"] == found.records()[0]["predicted_class"]


def test_the_bob_recipe_head_reproduces_its_net(tmp_path: Path, monkeypatch) -> None:
    location = tmp_path / "store"
    x_test = toy(location)
    nets: list = []
    real = probe_module.train_bob_probe
    monkeypatch.setattr(
        probe_module, "train_bob_probe", lambda *a, **kw: nets.append(real(*a, **kw)) or nets[-1]
    )
    run_probe(location, tmp_path / "res", methods=("linear",), recipe="bob", epochs=3)
    result = predicting(location, split="test")
    assert (result.head.method, result.head.C) == ("linear-bob", None)
    expected = probe_module.bob_scores(nets[0], Features.in_memory(x_test))
    assert np.allclose(result.scores, expected, atol=1e-5)
    assert "--recipe bob --seeds 0" in str(_stale_message(location))


def _stale_message(location: Path) -> str:
    fs = open_store(location, mode="a").get(TRAIN)
    fs.uncommit([0])
    with pytest.raises(StaleHeadError) as exc:
        predicting(location, split="test")
    return str(exc.value)
