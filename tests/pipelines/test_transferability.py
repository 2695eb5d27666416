"""The transferability stage: rows in the results table, streaming, skipping, the source head
of LEEP and NCE, bad input, the CLI route, the battle task kind, and the ranking's exclusion."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import special

from bob_cache.errors import SpecError
from bob_cache.pipelines.transferability import TransferConfig, transferability, unit_hashes
from bob_cache.ranking.tasks import assign_tasks
from bob_cache.stores import open_store
from bob_cache.stores.results import ResultsTable
from bob_cache.transfer import TransferInputs, create_estimator, labelled_rows
from tests.conftest import TINY, blobs, run_cli, write_feature_sets, write_image_folder


def toy_store(root: Path, **kw: object) -> tuple[Path, np.ndarray, np.ndarray]:
    x, y = blobs(300, classes=4, dim=12, spread=3.0)
    write_feature_sets(root / "store", {"train": (x[:200], y[:200]), "test": (x[200:], y[200:])},
                       **kw)  # fmt: skip
    return root / "store", x[:200], y[:200]


def config(store: Path, tmp_path: Path, **kw: object) -> TransferConfig:
    return TransferConfig(store=str(store), dataset="toy", backbone="model",
                          results=str(tmp_path / "res"), **kw)  # fmt: skip


def test_estimates_land_as_rows_of_their_own_stage_and_a_rerun_skips(tmp_path: Path) -> None:
    store, x, y = toy_store(tmp_path)
    summary = transferability(config(store, tmp_path, methods=("logme", "hscore", "knn-loo")))
    assert summary.units_run == 3 and summary.units_skipped == 0
    frame = ResultsTable.open(tmp_path / "res").read()
    assert set(frame["stage"]) == {"transferability"} and set(frame["setting"]) == {"full"}
    assert set(frame["split"]) == {"train"} and (frame["train_rows"] == 200).all()
    assert (frame["val_rows"] == 0).all() and frame["protocol"].str.len().min() > 50
    assert frame["config"].map(lambda c: json.loads(c)["stage"]).eq("transferability").all()
    values = frame.set_index(["method", "metric"])["value"]
    inputs = TransferInputs(labelled_rows(x, y))
    for method in ("logme", "hscore", "knn-loo"):
        want = create_estimator(method).estimate(inputs)
        assert values[(method, want.metric)] == pytest.approx(want.value, rel=1e-9)
    assert values[("hscore", "shrinkage")] >= 0
    assert [r["method"] for r in summary.table] == ["logme", "hscore", "knn-loo"]
    again = transferability(config(store, tmp_path, methods=("logme", "hscore", "knn-loo")))
    assert again.units_run == 0 and again.units_skipped == 3
    forced = transferability(config(store, tmp_path, methods=("logme",), force=True))
    assert forced.units_run == 1
    other_k = transferability(config(store, tmp_path, methods=("knn-loo",), knn_k=3))
    assert other_k.units_run == 1  # another k is another unit


def test_streamed_rows_give_the_in_memory_numbers(tmp_path: Path) -> None:
    store, _, _ = toy_store(tmp_path, shard_rows=16)
    a = transferability(config(store, tmp_path, stream=True))
    b = transferability(config(store, tmp_path / "b", stream=False))
    assert [r["estimate"] for r in a.table] == pytest.approx([r["estimate"] for r in b.table])


def test_transferability_rows_are_never_a_ranked_task(tmp_path: Path) -> None:
    store, _, _ = toy_store(tmp_path)
    transferability(config(store, tmp_path, methods=("knn-loo", "logme")))
    frame = ResultsTable.open(tmp_path / "res").read()
    frame.loc[frame.index[0], "task"] = "knn"  # even a row that names a task
    assert (assign_tasks(frame) == "").all()


def test_multi_label_and_unlabelled_sets_are_refused_and_nothing_is_written(
    tmp_path: Path,
) -> None:
    x, _ = blobs(40, classes=2, dim=6)
    multi = np.random.default_rng(0).integers(0, 2, size=(40, 3))
    write_feature_sets(tmp_path / "multi", {"train": (x, multi)})
    with pytest.raises(SpecError, match="multi-label.*single-label source"):
        transferability(TransferConfig(str(tmp_path / "multi"), "toy", "model",
                                       results=str(tmp_path / "res")))  # fmt: skip
    write_feature_sets(tmp_path / "none", {"train": (x, np.full(40, -1))})
    with pytest.raises(SpecError, match="no labels.*class sub-folders"):
        transferability(TransferConfig(str(tmp_path / "none"), "toy", "model",
                                       results=str(tmp_path / "res")))  # fmt: skip
    assert not (tmp_path / "res").exists()


def test_leep_on_a_set_of_another_layer_says_which_output_it_needs(tmp_path: Path) -> None:
    store, _, _ = toy_store(tmp_path, spec={"layer": "layer3", "pool": "avg", "dtype": "float32"})
    with pytest.raises(SpecError, match="leep, nce read.*layer3.*--layers final.*logme"):
        transferability(config(store, tmp_path, methods=("logme", "leep", "nce")))
    assert not (tmp_path / "res").exists()


def test_a_backbone_without_a_classifier_is_refused(tmp_path: Path, monkeypatch) -> None:
    import bob_cache.backbones.rebuild as rebuild

    class Headless:
        backbone = type("B", (), {"head": None})()

    monkeypatch.setattr(rebuild, "embedder_from_provenance", lambda *a, **k: Headless())
    store, _, _ = toy_store(tmp_path)
    with pytest.raises(SpecError, match="has none over its 12-d features.*logme, hscore"):
        transferability(config(store, tmp_path, methods=("nce",)))


@pytest.fixture(scope="module")
def extracted(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Photos of three classes extracted with a tiny random-init ResNet, float32, one split."""
    root = tmp_path_factory.mktemp("transfer-photos")
    photos = write_image_folder(root / "photos", splits=("",), per_class=8)
    store = root / "store"
    done = run_cli("extract", "--data", photos, "--store", store, "--dtype", "float32",
                   "--split-fractions", "1,0,0", *TINY)  # fmt: skip
    assert done.returncode == 0, done.stderr
    return store


def test_leep_and_nce_read_the_backbones_own_classifier(extracted: Path, tmp_path: Path) -> None:
    """The stage's LEEP equals LEEP on the logits of the whole model run on the images (the
    classifier applied to the stored pre-logit features is the model's own head)."""
    from PIL import Image

    from bob_cache.backbones.rebuild import embedder_from_provenance

    summary = transferability(TransferConfig(str(extracted), "photos", "test_resnet",
                                             methods=("leep", "nce"),
                                             results=str(tmp_path / "res")))  # fmt: skip
    assert "random init, seed 0: no source task" in summary.source
    fs = next(s for s in open_store(extracted).feature_sets() if s.attrs["split"] == "train")
    emb = embedder_from_provenance(dict(fs.attrs))
    ids = np.asarray(fs.array("ids")[:])
    folder = Path(fs.attrs["dataset"]["origin"])
    images = [Image.open(folder / i).convert("RGB") for i in ids]
    batch = torch.stack([emb._transform(im) for im in images])
    with torch.inference_mode():
        logits = emb.backbone.model(emb.backbone.normalize(batch)).double().numpy()
    theta = special.softmax(logits, axis=1)
    y = np.asarray(fs.array("labels")[:])
    joint = np.stack([theta[y == k].sum(0) for k in np.unique(y)])
    leep = np.mean(np.log((theta * (joint / joint.sum(0))[y]).sum(1)))
    frame = ResultsTable.open(tmp_path / "res").read().set_index("method")
    assert frame.loc["leep", "value"] == pytest.approx(leep, rel=1e-4)
    assert "1000-class classifier" in frame.loc["nce", "protocol"]


def test_the_probe_command_routes_transferability_methods(tmp_path: Path, cli, monkeypatch) -> None:
    store, _, _ = toy_store(tmp_path)
    res = tmp_path / "res"
    args = ("probe", "--store", store, "--dataset", "toy", "--backbone", "model",
            "--results", res)  # fmt: skip
    done = cli(*args, "--method", "logme,hscore,knn-loo", "--loo-k", "3", "--json")
    assert done.exit_code == 0, done.output
    summary = json.loads(done.output)
    assert [r["method"] for r in summary["table"]] == ["logme", "hscore", "knn-loo"]
    assert "k=3" in ResultsTable.open(res).read().query("method == 'knn-loo'")["protocol"].iloc[0]
    mixed = cli(*args, "--method", "logme,linear")
    assert mixed.exit_code == 1 and "as two calls" in mixed.output
    typo = cli(*args, "--method", "logmee")
    assert typo.exit_code == 1 and "Did you mean 'logme'" in typo.output
    text = cli(*args, "--method", "logme")
    assert text.exit_code == 0 and "already in" in text.output and "logme" in text.output


SUITE = """\
name: tiny-transfer
backbones:
  - {name: test_resnet, label: r0, random_init: true, seed: 0, image_size: 32}
  - {name: test_resnet, label: r1, random_init: true, seed: 1, image_size: 32}
datasets:
  - {name: digits, data: "builtin:digits", limit: 60}
tasks:
  - kind: linear
  - kind: transferability
    methods: [logme, hscore, leep, nce, knn-loo]
    k: 3
options: {workers: 0, shard_rows: 32}
"""


def test_the_battle_runs_a_transferability_task_once(tmp_path: Path) -> None:
    from bob_cache.pipelines.battle import BattleConfig, battle
    from bob_cache.pipelines.battle.tasks import get_task
    from bob_cache.transfer import agreement_table

    (tmp_path / "suite.yaml").write_text(SUITE)
    run = BattleConfig(suite=str(tmp_path / "suite.yaml"), store=str(tmp_path / "store"),
                       results=str(tmp_path / "res"), threads=1)  # fmt: skip
    summary = battle(run)
    assert not summary.failed, summary.outcomes
    frame = ResultsTable.open(tmp_path / "res").read()
    estimates = frame[frame["stage"] == "transferability"]
    assert set(estimates["method"]) == {"logme", "hscore", "leep", "nce", "knn-loo"}
    assert estimates.groupby("backbone")["method"].nunique().to_dict() == {
        "test_resnet.random-s0": 5, "test_resnet.random-s1": 5,
    }  # fmt: skip
    assert battle(run).outcomes == []  # done: nothing to run again
    table = agreement_table(frame, n_boot=20)
    assert set(table["estimator"]) == {"logme", "hscore", "leep", "nce", "knn-loo"}
    assert table["verdict"].str.startswith("not assessed: 2 backbone").all()
    kind = get_task("transferability")
    _, problems = kind.check({"methods": ["logme", "lgme"]})
    assert problems and "Did you mean 'logme'" in problems[0][1]


def test_unit_hashes_cover_every_method(tmp_path: Path) -> None:
    store, _, _ = toy_store(tmp_path)
    c = config(store, tmp_path, methods=("logme", "knn-loo"))
    summary = transferability(c)
    assert unit_hashes(c, summary.feature_key) <= ResultsTable.open(c.results).config_hashes()


@pytest.mark.slow
def test_a_weights_file_without_a_classifier_is_refused_and_one_with_it_is_used(
    tmp_path: Path, mobilenet_weights: Path
) -> None:
    """torchvision's ImageNet MobileNetV2 file: its classifier is the source model; the same
    file with the classifier removed leaves the architecture's random head, which is refused."""
    state = torch.load(mobilenet_weights, map_location="cpu", weights_only=True)
    headless = tmp_path / "headless.pth"
    torch.save({k: v for k, v in state.items() if not k.startswith("classifier")}, headless)
    photos = write_image_folder(tmp_path / "photos", splits=("",), per_class=4)
    for name, weights in (("full", mobilenet_weights), ("headless", headless)):
        done = run_cli("extract", "--data", photos, "--store", tmp_path / name, "--backbone",
                       "tv:mobilenet_v2", "--weights", weights, "--image-size", "64",
                       "--split-fractions", "1,0,0", "--workers", "0", "-q")  # fmt: skip
        assert done.returncode == 0, done.stderr
    run = TransferConfig(str(tmp_path / "full"), "photos", "tv:mobilenet_v2",
                         methods=("leep", "nce"), results=str(tmp_path / "res"))  # fmt: skip
    summary = transferability(run)
    assert summary.units_run == 2 and "1000-class classifier (weights file sha256" in summary.source
    with pytest.raises(SpecError, match="has none over its 1280-d features.*without a head"):
        transferability(replace(run, store=str(tmp_path / "headless"), methods=("leep",)))
