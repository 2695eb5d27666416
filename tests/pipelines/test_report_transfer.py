"""The report's transferability section: estimates of a real battle beside the measured linear
probe, their rank correlations recomputed with scipy, the scatter figure, and the section's
message when no estimate exists."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from scipy import stats

from bob_cache.pipelines.report import build_report
from bob_cache.stores.results import ResultsTable

SUITE = """\
name: tiny-transfer
backbones:
  - {name: test_resnet, label: r0, random_init: true, seed: 0, image_size: 32}
  - {name: test_resnet, label: r1, random_init: true, seed: 1, image_size: 32}
  - {name: test_vit, label: v0, random_init: true, seed: 0, image_size: 32}
datasets:
  - {name: digits, data: "builtin:digits", limit: 90}
tasks:
  - kind: linear
  - kind: transferability
    methods: [logme, hscore, knn-loo]
    k: 3
options: {workers: 0, shard_rows: 32}
"""


@pytest.fixture(scope="module")
def battled(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from bob_cache.pipelines.battle import BattleConfig, battle

    root = tmp_path_factory.mktemp("transfer-report")
    (root / "suite.yaml").write_text(SUITE)
    run = BattleConfig(suite=str(root / "suite.yaml"), store=str(root / "store"),
                       results=str(root / "res"), threads=1)  # fmt: skip
    summary = battle(run)
    assert not summary.failed, summary.outcomes
    return root


def test_the_report_sets_each_estimate_against_the_linear_probe(battled: Path) -> None:
    summary = build_report(battled / "res", battled / "report")
    frame = ResultsTable.open(battled / "res").read()
    linear = frame[(frame["stage"] == "probe") & (frame["method"] == "linear")
                   & (frame["setting"] == "full") & (frame["metric"] == "top1")]  # fmt: skip
    linear = linear.groupby("backbone")["value"].mean()
    assert len(linear) == 3
    agreement = pd.DataFrame(summary.transferability)
    assert set(agreement["estimator"]) == {"logme", "hscore", "knn-loo"}
    assert set(agreement["outcome"]) == {"linear"} and (agreement["n_backbones"] == 3).all()
    for row in agreement.itertuples():
        metric = "top1" if row.estimator == "knn-loo" else row.estimator
        est = frame[(frame["stage"] == "transferability") & (frame["method"] == row.estimator)
                    & (frame["metric"] == metric)].groupby("backbone")["value"].mean()  # fmt: skip
        x, y = est[linear.index].to_numpy(), linear.to_numpy()
        if np.ptp(x) == 0 or np.ptp(y) == 0:
            assert row.spearman is None or np.isnan(row.spearman)
            continue
        assert row.spearman == pytest.approx(stats.spearmanr(x, y).statistic)
        exact = stats.permutation_test(
            (x,), lambda a, y=y: stats.spearmanr(a, y).statistic, permutation_type="pairings",
            n_resamples=np.inf,
        ).pvalue  # fmt: skip
        assert row.spearman_p == pytest.approx(exact)
        assert "only 3 backbones" in row.verdict and "exact p possible is 0.33" in row.verdict
        assert "no reliable signal" in row.verdict  # p ≥ 0.33 never reads as an order
    markdown = (battled / "report" / "report.md").read_text()
    section = markdown.split("## Transferability estimates", 1)[1].split("\n## ", 1)[0]
    for label in ("r0", "r1", "v0"):
        assert label in section  # each backbone's estimates beside its top-1
    assert "Agreement of each estimate" in section and "exact two-sided p" in section
    assert "![Transferability estimates on digits](transferability-digits.png)" in section
    assert (battled / "report" / "transferability-digits.png").read_bytes()[:4] == b"\x89PNG"
    assert summary.files["transferability-digits"].endswith("transferability-digits.png")
    html = (battled / "report" / "report.html").read_text()
    assert "Transferability estimates" in html and html.count("data:image/png;base64,") >= 2


def test_estimates_are_not_ranked_and_a_table_without_them_says_how_to_add_them(
    battled: Path, tmp_path: Path
) -> None:
    frame = ResultsTable.open(battled / "res").read()
    probes_only = ResultsTable.open(tmp_path / "res")
    probes_only.append(frame[frame["stage"] != "transferability"].to_dict(orient="records"))
    stale = tmp_path / "report" / "transferability-digits.png"
    stale.parent.mkdir()
    stale.write_bytes(b"old")
    summary = build_report(tmp_path / "res", tmp_path / "report", bootstrap=0)
    assert summary.transferability == [] and not stale.exists()
    markdown = (tmp_path / "report" / "report.md").read_text()
    assert "No transferability estimates in the results" in markdown
    assert "kind: transferability" in markdown
    with_estimates = build_report(battled / "res", tmp_path / "again", bootstrap=0)
    assert with_estimates.tasks == summary.tasks  # the estimates are no task of the ranking
