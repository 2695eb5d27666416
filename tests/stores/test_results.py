"""The results table: append-only parquet parts, filters, and the mean ± std pivot."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from bob_cache.errors import StoreError
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


# --- the source column, and rows imported from a CSV ---


def test_rows_without_source_or_task_read_back_empty(tmp_path: Path) -> None:
    own = row()
    del own["source"], own["task"]
    table = ResultsTable.open(tmp_path)
    table.append([own, row(config_hash="h2", source="paper", task="knn")])
    frame = table.read().sort_values("config_hash")
    assert list(frame["source"]) == ["", "paper"] and list(frame["task"]) == ["", "knn"]


def test_a_table_written_before_the_source_column_stays_readable(tmp_path: Path) -> None:
    import pandas as pd

    new = ("source", "task", "config", "dataset_fingerprint")
    old = {c: v for c, v in row(versions="{}").items() if c not in new}
    pd.DataFrame([old]).to_parquet(tmp_path / "part-old.parquet", index=False)
    table = ResultsTable.open(tmp_path)
    table.append([row(config_hash="h2", source="paper")])
    frame = table.read().set_index("config_hash")
    assert frame.loc["h1", "source"] == "" and frame.loc["h2", "source"] == "paper"
    assert frame.loc["h1", "task"] == "" and frame.loc["h1", "config"] == ""
    # an own number and an imported one of the same cell are two lines, never a mean
    pivot = summarize(table.read()).set_index("configuration")
    assert list(pivot["top1"]) == ["0.5000", "0.5000"] and list(pivot["seeds"]) == [1, 1]
    assert set(pivot.index) == {"source=own", "source=paper"}


def write_csv(path: Path, text: str) -> Path:
    path.write_text(text.strip() + "\n", encoding="utf-8")
    return path


GOOD = """
dataset,backbone,method,setting,metric,value,seed,source
digits,resnet50.paper,linear,full,top1,0.95,0,
digits,resnet50.paper,linear,full,top5,0.99,0,
digits,resnet50.paper,classes,0.2-queries,map,0.41,,other paper
digits,resnet50.paper,linear,full,paper_score,3.5,,
"""


def test_import_fills_every_column_and_records_the_source(tmp_path: Path) -> None:
    from bob_cache.stores.results_import import PROTOCOL, import_results

    summary = import_results(write_csv(tmp_path / "x.csv", GOOD), results=tmp_path / "r",
                             source="BoB paper")  # fmt: skip
    assert (summary.rows, summary.added, summary.already_imported) == (4, 4, 0)
    assert summary.sources == ["BoB paper", "other paper"]  # a row's own source wins
    assert summary.unknown_metrics == ["paper_score"]  # allowed, but stated
    frame = ResultsTable.open(tmp_path / "r").read()
    assert list(frame.columns) == list(COLUMNS)
    frame = frame.set_index("metric")
    assert frame.loc["top1", "source"] == "BoB paper"
    assert frame.loc["map", "source"] == "other paper"
    assert frame.loc["top1", "stage"] == "probe" and frame.loc["map", "stage"] == "retrieval"
    assert frame.loc["top1", "value"] == 0.95 and frame.loc["top1", "seed"] == 0
    assert (frame["protocol"] == PROTOCOL).all() and (frame["versions"] == "{}").all()
    assert frame["config_hash"].nunique() == 4 and frame["run_id"].nunique() == 1


def test_reimporting_the_same_file_adds_nothing(tmp_path: Path) -> None:
    from bob_cache.stores.results_import import import_results

    csv = write_csv(tmp_path / "x.csv", GOOD)
    import_results(csv, results=tmp_path / "r", source="BoB paper")
    again = import_results(csv, results=tmp_path / "r", source="BoB paper")
    assert (again.added, again.already_imported) == (0, 4)
    assert len(ResultsTable.open(tmp_path / "r").read()) == 4
    other = import_results(csv, results=tmp_path / "r", source="another source")
    assert other.added == 3  # the row with its own source is the same row


def test_a_bad_csv_lists_every_problem_with_its_line(tmp_path: Path) -> None:
    from bob_cache.errors import ResultsImportError
    from bob_cache.stores.results_import import import_results

    bad = write_csv(tmp_path / "bad.csv", """
dataset,backbone,method,setting,metric,value,seed
digits,resnet50,linear,full,top1,0.9,0
digits,,linear,full,top1,abc,0
digits,resnet50,linear,full,top1,0.9,0
digits,resnet50,linear,5-shot,top1,0.5,1.5
digits,resnet50,linear,full,top5,0.9,0,extra
""")  # fmt: skip
    with pytest.raises(ResultsImportError) as caught:
        import_results(bad, results=tmp_path / "r", source="s")
    message = str(caught.value)
    assert "5 problem(s); nothing was imported" in message
    assert "line 3: empty backbone" in message and "line 3: value 'abc' is not a number" in message
    assert "line 4: repeats line 2" in message
    assert "line 5: seed '1.5' is not an integer" in message
    assert "line 6: more cells than the header" in message
    assert not (tmp_path / "r").exists()


def test_import_needs_the_columns_a_source_and_the_file(tmp_path: Path) -> None:
    from bob_cache.errors import DataNotFoundError, ResultsImportError
    from bob_cache.stores.results_import import import_results

    lacking = write_csv(tmp_path / "a.csv", "dataset,backbone,value\nd,b,1\n")
    with pytest.raises(ResultsImportError, match="lacks the column.s. method, setting, metric"):
        import_results(lacking, results=tmp_path / "r", source="s")
    sourceless = write_csv(tmp_path / "b.csv", GOOD.replace(",other paper", ","))
    with pytest.raises(ResultsImportError, match="line 2: no source: .*pass --source"):
        import_results(sourceless, results=tmp_path / "r")
    with pytest.raises(DataNotFoundError, match="No results CSV"):
        import_results(tmp_path / "missing.csv", results=tmp_path / "r", source="s")


def _append_many(directory: str, writer: int, barrier: object) -> None:
    table = ResultsTable.open(directory)
    barrier.wait()  # type: ignore[attr-defined]
    for i in range(20):
        table.append([row(run_id=f"w{writer}", config_hash=f"w{writer}-{i}", value=i)])


def test_concurrent_writers_lose_no_rows(tmp_path: Path) -> None:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(4)
    procs = [
        ctx.Process(target=_append_many, args=(str(tmp_path / "r"), w, barrier)) for w in range(4)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 4
    frame = ResultsTable.open(tmp_path / "r").read()
    assert len(frame) == 80 and frame["config_hash"].nunique() == 80


def test_a_remote_table_without_its_fsspec_backend_names_the_extra(monkeypatch) -> None:
    import fsspec

    def no_backend(*args: object, **kwargs: object) -> None:
        raise ImportError("Install s3fs to access S3")

    monkeypatch.setattr(fsspec.core, "url_to_fs", no_backend)
    with pytest.raises(StoreError, match=r"pip install 'bob-cache\[s3\]'"):
        ResultsTable.open("s3://bucket/results").read()


def raw_rows(directory: Path) -> pd.DataFrame:
    """Every row of every part, as written (no reader's deduplication)."""
    parts = sorted(directory.glob("part-*.parquet"))
    return pd.concat([pd.read_parquet(p) for p in parts], ignore_index=True)


def test_readers_drop_a_row_written_twice_but_keep_a_different_value(tmp_path: Path) -> None:
    import shutil

    table = ResultsTable.open(tmp_path / "r")
    table.append([row(), row(metric="top5", value=0.9)])
    (part,) = (tmp_path / "r").glob("part-*.parquet")
    shutil.copy(part, tmp_path / "r" / "part-9999-copy.parquet")  # a second run's same rows
    assert len(raw_rows(tmp_path / "r")) == 4
    frame = table.read()
    assert len(frame) == 2 and sorted(frame["metric"]) == ["top1", "top5"]
    assert summarize(frame).loc[0, "top1"] == "0.5000"  # one row, not a mean of two
    table.append([row(value=0.6, run_id="r2", time="2026-02-01T00:00:00+00:00")])
    frame = table.read(metric="top1")
    assert sorted(frame["value"]) == [0.5, 0.6]  # a different number is a different row
    assert summarize(table.read()).loc[0, "top1"] == "0.6000"  # the latest run wins, as before


def test_append_leaves_out_rows_another_writer_already_wrote(tmp_path: Path) -> None:
    first, second = ResultsTable.open(tmp_path / "r"), ResultsTable.open(tmp_path / "r")
    first.append([row(), row(metric="top5", value=0.9)])
    again = [row(run_id="r2"), row(metric="top5", value=0.9, run_id="r2")]
    assert second.append(again) is None  # the same unit, the same numbers: nothing written
    assert second.append([*again, row(metric="top10", value=1.0, run_id="r2")]) is not None
    written = raw_rows(tmp_path / "r")
    assert len(written) == 3 and sorted(written["metric"]) == ["top1", "top10", "top5"]
    assert not (tmp_path / "r" / ".claims").exists()  # the append lock released, no folder left


def _append_same(directory: str, writer: int, barrier: object) -> None:
    table = ResultsTable.open(directory)
    barrier.wait()  # type: ignore[attr-defined]
    for i in range(5):
        table.append([row(run_id=f"w{writer}", config_hash=f"h{i}", value=i)])


def test_writers_appending_the_same_rows_at_once_write_each_once(tmp_path: Path) -> None:
    import multiprocessing

    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(4)
    procs = [
        ctx.Process(target=_append_same, args=(str(tmp_path / "r"), w, barrier)) for w in range(4)
    ]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0] * 4
    written = raw_rows(tmp_path / "r")
    assert len(written) == 5 and written["config_hash"].nunique() == 5
