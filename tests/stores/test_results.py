"""The results table: append-only parquet parts, filters, and the mean ± std pivot."""

from __future__ import annotations

from pathlib import Path

import pytest

from bob_cache.stores.results import COLUMNS, ResultsTable, summarize


def row(**kw: object) -> dict:
    base = {c: "" for c in COLUMNS}
    base.update(
        run_id="r1",
        stage="probe",
        dataset="d",
        split="test",
        backbone="b",
        feature_key="k",
        method="linear",
        setting="full",
        metric="top1",
        value=0.5,
        seed=0,
        config_hash="h1",
        versions={"torch": "x"},
        time="2026-01-01T00:00:00+00:00",
    )
    base.update(kw)
    return base


def test_append_read_filter_and_config_lookup(tmp_path: Path) -> None:
    table = ResultsTable.open(tmp_path / "res")
    assert table.read().empty and not table.has_config("h1")
    table.append([row(), row(metric="top5", value=0.9)])
    table.append([row(dataset="other", config_hash="h2")])
    assert len(table.read()) == 3
    assert len(table.read(dataset="d")) == 2
    assert table.has_config("h1") and table.has_config("h2") and not table.has_config("h3")
    assert len(list((tmp_path / "res").glob("part-*.parquet"))) == 2
    assert not list((tmp_path / "res").glob("*.tmp"))


def test_summarize_reports_mean_and_std_over_seeds(tmp_path: Path) -> None:
    table = ResultsTable.open(tmp_path)
    table.append(
        [
            row(setting="5-shot", seed=s, value=v, config_hash=f"h{s}")
            for s, v in enumerate([0.5, 0.7])
        ]
    )
    table.append([row(value=0.8, config_hash="full")])
    pivot = summarize(table.read()).set_index("setting")
    assert pivot.loc["5-shot", "top1"] == "0.6000 ± 0.1414"
    assert pivot.loc["full", "top1"] == "0.8000"


def test_rows_missing_columns_are_refused(tmp_path: Path) -> None:
    bad = row()
    del bad["seed"]
    with pytest.raises(ValueError, match="seed"):
        ResultsTable.open(tmp_path).append([bad])
