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
