"""BoB's ranking: tasks per row, z-scores per setting, task and overall means, size classes,
task correlations and the scale analysis, checked against scipy computed independently."""

from __future__ import annotations

import itertools
import json
from collections import defaultdict

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bob_cache.ranking import (
    BackboneInfo,
    assign_tasks,
    get_size_class,
    rank_backbones,
    register_ranking_task,
    resolve_backbone_info,
)
from bob_cache.ranking import tasks as task_registry
from bob_cache.ranking.analysis import spearman
from bob_cache.ranking.identity import RankingOptionError
from bob_cache.ranking.zscores import SETTING_KEYS
from bob_cache.stores.results import summarize

META = {
    "vit_clip": {"family": "ViT", "method": "CLIP", "data": "LAION-2B", "params": 86_000_000},
    "rn50_sup": {"family": "ResNet", "method": "supervised", "data": "ImageNet-1k",
                 "params": 23_500_000},
    "rn18_dino": {"family": "ResNet", "method": "DINO", "data": "ImageNet-1k",
                  "params": 11_000_000},
    "vitl_mae": {"family": "ViT", "method": "MAE", "data": "some private set",
                 "params": 300_000_000},
}  # fmt: skip
QUALITY = {"vit_clip": 0.9, "rn50_sup": 0.8, "vitl_mae": 0.7, "rn18_dino": 0.6}


def row(backbone: str, dataset: str, method: str, setting: str, value: float, **kw) -> dict:
    base = {
        "stage": "probe", "dataset": dataset, "split": "test", "backbone": backbone,
        "feature_key": f"fk-{backbone}", "method": method, "setting": setting, "metric": "top1",
        "value": value, "seed": 0, "time": "2026-01-01T00:00:00+00:00", "source": "", "task": "",
    }  # fmt: skip
    base.update(kw)
    base.setdefault("config_hash", "|".join(map(str, (backbone, dataset, method, setting,
                                                      base["seed"], base["stage"]))))  # fmt: skip
    return base


def results_frame() -> pd.DataFrame:
    """4 backbones × 2 datasets: linear, knn@10/@20, 5-shot linear with 2 seeds, retrieval."""
    rng = np.random.default_rng(7)
    rows = []
    for dataset, (backbone, q) in itertools.product(("d1", "d2"), QUALITY.items()):
        noise = lambda: float(rng.normal(0, 0.05))  # noqa: E731
        rows.append(row(backbone, dataset, "linear", "full", q + noise()))
        rows.append(row(backbone, dataset, "linear", "full", q - 0.5, metric="top5"))
        rows += [row(backbone, dataset, f"knn@{k}", "full", q - 0.1 + noise()) for k in (10, 20)]
        rows += [row(backbone, dataset, "linear", "5-shot", q - 0.3 + noise(), seed=s)
                 for s in (0, 1)]  # fmt: skip
        rows.append(row(backbone, dataset, "classes", "0.2-queries", q - 0.4 + noise(),
                        stage="retrieval", split="train", metric="map"))  # fmt: skip
        rows.append(row(backbone, dataset, "classes", "0.2-queries", q, stage="retrieval",
                        split="train", metric="precision@10"))  # fmt: skip
    return pd.DataFrame(rows)


def test_each_row_gets_its_task_and_an_own_task_wins() -> None:
    frame = pd.DataFrame(
        [
            row("a", "d", "linear", "full", 0.5),
            row("a", "d", "linear", "10-shot", 0.5),
            row("a", "d", "knn@20", "0.01-fraction", 0.5),
            row("a", "d", "knn@20", "full", 0.5),
            row("a", "d", "classes", "0.2-queries", 0.5, stage="retrieval"),
            row("a", "d", "linear", "full", 0.5, task="finetune"),
            row("a", "d", "mystery", "full", 0.5, stage="other"),
        ]
    )
    assert list(assign_tasks(frame)) == [
        "linear", "few-shot", "few-shot", "knn", "retrieval", "finetune", "",
    ]  # fmt: skip


def test_a_new_task_kind_registers_without_editing_the_rules(monkeypatch) -> None:
    monkeypatch.setattr(task_registry, "TASKS", task_registry.TASKS.copy())
    register_ranking_task("panoptic", lambda f: f["stage"] == "panoptic", primary=("pq",))
    frame = pd.DataFrame([row(b, "d", "fpn", "full", v, stage="panoptic", metric="pq")
                          for b, v in (("a", 0.9), ("b", 0.7), ("c", 0.8))])  # fmt: skip
    ranking = rank_backbones(frame, metadata=META)
    assert ranking.task_names == ["panoptic"]
    assert list(ranking.overall["backbone"]) == ["a", "c", "b"]
    with pytest.raises(ValueError, match="already registered"):
        register_ranking_task("panoptic", lambda f: f["stage"] == "panoptic", primary=("pq",))


def test_ood_rows_rank_by_shift_top1_and_detection_auroc() -> None:
    rows = []
    for b, top1, auroc in (("a", 0.6, 0.7), ("b", 0.5, 0.9), ("c", 0.4, 0.8)):
        rows += [row(b, "d", "linear", "shift:d-noise", top1, stage="ood"),
                 row(b, "d", "linear", "shift:d-noise", 0.1, stage="ood", metric="drop"),
                 row(b, "d", "linear", "shift:mean", top1, stage="ood"),
                 row(b, "d", "linear", "id", 0.9, stage="ood"),
                 row(b, "d", "knn", "detect:far", auroc, stage="ood", metric="auroc"),
                 row(b, "d", "knn", "detect:far", 0.5, stage="ood", metric="fpr95")]  # fmt: skip
    frame = pd.DataFrame(rows)
    assert list(assign_tasks(frame)) == ["ood", "ood", "", "", "ood-detection",
                                         "ood-detection"] * 3  # fmt: skip
    ranking = rank_backbones(frame, metadata=META)
    assert ranking.task_names == ["ood", "ood-detection"]
    z = ranking.tasks.set_index(["task", "backbone"])["z"]
    assert z["ood", "a"] > z["ood", "b"] > z["ood", "c"]
    assert z["ood-detection", "b"] > z["ood-detection", "c"] > z["ood-detection", "a"]


def test_zscores_are_scipys_within_each_setting_after_the_mean_over_seeds() -> None:
    frame = results_frame()
    ranking = rank_backbones(frame, metadata=META)
    # Independently: mean over seeds per (setting, backbone), then scipy.stats.zscore.
    primary = {"probe": "top1", "retrieval": "map"}
    values: dict[tuple, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in frame.to_dict(orient="records"):
        if r["metric"] == primary[r["stage"]]:
            key = (r["dataset"], r["method"], r["setting"], r["metric"])
            values[key][r["backbone"]].append(r["value"])
    assert len(values) == 2 * 5 and len(ranking.zscores) == 2 * 5 * 4
    for (dataset, method, setting, metric), per in values.items():
        names = sorted(per)
        expected = stats.zscore([np.mean(per[b]) for b in names])  # population std (ddof 0)
        z = ranking.zscores
        mask = (z["dataset"] == dataset) & (z["method"] == method) & (z["setting"] == setting)
        got = z[mask].set_index("backbone")
        assert (got["metric"] == metric).all()
        np.testing.assert_allclose(got.loc[names, "z"], expected, rtol=1e-10)


def test_task_means_and_overall_are_plain_means_with_their_counts() -> None:
    ranking = rank_backbones(results_frame(), metadata=META)
    z = ranking.zscores
    for backbone in QUALITY:
        mine = z[z["backbone"] == backbone]
        by_task = {t: mine[mine["task"] == t]["z"].mean() for t in ranking.task_names}
        got = ranking.tasks[ranking.tasks["backbone"] == backbone].set_index("task")
        for task, mean in by_task.items():
            assert got.loc[task, "z"] == pytest.approx(mean)
        assert dict(got["settings"]) == {"linear": 2, "knn": 4, "few-shot": 2, "retrieval": 2}
        overall = ranking.overall.set_index("backbone").loc[backbone]
        assert overall["z"] == pytest.approx(np.mean(list(by_task.values())))  # tasks weigh 1
        assert (overall["tasks"], overall["settings"]) == (4, 10)
    assert list(ranking.overall["backbone"]) == list(QUALITY)  # best first
    assert list(ranking.overall["rank"]) == [1, 2, 3, 4]
    assert ranking.task_names == ["linear", "few-shot", "knn", "retrieval"]


def test_primary_metric_per_task_and_its_override() -> None:
    ranking = rank_backbones(results_frame(), metadata=META)
    assert ranking.primary_metrics[("d1", "retrieval")] == "map"
    assert ranking.primary_metrics[("d1", "linear")] == "top1"
    other = rank_backbones(results_frame(), metadata=META,
                           primary_metrics={"retrieval": "precision@10"})  # fmt: skip
    retrieval = other.zscores[other.zscores["task"] == "retrieval"]
    assert set(retrieval["metric"]) == {"precision@10"}


def test_settings_with_one_backbone_or_no_spread_are_skipped_and_listed() -> None:
    frame = pd.concat([
        results_frame(),
        pd.DataFrame([row("vit_clip", "d3", "linear", "full", 0.5)]),  # alone
        pd.DataFrame([row(b, "d4", "linear", "full", 0.5) for b in QUALITY]),  # all equal
    ])  # fmt: skip
    ranking = rank_backbones(frame, metadata=META)
    skipped = ranking.skipped.set_index("dataset")
    assert skipped.loc["d3", "reason"] == "only 1 backbone"
    assert "std 0" in skipped.loc["d4", "reason"]
    assert skipped.loc["d4", "backbones"] == ", ".join(sorted(QUALITY))
    assert not ranking.zscores["dataset"].isin(["d3", "d4"]).any()


def test_the_latest_run_of_a_configuration_counts() -> None:
    frame = results_frame()
    mask = (frame["backbone"] == "rn18_dino") & (frame["method"] == "linear")
    rerun = frame[mask & (frame["setting"] == "full")].assign(value=0.99, time="2026-02-01")
    ranking = rank_backbones(pd.concat([frame, rerun]), metadata=META)
    linear = ranking.values[ranking.values["task"] == "linear"].set_index(["dataset", "backbone"])
    assert linear.loc[("d1", "rn18_dino"), "value"] == 0.99
    assert linear.loc[("d1", "rn18_dino"), "seeds"] == 1


def test_seed_spread_is_the_std_of_the_overall_z_over_seeds() -> None:
    seeds = {"a": (0.9, 0.8), "b": (0.5, 0.7), "c": (0.1, 0.2)}
    frame = pd.DataFrame([row(b, "d", "linear", "5-shot", v, seed=s)
                          for b, vs in seeds.items() for s, v in enumerate(vs)])  # fmt: skip
    ranking = rank_backbones(frame, metadata=META)
    per_seed = np.array([stats.zscore([vs[s] for vs in seeds.values()]) for s in (0, 1)])
    expected = dict(zip(seeds, per_seed.std(axis=0, ddof=1), strict=True))
    got = ranking.overall.set_index("backbone")["z_seed_std"]
    for backbone, spread in expected.items():
        assert got[backbone] == pytest.approx(spread)


def test_task_correlations_are_spearman_over_the_backbones_with_both() -> None:
    frame = results_frame()
    extra = pd.DataFrame([row("only_linear", "d1", "linear", "full", 0.75)])
    ranking = rank_backbones(pd.concat([frame, extra]), metadata=META)
    wide = ranking.tasks.pivot(index="backbone", columns="task", values="z")
    for a, b in itertools.combinations(ranking.task_names, 2):
        both = wide[[a, b]].dropna()
        assert ranking.correlations.loc[a, b] == pytest.approx(
            stats.spearmanr(both[a], both[b]).statistic
        )
        assert ranking.correlation_counts.loc[a, b] == len(both)
    assert ranking.correlation_counts.loc["linear", "linear"] == 5
    assert ranking.correlation_counts.loc["linear", "knn"] == 4


def test_size_classes_split_the_ranking_and_are_configurable() -> None:
    assert get_size_class(29_999_999) == "small"
    assert get_size_class(30_000_000) == "base"
    assert get_size_class(100_000_000) == "large"
    assert get_size_class(None) == "unknown"
    ranking = rank_backbones(results_frame(), metadata=META)
    classes = ranking.by_size_class()
    assert list(classes) == ["small", "base", "large"]
    assert list(classes["small"]["backbone"]) == ["rn50_sup", "rn18_dino"]
    assert list(classes["small"]["rank"]) == [1, 2]
    assert list(classes["large"]["backbone"]) == ["vitl_mae"]
    two = rank_backbones(results_frame(), metadata=META,
                         size_classes=(("tiny", 20e6), ("big", float("inf"))))  # fmt: skip
    assert list(two.by_size_class()["tiny"]["backbone"]) == ["rn18_dino"]


def test_scale_analysis_is_spearman_against_params_and_data_size() -> None:
    ranking = rank_backbones(results_frame(), metadata=META)
    overall = ranking.overall.set_index("backbone")["z"]
    scale = ranking.scale.set_index(["against", "family"])
    params = [META[b]["params"] for b in overall.index]
    assert scale.loc[("parameters", "all"), "rho"] == pytest.approx(
        stats.spearmanr(overall, params).statistic
    )
    assert scale.loc[("parameters", "all"), "backbones"] == 4
    data = scale.loc[("pretraining images", "all")]
    known = [b for b in overall.index if b != "vitl_mae"]  # its data set has no known size
    images = [{"LAION-2B": 2e9, "ImageNet-1k": 1.28e6}[META[b]["data"]] for b in known]
    assert data["rho"] == pytest.approx(stats.spearmanr(overall[known], images).statistic)
    assert (data["backbones"], data["excluded"]) == (3, "vitl_mae")
    assert np.isnan(scale.loc[("parameters", "ResNet"), "rho"])  # two backbones: too few
    assert scale.loc[("parameters", "ResNet"), "backbones"] == 2


def test_metadata_given_wins_and_the_registry_fills_the_rest() -> None:
    exact = resolve_backbone_info("resnet50.tv_in1k")
    assert (exact.name, exact.family, exact.method, exact.data) == (
        "resnet50", "ResNet", "supervised", "ImageNet-1k",
    )  # fmt: skip
    assert exact.params == 23508032 and exact.data_images == 1.28e6
    random = resolve_backbone_info("vit_small_patch16_224.random-s0")
    assert (random.family, random.method, random.data) == ("ViT", "random init", None)
    assert resolve_backbone_info("no_such_arch.x") == BackboneInfo("no_such_arch.x")
    given = resolve_backbone_info("resnet50.tv_in1k", {"method": "mine", "label": "RN50"})
    assert (given.method, given.family, given.shown) == ("mine", "ResNet", "RN50")


def test_dense_and_finetune_rows_rank_by_miou_and_box_ap() -> None:
    rows = []
    for b, miou, ap in (("a", 0.5, 0.3), ("b", 0.7, 0.2), ("c", 0.6, 0.4)):
        rows += [row(b, "s", "dense-linear", "full", miou, stage="probe", metric="mIoU"),
                 {**row(b, "c", "detection", "frozen", ap, stage="finetune", metric="bbox_AP"),
                  "task": "finetune-detection"},
                 row(b, "c", "detection", "frozen lr=0.001", ap, stage="finetune",
                     metric="bbox_AP")]  # fmt: skip
    frame = pd.DataFrame(rows)
    assert list(assign_tasks(frame)) == ["dense", "finetune-detection", ""] * 3
    ranking = rank_backbones(frame, metadata=META)
    assert ranking.task_names == ["dense", "finetune-detection"]


# --- identity: one entry per (backbone, configuration); seeds are rows that differ by seed ---


def config(layer: str = "final", pool: str = "avg", **options: object) -> str:
    """A row's ``config`` column as the stages write it (feature spec less its dataset)."""
    return json.dumps({"feature": {"layer": layer, "pool": pool}, "stage": "probe", **options},
                      sort_keys=True)  # fmt: skip


def knn(temperature: float, **kw: object) -> str:
    return config(knn={"temperature": temperature}, **kw)


def two_temperatures() -> pd.DataFrame:
    """Issue 22's example: backbone a probed by kNN at temperature 0.07 (0.8) and 0.1 (0.6),
    the same setting and method label, both seed 0; b and c once; linear rows for all."""
    rows = [
        row("a", "d", "knn@20", "full", 0.8, config=knn(0.07), config_hash="a-t0.07"),
        row("a", "d", "knn@20", "full", 0.6, config=knn(0.1), config_hash="a-t0.1"),
        row("b", "d", "knn@20", "full", 0.7, config=knn(0.07)),
        row("c", "d", "knn@20", "full", 0.5, config=knn(0.07)),
    ]
    rows += [row(b, "d", "linear", "full", v, config=config(recipe=["sweep", 2]))
             for b, v in (("a", 0.9), ("b", 0.7), ("c", 0.6))]  # fmt: skip
    return pd.DataFrame(rows)


def test_two_configurations_of_one_backbone_are_two_entries_with_one_seed_each() -> None:
    ranking = rank_backbones(two_temperatures(), metadata=META)
    knn_values = ranking.values[ranking.values["task"] == "knn"].set_index("entry")
    assert knn_values.loc["a · temperature=0.07", ["value", "seeds"]].tolist() == [0.8, 1]
    assert knn_values.loc["a · temperature=0.1", ["value", "seeds"]].tolist() == [0.6, 1]
    assert 0.7 not in set(knn_values.loc[knn_values["backbone"] == "a", "value"])  # no mean
    # z over the setting's four distinct cells; a's linear cell serves both of its entries
    z = ranking.zscores.set_index(["task", "entry"])["z"]
    expected = stats.zscore([0.8, 0.6, 0.7, 0.5])
    assert [z["knn", e] for e in ("a · temperature=0.07", "a · temperature=0.1", "b", "c")] == (
        pytest.approx(expected)
    )
    linear = stats.zscore([0.9, 0.7, 0.6])  # three cells, not four
    assert z["linear", "a · temperature=0.07"] == z["linear", "a · temperature=0.1"]
    assert z["linear", "a · temperature=0.1"] == pytest.approx(linear[0])
    assert set(ranking.overall["entry"]) == {"a · temperature=0.07", "a · temperature=0.1",
                                             "b", "c"}  # fmt: skip
    assert ranking.configurations.varying == {"a": ["temperature"]}
    assert ranking.shown("a · temperature=0.1").endswith(" · temperature=0.1")


def test_results_summaries_keep_the_two_configurations_apart() -> None:
    frame = two_temperatures().assign(versions="{}", train_rows=10, val_rows=0)
    table = summarize(frame[frame["method"] == "knn@20"]).set_index(["backbone", "configuration"])
    assert table.loc[("a", "temperature=0.07"), ["top1", "seeds"]].tolist() == ["0.8000", 1]
    assert table.loc[("a", "temperature=0.1"), ["top1", "seeds"]].tolist() == ["0.6000", 1]
    assert table.loc[("b", ""), "top1"] == "0.7000"


def test_layer_and_pooling_name_the_entries_and_seeds_still_average() -> None:
    rows = []
    for b, spec, values in (("a", ("layer3", "avg"), (0.8, 0.7)),
                            ("a", ("layer4", "max"), (0.5, 0.3)),
                            ("b", ("final", "avg"), (0.6, 0.6))):  # fmt: skip
        rows += [row(b, "d", "linear", "5-shot", v, seed=s, config=config(*spec),
                     config_hash=f"{b}-{spec}-{s}") for s, v in enumerate(values)]  # fmt: skip
    ranking = rank_backbones(pd.DataFrame(rows), metadata=META)
    values = ranking.values.set_index("entry")
    assert values.loc["a · layer3 · avg", ["value", "seeds"]].tolist() == [pytest.approx(0.75), 2]
    assert values.loc["a · layer4 · max", ["value", "seeds"]].tolist() == [pytest.approx(0.4), 2]
    assert values.loc["b", "seeds"] == 2


def test_rows_without_a_config_fall_back_to_the_feature_key_and_config_hash() -> None:
    """Before the `config` column: two temperatures share the feature key and the seed but
    not the config hash, so they are two configurations; two seeds of one are one cell."""
    rows = [row("a", "d", "knn@20", "full", 0.8, config_hash="h-t1"),
            row("a", "d", "knn@20", "full", 0.6, config_hash="h-t2"),
            row("b", "d", "knn@20", "full", 0.7),
            row("a", "d", "linear", "5-shot", 0.5, seed=0),
            row("a", "d", "linear", "5-shot", 0.7, seed=1),
            row("b", "d", "linear", "5-shot", 0.4)]  # fmt: skip
    ranking = rank_backbones(pd.DataFrame(rows), metadata=META)
    knn_values = ranking.values[ranking.values["task"] == "knn"]
    assert sorted(knn_values["entry"]) == ["a · config_hash=h-t1", "a · config_hash=h-t2", "b"]
    assert set(knn_values["seeds"]) == {1}
    few = ranking.values[ranking.values["task"] == "few-shot"].set_index("entry")
    for entry in ("a · config_hash=h-t1", "a · config_hash=h-t2"):  # a's one few-shot cell
        assert few.loc[entry, ["cell", "value", "seeds"]].tolist() == ["a", pytest.approx(0.6), 2]


def test_prefer_picks_one_configuration_and_says_so() -> None:
    ranking = rank_backbones(two_temperatures(), metadata=META, prefer=["temperature=0.1"])
    assert sorted(ranking.overall["entry"]) == ["a", "b", "c"]
    knn_a = ranking.values[(ranking.values["task"] == "knn") & (ranking.values["entry"] == "a")]
    assert knn_a["value"].tolist() == [0.6]
    assert ranking.configurations.chosen == [
        {"prefer": "temperature=0.1", "backbone": "a", "kept": 1, "left_out": 1,
         "values_left_out": "0.07"},
    ]  # fmt: skip
    assert len(ranking.configurations.left_out) == 1


@pytest.mark.parametrize(
    ("prefer", "message"),
    [
        ("pooling=avg", "no row has a configuration key 'pooling'. Keys present: .*layer, .*pool"),
        ("temperature=0.5", r"no row has knn.temperature=0.5. Values present: 0.07, 0.1"),
        ("layer", "expects KEY=VALUE"),
        ("dataset_fingerprint=zzz", "no row's dataset fingerprint starts with 'zzz'"),
    ],
)
def test_a_prefer_that_no_row_matches_is_a_clear_error(prefer: str, message: str) -> None:
    with pytest.raises(RankingOptionError, match=message):
        rank_backbones(two_temperatures(), metadata=META, prefer=[prefer])


def test_rows_of_an_earlier_source_of_a_dataset_name_are_set_aside() -> None:
    """Issue 22's retrieval example: a failed first run on another copy of the dataset and
    the new run, both seed 0, were shown as 0.9531 ± 0.0040 'over seeds'."""
    old, new = "f" * 32, "a" * 32
    rows = [row("a", "d", "classes", "0.2-queries", 0.9559, stage="retrieval", metric="map",
                dataset_fingerprint=old, config_hash="old", time="2026-01-01")]  # fmt: skip
    rows += [row(b, "d", "classes", "0.2-queries", v, stage="retrieval", metric="map",
                 dataset_fingerprint=new, time="2026-02-01")
             for b, v in (("a", 0.9503), ("b", 0.9), ("c", 0.8))]  # fmt: skip
    ranking = rank_backbones(pd.DataFrame(rows), metadata=META)
    a = ranking.values.set_index("entry").loc["a"]
    assert (a["value"], a["seeds"]) == (0.9503, 1)
    line = ranking.sources.iloc[0]
    assert (line["dataset"], line["used"]) == ("d", new[:12])
    assert line["left_out"] == f"{old[:12]} (1 rows)"
    assert line["backbones_left_out"] == "a" and len(ranking.stale_rows) == 1
    chosen = rank_backbones(pd.DataFrame(rows), metadata=META,
                            prefer=[f"dataset_fingerprint={old[:6]}"])  # fmt: skip
    assert chosen.sources.iloc[0]["used"] == old[:12]


def test_an_auroc_below_chance_is_flagged() -> None:
    rows = [row(b, "d", "relative-mahalanobis", "detect:far", v, stage="ood", metric="auroc")
            for b, v in (("a", 0.0), ("b", 0.9), ("c", 0.7))]  # fmt: skip
    ranking = rank_backbones(pd.DataFrame(rows), metadata=META)
    flagged = ranking.below_chance
    assert flagged[["entry", "metric", "value"]].values.tolist() == [["a", "auroc", 0.0]]


# --- rank correlations: the exact permutation p-value over few entries ---


def scipy_spearman_p(x, y, **kw) -> float:
    def rho(perm):
        return stats.spearmanr(perm, y).statistic

    return stats.permutation_test((x,), rho, permutation_type="pairings", **kw).pvalue


def test_spearman_p_is_the_exact_permutation_p_for_few_points() -> None:
    rho, p = spearman([1, 2, 3], [30, 20, 10])
    assert rho == -1.0 and p == pytest.approx(1 / 3)  # spearmanr's own p: 0.000
    assert stats.spearmanr([1, 2, 3], [30, 20, 10]).pvalue < 1e-6
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=6), rng.normal(size=6)
    assert spearman(x, y)[1] == pytest.approx(scipy_spearman_p(x, y, n_resamples=np.inf))
    x, y = rng.normal(size=11), rng.normal(size=11)  # above EXACT_MAX: 9999 random orders
    expected = scipy_spearman_p(x, y, n_resamples=9999, rng=np.random.default_rng(0))
    assert spearman(x, y)[1] == pytest.approx(expected)


def test_the_scale_table_gives_the_exact_p_over_three_backbones() -> None:
    rows = [row(b, "d", "linear", "full", v) for b, v in (("small", 0.9), ("mid", 0.8),
                                                           ("big", 0.7))]  # fmt: skip
    meta = {"small": {**META["rn18_dino"], "params": 1e6}, "mid": {**META["rn18_dino"],
            "params": 2e6}, "big": {**META["rn18_dino"], "params": 3e6}}  # fmt: skip
    scale = rank_backbones(pd.DataFrame(rows), metadata=meta).scale
    scale = scale.set_index(["against", "family"])
    line = scale.loc[("parameters", "all")]
    assert (line["rho"], line["backbones"]) == (-1.0, 3)
    assert line["p_value"] == pytest.approx(1 / 3) and line["p_method"] == "exact permutation"


def test_task_correlations_carry_their_permutation_p() -> None:
    ranking = rank_backbones(results_frame(), metadata=META)
    wide = ranking.tasks.pivot(index="entry", columns="task", values="z")
    both = wide[["linear", "knn"]].dropna()
    expected = scipy_spearman_p(both["linear"].to_numpy(), both["knn"].to_numpy(),
                                n_resamples=np.inf)  # fmt: skip
    assert ranking.correlation_p.loc["linear", "knn"] == pytest.approx(expected)


# --- uncertainty: the bootstrap over settings (and seeds), checked against scipy ---


def linear_frame(n_datasets: int = 6, seed: int = 5) -> pd.DataFrame:
    """Three backbones, the linear probe on ``n_datasets`` datasets (one setting each)."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame([row(b, f"d{i}", "linear", "full", q + float(rng.normal(0, 0.08)))
                         for i in range(n_datasets) for b, q in (("a", 0.8), ("b", 0.75),
                                                                 ("c", 0.6))])  # fmt: skip


def task_z(ranking, task: str, entry: str) -> np.ndarray:
    """An entry's z per setting of a task, settings in sorted order (the bootstrap's)."""
    z = ranking.zscores[(ranking.zscores["task"] == task) & (ranking.zscores["entry"] == entry)]
    return z.sort_values(SETTING_KEYS)["z"].to_numpy()


def test_bootstrap_intervals_are_scipys_percentile_intervals_of_the_mean_over_settings() -> None:
    ranking = rank_backbones(linear_frame(), metadata=META, bootstrap=2000, seed=3)
    boot = ranking.bootstrap
    assert (boot.resamples, boot.seed, boot.seeds_resampled) == (2000, 3, False)
    table = boot.overall.set_index("entry")
    for j, entry in enumerate(boot.entries):
        expected = stats.bootstrap((task_z(ranking, "linear", entry),), np.mean,
                                   n_resamples=2000, method="percentile", vectorized=True,
                                   rng=np.random.default_rng(3))  # fmt: skip
        np.testing.assert_allclose(boot.overall_z[:, j], expected.bootstrap_distribution)
        low, high = expected.confidence_interval
        assert table.loc[entry, ["z_low", "z_high"]].tolist() == pytest.approx([low, high])
        per_task = boot.tasks.set_index(["task", "entry"]).loc[("linear", entry)]
        assert per_task[["z_low", "z_high"]].tolist() == pytest.approx([low, high])


def test_two_tasks_resample_independently_and_overall_is_their_mean() -> None:
    frame = pd.concat([linear_frame(), linear_frame(4, seed=9).assign(method="knn@20")])
    ranking = rank_backbones(frame, metadata=META, bootstrap=1000, seed=11)
    assert ranking.task_names == ["linear", "knn"]  # the order the draws are made in
    boot = ranking.bootstrap
    for j, entry in enumerate(boot.entries):
        expected = stats.bootstrap(
            (task_z(ranking, "linear", entry), task_z(ranking, "knn", entry)),
            lambda x, y, axis: (x.mean(axis=axis) + y.mean(axis=axis)) / 2,
            n_resamples=1000, method="percentile", vectorized=True,
            rng=np.random.default_rng(11),
        )  # fmt: skip
        np.testing.assert_allclose(boot.overall_z[:, j], expected.bootstrap_distribution)
        got = boot.overall.set_index("entry").loc[entry, ["z_low", "z_high"]].tolist()
        assert got == pytest.approx(list(expected.confidence_interval))


def test_rank_intervals_pairwise_shares_and_ties_follow_from_the_resamples() -> None:
    ranking = rank_backbones(linear_frame(), metadata=META, bootstrap=1000, seed=0)
    boot = ranking.bootstrap
    ranks = stats.rankdata(-boot.overall_z, axis=1, method="min")
    table = boot.overall.set_index("entry")
    for j, entry in enumerate(boot.entries):
        assert table.loc[entry, "rank_low"] == np.quantile(ranks[:, j], 0.025, method="lower")
        assert table.loc[entry, "rank_high"] == np.quantile(ranks[:, j], 0.975, method="higher")
    a, b = boot.overall_z[:, 0], boot.overall_z[:, 1]
    assert boot.above.iloc[0, 1] == pytest.approx(np.mean((a > b) + 0.5 * (a == b)))
    assert boot.above.iloc[0, 1] + boot.above.iloc[1, 0] == pytest.approx(1.0)
    leader_low = table["z_low"].iloc[0]
    assert list(table["tied_with_leader"]) == [False] + [
        bool(h >= leader_low) for h in table["z_high"].iloc[1:]
    ]
    assert boot.entries == list(ranking.overall["entry"])


def reference_bootstrap(ranking, resamples: int, seed: int) -> np.ndarray:
    """The documented protocol, written out with loops: settings per task, then seeds."""
    rows = ranking.primary_rows
    settings = sorted({tuple(k) for k in rows[SETTING_KEYS].itertuples(index=False)})
    entries = list(ranking.overall["entry"])
    rng = np.random.default_rng(seed)
    by_task = {t: [i for i, s in enumerate(settings) if s[1] == t] for t in ranking.task_names}
    draws = {t: rng.integers(0, len(ix), size=(resamples, len(ix))) for t, ix in by_task.items()}
    values = {}
    for i, s in enumerate(settings):
        mine = rows[[tuple(k) == s for k in rows[SETTING_KEYS].itertuples(index=False)]]
        for e in entries:
            v = mine[mine["backbone"] == e].sort_values("seed")["value"].to_numpy()
            if len(v):
                values[i, e] = v
    most = max(len(v) for v in values.values())
    u = rng.random((resamples, len(settings), most))
    overall = np.full((resamples, len(entries)), np.nan)
    for b in range(resamples):
        z = {}
        for i in range(len(settings)):
            cell = {e: v[np.floor(u[b, i, : len(v)] * len(v)).astype(int)].mean()
                    for (k, e), v in values.items() if k == i}  # fmt: skip
            arr = np.array(list(cell.values()))
            if arr.std() > 1e-12:
                z |= {(i, e): (x - arr.mean()) / arr.std() for e, x in cell.items()}
        for j, e in enumerate(entries):
            means = []
            for t, ix in by_task.items():
                picked = [z[ix[d], e] for d in draws[t][b] if (ix[d], e) in z]
                if picked:
                    means.append(np.mean(picked))
            overall[b, j] = np.mean(means)
    return overall


def test_seeds_are_resampled_the_same_way_for_every_entry() -> None:
    rng = np.random.default_rng(2)
    rows = [row(b, f"d{i}", "linear", "5-shot", q + float(rng.normal(0, 0.1)), seed=s)
            for i in range(3) for b, q in (("a", 0.7), ("b", 0.65), ("c", 0.5))
            for s in range(3)]  # fmt: skip
    rows += [row(b, f"d{i}", "linear", "full", q + float(rng.normal(0, 0.05)))
             for i in range(2) for b, q in (("a", 0.8), ("b", 0.85), ("c", 0.6))]  # fmt: skip
    ranking = rank_backbones(pd.DataFrame(rows), metadata=META, bootstrap=200, seed=4)
    assert ranking.bootstrap.seeds_resampled
    np.testing.assert_allclose(ranking.bootstrap.overall_z, reference_bootstrap(ranking, 200, 4))


def test_a_bootstrap_with_one_setting_or_too_few_resamples_is_a_clear_error() -> None:
    one = pd.DataFrame([row(b, "d", "linear", "full", v) for b, v in (("a", 0.9), ("b", 0.8))])
    with pytest.raises(RankingOptionError, match="1 scored setting.*--bootstrap 0"):
        rank_backbones(one, metadata=META, bootstrap=1000)
    assert rank_backbones(one, metadata=META, bootstrap=None).bootstrap is None  # default: off
    with pytest.raises(RankingOptionError, match="at least 100 resamples"):
        rank_backbones(linear_frame(), metadata=META, bootstrap=10)
