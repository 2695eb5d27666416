"""The probe stage: selection, splits, few-shot settings, the results table, and bad input."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bob_cache.errors import FeatureSetNotFoundError, SpecError
from bob_cache.pipelines.probe import ProbeConfig, probe
from bob_cache.probes.features import load_rows
from bob_cache.stores.results import ResultsTable
from tests.conftest import TINY, blobs, write_feature_sets


def toy_store(root: Path, *, with_val: bool = True, **kw: object) -> Path:
    x, y = blobs(500, classes=4, dim=12, spread=1.5)
    splits = {"train": (x[:300], y[:300]), "test": (x[400:], y[400:])}
    if with_val:
        splits["val"] = (x[300:400], y[300:400])
    write_feature_sets(root / "store", splits, **kw)
    return root / "store"


def config(store: Path, tmp_path: Path, **kw: object) -> ProbeConfig:
    return ProbeConfig(
        store=str(store), dataset="toy", backbone="model", results=str(tmp_path / "res"), **kw
    )


def test_linear_knn_and_few_shot_rows_land_in_the_results_table(tmp_path: Path) -> None:
    store = toy_store(tmp_path)
    summary = probe(
        config(store, tmp_path, shots=(1, 5), fractions=(0.1,), seeds=(0, 1), ks=(5, 10))
    )
    # linear and knn: full once each, 2 shot settings × 2 seeds, 1 fraction × 2 seeds, less
    # the two kNN units of 1-shot (4 rows: k=5 and k=10 are refused, not capped)
    assert summary.units_run == 2 * (1 + 4 + 2) - 2
    assert [s["setting"] for s in summary.skipped] == ["1-shot"]
    frame = ResultsTable.open(tmp_path / "res").read()
    assert set(frame["method"]) == {"linear", "knn@5", "knn@10"}
    assert set(frame["setting"]) == {"full", "1-shot", "5-shot", "0.1-fraction"}
    full = frame[(frame.method == "linear") & (frame.setting == "full")].set_index("metric")[
        "value"
    ]
    assert full["top1"] > 0.9 and {"balanced_accuracy", "macro_f1", "val_score", "C"} <= set(
        full.index
    )
    assert "top5" not in full.index  # only 4 classes
    assert {"run_id", "config_hash", "versions", "time", "feature_key"} <= set(frame.columns)
    table = {(r["method"], r["setting"]): r for r in summary.table}
    assert "±" in table[("linear", "5-shot")]["top1"]


def test_k_shot_fits_see_exactly_k_per_class_and_rows_say_so(tmp_path: Path, monkeypatch) -> None:
    """A few-shot unit never fits on a row outside its subset; the table records the counts."""
    import bob_cache.probes.linear as linear

    seen: list[int] = []

    class Spy(linear.Objective):
        def __init__(self, features, labels, *args, **kw) -> None:
            seen.append(features.n)
            super().__init__(features, labels, *args, **kw)

    monkeypatch.setattr(linear, "Objective", Spy)
    store = toy_store(tmp_path)  # 4 classes; train 300, val 100, test 100
    probe(config(store, tmp_path, methods=("linear",), shots=(5,)))
    full_fits, shot_fits = seen[: seen.index(400) + 1], seen[seen.index(400) + 1 :]
    assert max(full_fits) == 400  # full: C on val, refit on train + val
    assert shot_fits and max(shot_fits) == 20 and shot_fits[-1] == 20  # 5 × 4, nothing more
    frame = ResultsTable.open(tmp_path / "res").read()
    rows = frame[frame.metric == "top1"].set_index("setting")
    assert (rows.loc["full", "train_rows"], rows.loc["full", "val_rows"]) == (300, 100)
    assert (rows.loc["5-shot", "train_rows"], rows.loc["5-shot", "val_rows"]) == (20, 0)
    assert "cross-validation inside the subset" in rows.loc["5-shot", "protocol"]
    assert "refit on train_rows + val_rows" in rows.loc["full", "protocol"]


def test_one_shot_and_fractions_state_their_protocol(tmp_path: Path) -> None:
    store = toy_store(tmp_path)
    probe(config(store, tmp_path, shots=(1,), fractions=(0.1,), ks=(5,)))
    frame = ResultsTable.open(tmp_path / "res").read()
    top1 = frame[frame.metric == "top1"].set_index(["method", "setting"])
    assert "fixed C=1" in top1.loc[("linear", "1-shot"), "protocol"]
    assert top1.loc[("linear", "1-shot"), "train_rows"] == 4
    assert top1.loc[("knn@5", "0.1-fraction"), "train_rows"] == 28  # floor(0.1 × 75) × 4
    assert "val_score" not in set(frame[frame.setting == "1-shot"].metric)  # nothing validated
    assert "cv_score" not in set(frame[frame.setting == "1-shot"].metric)
    fraction = set(frame[(frame.setting == "0.1-fraction") & (frame.method == "linear")].metric)
    assert "cv_score" in fraction and "val_score" not in fraction  # folds, not the val split
    with pytest.raises(SpecError, match=r"--fraction 0.01 leaves 4 class\(es\) with no training"):
        probe(config(store, tmp_path / "again", fractions=(0.01,)))


def test_rerun_is_a_no_op_unless_forced(tmp_path: Path) -> None:
    store = toy_store(tmp_path)
    first = probe(config(store, tmp_path, methods=("knn",), ks=(5,)))
    rows = len(ResultsTable.open(tmp_path / "res").read())
    again = probe(config(store, tmp_path, methods=("knn",), ks=(5,)))
    assert (first.units_run, again.units_run, again.units_skipped) == (1, 0, 1)
    assert len(ResultsTable.open(tmp_path / "res").read()) == rows
    forced = probe(config(store, tmp_path, methods=("knn",), ks=(5,), force=True))
    assert forced.units_run == 1  # recomputed; the same numbers are not written twice
    assert len(ResultsTable.open(tmp_path / "res").read()) == rows
    other_k = probe(config(store, tmp_path, methods=("knn",), ks=(7,)))
    assert other_k.units_run == 1  # a changed setting is a new unit


def test_a_second_store_beside_the_same_results_gets_its_own_head(tmp_path: Path) -> None:
    """Rows in the table may describe another store with the same features: a linear unit is
    done only when its head is stored in *this* store (what `ood` and `predict` read)."""
    from bob_cache.pipelines.predict import PredictConfig, predict
    from bob_cache.pipelines.probe import missing_heads
    from bob_cache.stores import open_store
    from bob_cache.stores.head_store import list_heads

    first = toy_store(tmp_path / "a")
    second = toy_store(tmp_path / "b")  # same arrays and spec: the same feature key
    a = probe(config(first, tmp_path, methods=("linear", "knn"), ks=(5,)))
    cfg_b = config(second, tmp_path, methods=("linear", "knn"), ks=(5,))
    assert missing_heads(cfg_b, a.feature_key)  # the battle's done check sees the gap
    b = probe(cfg_b)
    assert (b.units_run, b.units_skipped) == (1, 1)  # the linear unit again, kNN skipped
    train_b = next(fs for fs in open_store(second).feature_sets() if fs.attrs["split"] == "train")
    assert len(list_heads(train_b)) == 1 and not missing_heads(cfg_b, a.feature_key)
    again = probe(cfg_b)
    assert (again.units_run, again.units_skipped) == (0, 2)
    pred = predict(PredictConfig(store=str(second), dataset="toy", backbone="model", split="test"))
    assert len(pred.queries) == 100


def test_missing_val_split_is_held_out_deterministically(tmp_path: Path) -> None:
    store = toy_store(tmp_path, with_val=False)
    a = probe(config(store, tmp_path, methods=("linear",)))
    b = probe(config(store, tmp_path, methods=("linear",), force=True))
    va = next(r for r in a.table if r["method"] == "linear")
    vb = next(r for r in b.table if r["method"] == "linear")
    assert va["val_score"] == vb["val_score"]


def test_few_shot_subsets_ignore_the_hold_out_and_other_backbones_invalid_rows(
    tmp_path: Path, monkeypatch
) -> None:
    """Without a val split, a k-shot subset is still drawn from the whole train split by id
    hash, so a backbone whose other rows failed to decode gets exactly the same images."""
    import bob_cache.pipelines.probe as stage
    from bob_cache.probes.fewshot import sample_shots

    drawn: dict[str, list[str]] = {}

    def spy(labels: np.ndarray, ids: np.ndarray, *, shots: int, seed: int) -> np.ndarray:
        rows = sample_shots(labels, ids, shots=shots, seed=seed)
        drawn[backbone] = sorted(ids[rows].tolist())
        return rows

    monkeypatch.setattr(stage, "sample_shots", spy)
    x, y = blobs(400, classes=4, dim=12, spread=1.5)
    splits = {"train": (x[:300], y[:300]), "test": (x[300:], y[300:])}
    ids = np.array([f"train/{i:05d}" for i in range(300)])
    expected = sorted(ids[sample_shots(y[:300], ids, shots=5, seed=0)].tolist())
    outside = [i for i in range(300) if ids[i] not in expected][::7]  # 40 rows, none drawn
    for backbone, unreadable in (("a.tag", {}), ("b.tag", {"train": outside})):
        write_feature_sets(tmp_path / "store", splits, backbone=backbone, unreadable=unreadable)
        cfg = ProbeConfig(
            store=str(tmp_path / "store"), dataset="toy", backbone=backbone,
            results=str(tmp_path / "res"), methods=("linear",), shots=(5,),
        )  # fmt: skip
        probe(cfg)
    assert drawn["a.tag"] == expected  # the whole train split: the hold-out is not excluded
    assert drawn["b.tag"] == expected
    frame = ResultsTable.open(tmp_path / "res").read()
    shots = frame[frame.setting == "5-shot"]
    assert len(shots) and shots.protocol.str.endswith("by id hash from the whole train split").all()


def test_streaming_and_in_memory_runs_agree(tmp_path: Path) -> None:
    store = toy_store(tmp_path)
    runs = []
    for stream in (False, True):
        cfg = config(store, tmp_path / str(stream), methods=("linear",), stream=stream)
        runs.append(next(r for r in probe(cfg).table if r["method"] == "linear")["top1"])
    assert runs[0] == runs[1]


def test_streaming_starts_when_the_stored_bytes_exceed_max_memory(
    tmp_path: Path, monkeypatch
) -> None:
    import bob_cache.pipelines.probe as stage

    store = toy_store(tmp_path, dtype="float16")  # 500 rows × 12 float16: 12,000 stored bytes
    streamed: list[bool] = []

    def spy(fs, *, stream: bool):
        streamed.append(stream)
        return load_rows(fs, stream=stream)

    monkeypatch.setattr(stage, "load_rows", spy)
    for budget, expected in ((11_999, True), (12_000, False)):  # (float32 would be 24,000)
        streamed.clear()
        cfg = config(store, tmp_path / str(budget), methods=("knn",), max_memory_gb=budget / 2**30)
        probe(cfg)
        assert streamed == [expected] * 3


def test_feature_set_not_found_lists_what_exists(tmp_path: Path) -> None:
    store = toy_store(tmp_path)
    with pytest.raises(FeatureSetNotFoundError, match="It holds: toy × model.tag"):
        probe(
            ProbeConfig(
                store=str(store), dataset="toy", backbone="resnet50", results=str(tmp_path / "r")
            )
        )
    with pytest.raises(
        FeatureSetNotFoundError, match=r"Split\(s\) train, holdout .* are not all extracted"
    ):
        probe(config(store, tmp_path, test_split="holdout"))


def test_several_keys_need_a_feature_choice(tmp_path: Path) -> None:
    store = toy_store(tmp_path)
    x, y = blobs(100, classes=4, dim=12)
    write_feature_sets(
        store,
        {"train": (x, y), "test": (x, y)},
        key="feat00000002",
        spec={"layer": "layer3", "pool": "avg", "dtype": "float32"},
    )
    with pytest.raises(
        FeatureSetNotFoundError, match="Several feature sets match.*layer layer3.*--feature"
    ):
        probe(config(store, tmp_path))
    assert (
        probe(config(store, tmp_path, feature="feat00000002", methods=("knn",))).feature_key
        == "feat00000002"
    )


def test_class_absent_from_train_is_reported_not_fatal(tmp_path: Path) -> None:
    x, y = blobs(400, classes=4, dim=8)
    train = (x[:300][y[:300] != 3], y[:300][y[:300] != 3])
    write_feature_sets(
        tmp_path / "s",
        {"train": train, "val": (x[300:350], y[300:350]), "test": (x[350:], y[350:])},
    )
    summary = probe(config(tmp_path / "s", tmp_path, methods=("knn",), ks=(5,)))
    assert summary.unseen_test_classes == [3]
    top1 = float(summary.table[0]["top1"])
    assert 0.6 < top1 < 0.8  # class 3 (a quarter of test) is always wrong


def test_unlabeled_rows_are_left_out_and_counted(tmp_path: Path) -> None:
    x, y = blobs(400, classes=4, dim=8)
    y = y.copy()
    y[:10] = -1  # train
    y[390:] = -1  # test
    write_feature_sets(
        tmp_path / "s",
        {"train": (x[:300], y[:300]), "val": (x[300:350], y[300:350]), "test": (x[350:], y[350:])},
    )
    summary = probe(config(tmp_path / "s", tmp_path, methods=("knn",), ks=(5,)))
    assert summary.unlabeled_rows_dropped == 20
    assert float(summary.table[0]["top1"]) == 1.0


def test_single_class_nan_features_and_too_many_shots(tmp_path: Path) -> None:
    x, y = blobs(200, classes=4, dim=8)
    write_feature_sets(tmp_path / "one", {"train": (x, np.zeros(200, np.int64)), "test": (x, y)})
    with pytest.raises(SpecError, match="single class .*at least two"):
        probe(config(tmp_path / "one", tmp_path))
    bad = x.copy()
    bad[[3, 17]] = np.nan
    write_feature_sets(tmp_path / "nan", {"train": (bad, y), "test": (x, y)})
    with pytest.raises(
        SpecError, match=r"2 row\(s\) .* NaN or inf features, e.g. 'train/00003', 'train/00017'"
    ):
        probe(config(tmp_path / "nan", tmp_path))
    write_feature_sets(tmp_path / "ok", {"train": (x[:40], y[:40]), "val": (x, y), "test": (x, y)})
    with pytest.raises(
        SpecError, match="20-shot needs 20 training images per class, but class 0 has 10"
    ):
        probe(config(tmp_path / "ok", tmp_path, shots=(20,)))
    assert not (tmp_path / "res").exists()  # the error came before any unit ran


def test_multilabel_sets_report_roc_auc(tmp_path: Path) -> None:
    x, y = blobs(600, classes=3, dim=8)
    multi = np.stack([(y == 0), (y != 2), (y == 1)], axis=1).astype(np.int64)
    multi[::7, 1] = -1  # unknown entries are ignored
    write_feature_sets(
        tmp_path / "s", {"train": (x[:400], multi[:400]), "test": (x[400:], multi[400:])}
    )
    summary = probe(config(tmp_path / "s", tmp_path, ks=(10,)))
    rows = {r["method"]: r for r in summary.table}
    assert float(rows["linear"]["roc_auc"]) > 0.95 and float(rows["knn@10"]["roc_auc"]) > 0.95


@pytest.mark.slow
def test_cli_probe_on_real_extracted_features(cli, tmp_path: Path) -> None:
    store, res = tmp_path / "store", tmp_path / "res"
    extracted = cli("extract", "--data", "builtin:digits", *TINY, "--store", store)
    assert extracted.exit_code == 0, extracted.output
    result = cli(
        "probe",
        "--store",
        store,
        "--dataset",
        "digits",
        "--backbone",
        "test_resnet",
        "--shots",
        "5",
        "--seeds",
        "0,1",
        "--k",
        "10,20",
        "--results",
        res,
        "--json",
    )
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    rows = {(r["method"], r["setting"]): r for r in summary["table"]}
    assert float(rows[("linear", "full")]["top1"]) > 0.7  # random conv features separate digits
    assert {"top5", "balanced_accuracy", "macro_f1"} <= set(rows[("knn@10", "full")])
    human = cli("results", res, "--metric", "top1")
    assert human.exit_code == 0 and "5-shot" in human.stdout and "linear" in human.stdout
    assert "train_rows" in human.stdout and "val_rows" in human.stdout
    long = json.loads(cli("results", res, "--long", "--json").stdout)
    # the reported linear probe is the converged fit at its C (scikit-learn, same rows)
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from bob_cache.probes.features import load_rows
    from bob_cache.stores import open_store

    sets = {fs.attrs["split"]: fs for fs in open_store(store).feature_sets()}
    x = {s: load_rows(sets[s], stream=False) for s in ("train", "val", "test")}
    xtv = np.concatenate([x["train"][0].materialize(), x["val"][0].materialize()])
    ytv = np.concatenate([x["train"][1], x["val"][1]])
    (C,) = [
        r["value"]
        for r in long
        if (r["method"], r["setting"], r["metric"]) == ("linear", "full", "C")
    ]
    scaler = StandardScaler().fit(xtv)
    ref = LogisticRegression(C=C, max_iter=20000, tol=1e-8).fit(scaler.transform(xtv), ytv)
    ref_top1 = ref.score(scaler.transform(x["test"][0].materialize()), x["test"][1])
    assert abs(float(rows[("linear", "full")]["top1"]) - ref_top1) <= 0.003
    assert {r["seed"] for r in long if r["setting"] == "5-shot"} == {0, 1}


def test_cli_probe_errors_exit_1(cli, tmp_path: Path) -> None:
    store = toy_store(tmp_path)
    missing = cli("probe", "--store", store, "--dataset", "nope", "--backbone", "model")
    assert missing.exit_code == 1 and "It holds: toy × model.tag" in missing.output
    bad = cli("probe", "--store", store, "--dataset", "toy", "--backbone", "model", "--shots", "x")
    assert bad.exit_code == 1 and "--shots 'x' is not a comma-separated list" in bad.output
    method = cli(
        "probe", "--store", store, "--dataset", "toy", "--backbone", "model", "--method", "svm"
    )
    assert method.exit_code == 1 and "Unknown --method 'svm'" in method.output


@pytest.mark.parametrize("with_val", [True, False])
def test_a_knn_k_above_a_settings_training_rows_is_skipped_with_the_reason(
    tmp_path: Path, with_val: bool
) -> None:
    """k is never capped at the training rows (two names, one fit): a k above a setting's
    rows is refused for that setting, listed with the reason, and the battle's done check
    agrees that a setting with no usable k has nothing left to do."""
    from bob_cache.pipelines.probe import setting_rows, unit_hashes

    store = toy_store(tmp_path, with_val=with_val)  # 4 classes; train 300 (268 without val)
    cfg = config(
        store, tmp_path, methods=("knn",), shots=(1, 5), fractions=(0.1,), seeds=(0, 1),
        ks=(5, 10, 280),
    )  # fmt: skip
    summary = probe(cfg)
    frame = ResultsTable.open(tmp_path / "res").read()
    top1 = frame[frame.metric == "top1"]
    by_setting = top1.groupby("setting")["method"].agg(lambda m: sorted(set(m))).to_dict()
    full_rows = 300 if with_val else 268  # a tenth of each class held out for validation
    # full keeps k=280 only when it has 280 rows; 5-shot (20 rows) keeps 5 and 10; 1-shot none
    expect_full = ["knn@10", "knn@280", "knn@5"] if with_val else ["knn@10", "knn@5"]
    assert by_setting == {
        "full": expect_full, "5-shot": ["knn@10", "knn@5"], "0.1-fraction": ["knn@10", "knn@5"]
    }  # fmt: skip
    # the done check counts each setting's rows from the labels: the same as the fits saw
    fitted = top1.groupby("setting")["train_rows"].agg(set).to_dict()
    counted = setting_rows(cfg, summary.feature_key)
    assert counted == {"full": full_rows, "1-shot": 4, "5-shot": 20, "0.1-fraction": 28}
    assert all(fitted[name] == {n} for name, n in counted.items() if name != "1-shot")
    assert all(int(m[4:]) <= n for m, n in zip(top1.method, top1.train_rows, strict=True))
    skipped = {s["setting"]: s for s in summary.skipped}
    refused_full = set() if with_val else {"full"}
    assert set(skipped) == {"1-shot", "5-shot", "0.1-fraction"} | refused_full
    assert skipped["1-shot"]["ks"] == [5, 10, 280] and skipped["1-shot"]["train_rows"] == 4
    assert (
        "every k" in skipped["1-shot"]["reason"]
        and "4 training rows" in skipped["1-shot"]["reason"]
    )
    assert skipped["5-shot"]["ks"] == [280] and "20 training rows" in skipped["5-shot"]["reason"]
    if not with_val:
        assert skipped["full"]["train_rows"] == full_rows
    assert summary.to_dict()["skipped"] == summary.skipped  # in --json too
    # the battle's done check: every unit it expects is in the table, so nothing reruns
    table_hashes = ResultsTable.open(tmp_path / "res").config_hashes()
    assert unit_hashes(cfg, summary.feature_key) <= table_hashes
    again = probe(cfg)
    assert again.units_run == 0 and again.skipped == summary.skipped


def test_a_battle_whose_knn_ks_are_all_refused_is_done_after_one_run(tmp_path: Path) -> None:
    """A setting with no usable k writes no row; the battle's done check knows, so the job
    does not run again on every rerun."""
    from bob_cache.pipelines.battle import BattleConfig, battle

    suite = tmp_path / "suite.yaml"
    suite.write_text(
        "name: refused\nbackbones:\n  - name: test_resnet\n    random_init: true\n"
        "    image_size: 32\ndatasets:\n  - {name: digits, data: 'builtin:digits', limit: 60}\n"
        "tasks:\n  - kind: knn\n    k: [5, 500]\n  - kind: few-shot\n    methods: [knn]\n"
        "    shots: [1]\n    seeds: [0]\n    k: [20]\noptions:\n  workers: 0\n"
    )

    def run() -> object:
        return battle(BattleConfig(suite=str(suite), store=str(tmp_path / "s"),
                                   results=str(tmp_path / "r"), threads=1))  # fmt: skip

    first = run()
    assert not first.failed
    frame = ResultsTable.open(tmp_path / "r").read()
    assert set(frame.method) == {"knn@5"} and set(frame.setting) == {"full"}  # 500, 1-shot@20
    again = run()
    assert again.outcomes == [] and again.already_done == len(first.outcomes)


def test_the_probe_command_names_a_refused_k(tmp_path: Path, cli) -> None:
    store = toy_store(tmp_path)
    args = ["probe", "--store", store, "--dataset", "toy", "--backbone", "model",
            "--results", tmp_path / "res", "--method", "knn", "--k", "5,400"]  # fmt: skip
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert "skipped kNN: k=400 is above the 300 training rows of full" in result.output
    data = json.loads(cli(*args, "--json").output)
    assert data["skipped"][0]["ks"] == [400] and data["units_run"] == 0
