"""The report: Markdown, self-contained HTML, real PNG figures, imported rows marked, missing
cells listed, a clear error on an empty table."""

from __future__ import annotations

import base64
import io
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from bob_cache.errors import NoResultsError
from bob_cache.pipelines.report import SUITE_METADATA, build_report
from bob_cache.stores.results import ResultsTable
from bob_cache.stores.results_import import import_results

QUALITY = {"big_clip": 0.9, "rn50_sup": 0.8, "vit_mae": 0.7, "rn18_dino": 0.6}
META = {
    "big_clip": {"family": "ViT", "method": "CLIP", "data": "LAION-2B", "params": 86_000_000},
    "rn50_sup": {"family": "ResNet", "method": "supervised", "data": "ImageNet-1k",
                 "params": 23_500_000},
    "vit_mae": {"family": "ViT", "method": "MAE", "data": "ImageNet-1k", "params": 300_000_000},
    "rn18_dino": {"family": "ResNet", "method": "DINO", "data": "ImageNet-1k",
                  "params": 11_000_000},
}  # fmt: skip


def rows(skip: tuple[str, str] | None = None) -> list[dict]:
    """Linear, kNN, 2-seed few-shot and retrieval rows; ``skip`` = (backbone, stage) left out."""
    out = []
    for dataset, offset in (("d1", 0.0), ("d2", 0.03)):
        for i, (backbone, q) in enumerate(QUALITY.items()):
            units = [("probe", "linear", "full", "top1", q, 0),
                     ("probe", "knn@20", "full", "top1", q - 0.1 + 0.01 * i, 0),
                     ("probe", "linear", "5-shot", "top1", q - 0.3, 0),
                     ("probe", "linear", "5-shot", "top1", q - 0.28, 1),
                     ("retrieval", "classes", "0.2-queries", "map", q - 0.4 + offset, 0),
                     ]  # fmt: skip
            for stage, method, setting, metric, value, seed in units:
                if skip == (backbone, stage):
                    continue
                out.append({
                    "run_id": "r", "stage": stage, "dataset": dataset, "split": "test",
                    "backbone": backbone, "feature_key": f"key-{backbone}", "method": method,
                    "setting": setting, "metric": metric, "value": value + offset, "seed": seed,
                    "config_hash": f"{dataset}-{backbone}-{method}-{setting}-{seed}",
                    "versions": {}, "time": "2026-01-01T00:00:00+00:00", "train_rows": 10,
                    "val_rows": 0, "protocol": "test",
                })  # fmt: skip
    return out


class Collector(HTMLParser):
    """Tags, and the data URIs of images."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[str] = []
        self.images: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append(tag)
        if tag == "img":
            self.images.append(dict(attrs)["src"] or "")


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, object]:
    root = tmp_path_factory.mktemp("report")
    ResultsTable.open(root / "res").append(rows(skip=("rn18_dino", "retrieval")))
    csv = root / "paper.csv"
    csv.write_text(
        "dataset,backbone,method,setting,metric,value,seed\n"
        "d1,paper_vit,linear,full,top1,0.85,0\nd2,paper_vit,linear,full,top1,0.86,0\n"
    )
    import_results(csv, results=root / "res", source="Goldblum et al. 2023")
    summary = build_report(root / "res", root / "out", metadata=META, suite_name="unit")
    return root / "out", summary


def test_the_report_writes_every_file_and_names_the_top_backbone(report) -> None:
    out, summary = report
    assert summary.top_backbone == "big_clip" and summary.backbones[0] == "big_clip"
    assert summary.tasks == ["linear", "few-shot", "knn", "retrieval"]
    for name in ("report.md", "report.html", "results.parquet", "results.csv", "ranking.png",
                 "correlations.png", "task_scatter.png"):  # fmt: skip
        assert (out / name).is_file(), name
    markdown = (out / "report.md").read_text()
    assert markdown.startswith("# bob-cache report: unit")
    assert "Top backbone: big_clip" in markdown
    assert re.search(r"\| 1 \| big_clip \| base \| ViT \| CLIP \| LAION-2B \| 86\.0 \|", markdown)
    assert "Ranking among small backbones" in markdown and "Ranking among large" in markdown
    assert "0.6100 ± 0.0141" in markdown  # the 5-shot mean ± std over seeds, big_clip on d1
    assert "Spearman correlation between tasks" in markdown and "pretraining images" in markdown
    assert len(pd.read_parquet(out / "results.parquet")) == summary.rows == len(rows()) - 2 + 2
    assert len(pd.read_csv(out / "results.csv")) == summary.rows


def test_the_html_parses_and_inlines_real_png_figures(report) -> None:
    out, _ = report
    parser = Collector()
    parser.feed((out / "report.html").read_text())
    parser.close()
    assert parser.tags.count("table") >= 10 and "nav" in parser.tags
    assert len(parser.images) == 3
    for uri in parser.images:
        assert uri.startswith("data:image/png;base64,")
        image = Image.open(io.BytesIO(base64.b64decode(uri.split(",", 1)[1])))
        assert image.format == "PNG" and image.width > 200 and image.height > 200
    for png in out.glob("*.png"):
        with Image.open(png) as image:
            image.verify()


def test_imported_rows_are_marked_with_their_source(report) -> None:
    out, summary = report
    assert summary.imported_rows == 2 and summary.sources == ["Goldblum et al. 2023"]
    markdown = (out / "report.md").read_text()
    assert "| paper_vit† |" in markdown and "0.8500†" in markdown
    assert "† imported from Goldblum et al. 2023" in markdown
    assert "| big_clip† |" not in markdown
    html = (out / "report.html").read_text()
    assert "paper_vit†" in html and "imported from Goldblum et al. 2023" in html


def test_missing_cells_are_listed(report) -> None:
    out, summary = report
    gaps = {(c["backbone"], c["task"], c["dataset"]) for c in summary.missing_cells}
    assert {("rn18_dino", "retrieval", "d1"), ("rn18_dino", "retrieval", "d2")} <= gaps
    assert ("paper_vit", "knn", "d1") in gaps and ("big_clip", "linear", "d1") not in gaps
    markdown = (out / "report.md").read_text()
    assert "| rn18_dino | retrieval | d1 |" in markdown


def test_the_appendix_names_feature_keys_and_config_hashes(report) -> None:
    out, _ = report
    markdown = (out / "report.md").read_text()
    appendix = markdown.split("## Appendix: provenance", 1)[1]
    assert "| key-big_clip | d1-big_clip-linear-full-0 |" in appendix
    assert "d1-big_clip-linear-5-shot-0, d1-big_clip-linear-5-shot-1" in appendix


def test_an_empty_table_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(NoResultsError, match="No results in .* Run `bob-cache probe`"):
        build_report(tmp_path / "none", tmp_path / "out")


def test_the_battle_metadata_beside_the_results_labels_the_backbones(tmp_path: Path) -> None:
    ResultsTable.open(tmp_path / "res").append(rows())
    suite_meta = {b: {**m, "label": b.upper()} for b, m in META.items()}
    (tmp_path / "res" / SUITE_METADATA.format(suite="demo")).write_text(json.dumps(suite_meta))
    summary = build_report(tmp_path / "res", tmp_path / "out")
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert markdown.startswith("# bob-cache report: demo")
    assert "| 1 | BIG_CLIP | big_clip | base | ViT | CLIP |" in markdown
    assert summary.top_backbone == "big_clip"


def test_the_metadata_file_name_is_the_battles() -> None:
    from bob_cache.pipelines.battle import METADATA_FILE

    assert SUITE_METADATA == METADATA_FILE


# --- issue 22: entries per configuration, sources, flags, uncertainty, bad input ---


def test_the_report_carries_bootstrap_intervals_and_the_pairwise_table(report) -> None:
    out, summary = report
    assert summary.bootstrap == {"resamples": 1000, "seed": 0}
    markdown = (out / "report.md").read_text()
    assert "## Uncertainty" in markdown and "1000 bootstrap resamples (seed 0)" in markdown
    assert "### How often A ranks above B" in markdown
    head = next(line for line in markdown.splitlines() if line.startswith("| rank |"))
    assert "| overall z | 95% interval | rank 95% | vs #1 |" in head
    assert re.search(r"\| 1 \| big_clip \|.*\| \[-?\d\.\d\d, -?\d\.\d\d\] \| 1–\d \| leader \|",
                     markdown)  # fmt: skip
    assert "p=" in markdown.split("### Spearman correlation between tasks", 1)[1]


def probe_toy(root: Path, backbone: str, key: str, *, spec: dict, **options: object) -> None:
    """Write toy feature sets for ``backbone`` under ``key`` and probe them for real."""
    from bob_cache.pipelines.probe import ProbeConfig, probe
    from tests.conftest import blobs, write_feature_sets

    offset = sum(map(ord, backbone + key)) % 7
    splits = {s: blobs(n, seed=offset + i, spread=1.6) for i, (s, n) in
              enumerate((("train", 80), ("val", 40), ("test", 60)))}  # fmt: skip
    write_feature_sets(root / "store", splits, backbone=backbone, key=key, spec=spec)
    probe(ProbeConfig(store=str(root / "store"), dataset="toy", backbone=backbone, feature=key,
                      methods=("linear", "knn"), ks=(5,), results=str(root / "res"),
                      device="cpu", **options))  # fmt: skip


def spec(layer: str, pool: str, fingerprint: str = "fp-toy") -> dict:
    return {"layer": layer, "pool": pool, "dtype": "float32",
            "dataset": {"fingerprint": fingerprint, "limit": None}}  # fmt: skip


def test_two_poolings_of_one_backbone_are_ranked_apart_and_prefer_picks_one(
    tmp_path: Path,
) -> None:
    probe_toy(tmp_path, "alpha.tag", "feat0000000a", spec=spec("layer3", "avg"))
    probe_toy(tmp_path, "alpha.tag", "feat0000000b", spec=spec("layer4", "max"))
    for name in ("beta.tag", "gamma.tag"):
        probe_toy(tmp_path, name, "feat0000000c", spec=spec("final", "avg"))
    rows = ResultsTable.open(tmp_path / "res").read()
    assert set(rows["dataset_fingerprint"]) == {"fp-toy"}
    assert json.loads(rows["config"].iloc[0])["feature"]["layer"] in {"layer3", "layer4"}
    summary = build_report(tmp_path / "res", tmp_path / "out", bootstrap=0)
    assert sorted(summary.backbones) == ["alpha.tag · layer3 · avg", "alpha.tag · layer4 · max",
                                         "beta.tag", "gamma.tag"]  # fmt: skip
    assert summary.configurations == {"alpha.tag": ["layer", "pool"]}
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "(they differ in layer, pool); each is ranked as its own entry" in markdown
    assert "| alpha.tag · layer3 · avg |" in markdown
    picked = build_report(tmp_path / "res", tmp_path / "out2", prefer=["layer=layer4"],
                          bootstrap=0)  # fmt: skip
    assert sorted(picked.backbones) == ["alpha.tag", "beta.tag", "gamma.tag"]
    assert picked.chosen[0]["values_left_out"] == "layer3" and picked.prefer == ["layer=layer4"]
    assert "Configurations chosen by --prefer" in (tmp_path / "out2" / "report.md").read_text()


def test_two_knn_temperatures_are_two_entries_with_one_seed_each(tmp_path: Path) -> None:
    for name in ("alpha.tag", "beta.tag", "gamma.tag"):
        probe_toy(tmp_path, name, "feat0000000c", spec=spec("final", "avg"))
    probe_toy(tmp_path, "alpha.tag", "feat0000000c", spec=spec("final", "avg"), temperature=0.5)
    summary = build_report(tmp_path / "res", tmp_path / "out", bootstrap=0)
    assert summary.configurations == {"alpha.tag": ["temperature"]}
    from bob_cache.stores.results import summarize

    table = summarize(ResultsTable.open(tmp_path / "res").read(), metrics=["top1"])
    alpha_knn = table[(table["backbone"] == "alpha.tag") & (table["method"] == "knn@5")]
    assert sorted(alpha_knn["configuration"]) == ["temperature=0.07", "temperature=0.5"]
    assert list(alpha_knn["seeds"]) == [1, 1]


def test_rows_of_an_earlier_dataset_source_are_left_out_and_named(tmp_path: Path) -> None:
    probe_toy(tmp_path, "alpha.tag", "feat000000f1", spec=spec("final", "avg", "fp-old"))
    for name in ("alpha.tag", "beta.tag", "gamma.tag"):
        probe_toy(tmp_path, name, "feat000000f2", spec=spec("final", "avg", "fp-new"))
    summary = build_report(tmp_path / "res", tmp_path / "out", bootstrap=0)
    assert summary.backbones and "alpha.tag" in summary.backbones  # one entry, not split
    assert summary.stale_rows > 0
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "### Dataset sources used" in markdown
    assert re.search(r"\| toy \| fp-new \| \d+ \| fp-old \(\d+ rows\) \| \d+ \| alpha\.tag \|",
                     markdown)  # fmt: skip


def test_an_auroc_below_chance_is_flagged_in_the_report(tmp_path: Path) -> None:
    rows_ = []
    for b, auroc in (("big_clip", 0.0), ("rn50_sup", 0.9), ("vit_mae", 0.8)):
        rows_.append({**rows()[0], "backbone": b, "stage": "ood", "method": "relative-maha",
                      "setting": "detect:far", "metric": "auroc", "value": auroc,
                      "config_hash": f"ood-{b}"})  # fmt: skip
    ResultsTable.open(tmp_path / "res").append(rows_)
    summary = build_report(tmp_path / "res", tmp_path / "out", metadata=META)
    assert summary.below_chance == 1
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "### Numbers flagged: below chance" in markdown and "0.0000⚠" in markdown
    assert "| big_clip | ood-detection | d1 | relative-maha | detect:far | auroc | 0.0000 |" in (
        markdown
    )


SUITE = """
name: mini
backbones:
  - {name: resnet18, random_init: true, label: R18}
  - {name: resnet34, random_init: true, label: R34}
  - {name: resnet50, random_init: true, label: R50}
datasets:
  - {name: d1, data: builtin:digits}
tasks:
  - kind: linear
  - {kind: knn, backbones: [R18, R34]}
"""


def test_cells_a_suite_task_leaves_out_are_not_missing(tmp_path: Path) -> None:
    from bob_cache.pipelines.battle import load_battle_suite

    labels = {"r18": "R18", "r34": "R34", "r50": "R50"}
    out = [
        {**r, "backbone": b}
        for r in rows()
        for b in labels
        if r["dataset"] == "d1"
        and r["backbone"] == "big_clip"
        and r["method"] in ("linear", "knn@20")
        and (r["method"] == "linear" or b != "r50")
    ]
    for i, r in enumerate(out):
        r.update(value=r["value"] - 0.01 * i, config_hash=f"h{i}")
    ResultsTable.open(tmp_path / "res").append(out)
    meta = {b: {"name": f"resnet{b[1:]}", "label": label} for b, label in labels.items()}
    (tmp_path / "suite.yaml").write_text(SUITE)
    suite = load_battle_suite(tmp_path / "suite.yaml")
    without = build_report(tmp_path / "res", tmp_path / "out", metadata=meta)
    assert without.missing_cells == [{"backbone": "r50", "task": "knn", "dataset": "d1"}]
    assert "pass --suite to tell" in (tmp_path / "out" / "report.md").read_text()
    given = build_report(tmp_path / "res", tmp_path / "out", metadata=meta, suite=suite)
    assert given.missing_cells == [] and given.suite_checked
    assert given.excluded_cells == [{"backbone": "r50", "task": "knn", "dataset": "d1"}]
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "left out on purpose by the suite" in markdown
    assert "Run the missing evaluations" not in markdown


def table_files(directory: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--prefer", "pooling=avg"), "no row has a configuration key 'pooling'"),
        (("--prefer", "avg"), "--prefer expects KEY=VALUE"),
        (("--bootstrap", "10"), "at least 100 resamples"),
    ],
)
def test_bad_report_options_are_clear_errors_that_change_nothing(
    cli, tmp_path: Path, args: tuple[str, ...], message: str
) -> None:
    ResultsTable.open(tmp_path / "res").append(rows())
    before = table_files(tmp_path / "res")
    result = cli("report", tmp_path / "res", "--out", tmp_path / "out", *args)
    assert result.exit_code == 1 and message in result.output and "Traceback" not in result.output
    assert table_files(tmp_path / "res") == before and not (tmp_path / "out").exists()


def test_a_bootstrap_of_one_setting_is_refused_and_the_default_skips_it(
    cli, tmp_path: Path
) -> None:
    one = [r for r in rows() if (r["dataset"], r["method"], r["setting"]) == ("d1", "linear",
                                                                             "full")]  # fmt: skip
    ResultsTable.open(tmp_path / "res").append(one)
    before = table_files(tmp_path / "res")
    refused = cli("report", tmp_path / "res", "--out", tmp_path / "out", "--bootstrap", "500")
    assert refused.exit_code == 1 and "1 scored setting(s)" in refused.output
    assert "--bootstrap 0" in refused.output and table_files(tmp_path / "res") == before
    assert not (tmp_path / "out").exists()
    done = cli("report", tmp_path / "res", "--out", tmp_path / "out", "--json")
    assert done.exit_code == 0 and json.loads(done.stdout)["bootstrap"] is None
    assert (
        "No bootstrap: it needs two scored settings" in (tmp_path / "out" / "report.md").read_text()
    )


def test_bootstrap_resamples_and_seed_are_options_and_recorded(cli, tmp_path: Path) -> None:
    ResultsTable.open(tmp_path / "res").append(rows())
    first = cli("report", tmp_path / "res", "--out", tmp_path / "a", "--bootstrap", "300",
                "--seed", "7", "--json")  # fmt: skip
    assert first.exit_code == 0, first.output
    assert json.loads(first.stdout)["bootstrap"] == {"resamples": 300, "seed": 7}
    again = cli("report", tmp_path / "res", "--out", tmp_path / "b", "--bootstrap", "300",
                "--seed", "7")  # fmt: skip
    assert again.exit_code == 0
    section = "## Uncertainty"
    text_a = (tmp_path / "a" / "report.md").read_text().split(section)[1].split("## ")[0]
    text_b = (tmp_path / "b" / "report.md").read_text().split(section)[1].split("## ")[0]
    assert text_a == text_b and "300 bootstrap resamples (seed 7)" in text_a


def test_a_table_where_nothing_can_be_ranked_still_reports_why(tmp_path: Path) -> None:
    base = rows()[0]
    ResultsTable.open(tmp_path / "res").append(
        [{**base, "stage": "other", "method": "mystery", "config_hash": "x"},
         {**base, "backbone": "b", "config_hash": "y"}, {**base, "value": float("nan")}]
    )  # fmt: skip
    summary = build_report(tmp_path / "res", tmp_path / "out", metadata=META)
    assert summary.top_backbone is None and summary.bootstrap is None
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert "No backbone could be ranked" in markdown
    assert "1 row(s) hold no finite value (not applicable)" in markdown
