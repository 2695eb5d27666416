"""BoB's ranking: tasks per row, z-scores per setting, task and overall means, size classes,
task correlations and the scale analysis, checked against scipy computed independently."""

from __future__ import annotations

import itertools
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
    register_task,
    resolve_backbone_info,
)
from bob_cache.ranking import tasks as task_registry

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
    monkeypatch.setattr(task_registry, "_TASKS", dict(task_registry._TASKS))
    register_task("panoptic", lambda f: f["stage"] == "panoptic", primary=("pq",))
    frame = pd.DataFrame([row(b, "d", "fpn", "full", v, stage="panoptic", metric="pq")
                          for b, v in (("a", 0.9), ("b", 0.7), ("c", 0.8))])  # fmt: skip
    ranking = rank_backbones(frame, metadata=META)
    assert ranking.task_names == ["panoptic"]
    assert list(ranking.overall["backbone"]) == ["a", "c", "b"]
    with pytest.raises(ValueError, match="already registered"):
        register_task("panoptic", lambda f: f["stage"] == "panoptic", primary=("pq",))


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
