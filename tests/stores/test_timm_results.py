"""timm's published results tables, imported as distributed: mapped to the registry, marked
with their source, placed in the ranking's tasks; bad tables change nothing."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bob_cache.errors import ResultsImportError
from bob_cache.ranking.tasks import assign_tasks
from bob_cache.stores.results import ResultsTable
from bob_cache.stores.timm_results import import_timm_results

# As timm's results/results-imagenet-r.csv has it (quoted thousands in param_count).
HEADER = (
    "model,top1,top1_err,top5,top5_err,param_count,img_size,crop_pct,interpolation,"
    "top1_diff,top5_diff,rank_diff"
)
ROWS = [
    'eva_giant_patch14_336.clip_ft_in1k,90.550,9.450,97.230,2.770,"1,013.01",336,1.000,bicubic,'
    "-7.310,-2.650,+6",
    "resnet50.tv_in1k,36.153,63.847,51.963,48.037,25.56,224,0.875,bilinear,-40.0,-41.0,-5",
    "convnext_tiny.fb_in1k,47.893,52.107,62.983,37.017,28.59,288,1.000,bicubic,-35.1,-33.2,+3",
]


def timm_csv(folder: Path, name: str = "results-imagenet-r.csv", rows: list[str] = ROWS,
             header: str = HEADER) -> Path:  # fmt: skip
    path = folder / name
    path.write_text("\n".join([header, *rows]) + "\n", encoding="utf-8")
    return path


def test_a_timm_table_is_imported_as_distributed(tmp_path: Path) -> None:
    path = timm_csv(tmp_path)
    summary = import_timm_results(path, results=tmp_path / "r")
    # the registry's entries are imported; the other model is listed, not dropped silently
    assert summary.registry == {"resnet50.tv_in1k": "resnet50",
                                "convnext_tiny.fb_in1k": "convnext_tiny_in1k"}  # fmt: skip
    assert summary.not_imported == ["eva_giant_patch14_336.clip_ft_in1k"]
    assert (summary.models, summary.rows, summary.added) == (2, 4, 4)
    assert (summary.set, summary.stage, summary.setting) == (
        "imagenet-r",
        "ood",
        "shift:imagenet-r",
    )
    frame = ResultsTable.open(tmp_path / "r").read()
    rows = frame.set_index(["backbone", "metric"])
    assert rows.loc[("resnet50.tv_in1k", "top1"), "value"] == pytest.approx(0.36153)
    assert rows.loc[("convnext_tiny.fb_in1k", "top5"), "value"] == pytest.approx(0.62983)
    assert set(frame.source) == {"timm results-imagenet-r.csv"}
    assert frame.protocol.str.startswith("imported: timm's published results-imagenet-r.csv").all()
    assert "288 px, crop 1.000, bicubic, 28.59M params" in rows.loc[
        ("convnext_tiny.fb_in1k", "top1"), "protocol"]  # fmt: skip
    assert set(frame.dataset) == {"imagenet"} and set(frame.setting) == {"shift:imagenet-r"}
    assert set(assign_tasks(frame)) == {"ood"}  # ranked with the OOD generalization task
    again = import_timm_results(path, results=tmp_path / "r")
    assert (again.added, again.already_imported) == (0, 4)
    every = import_timm_results(path, results=tmp_path / "r", all_models=True)
    assert (every.added, every.not_imported) == (2, [])
    eva = ResultsTable.open(tmp_path / "r").read().set_index(["backbone", "metric"])
    assert eva.loc[("eva_giant_patch14_336.clip_ft_in1k", "top1"), "value"] == pytest.approx(0.9055)


def test_a_model_with_rows_of_its_own_is_imported_and_the_source_is_kept(tmp_path: Path) -> None:
    table = ResultsTable.open(tmp_path / "r")
    import_timm_results(timm_csv(tmp_path), results=tmp_path / "r", all_models=True,
                        source="timm v1.0.15", registry={})  # fmt: skip
    summary = import_timm_results(timm_csv(tmp_path, "results-sketch.csv"), results=table.directory,
                                  registry={})  # fmt: skip
    assert summary.models == 3 and summary.not_imported == []  # all three have rows already
    frame = table.read()
    assert set(frame[frame.setting == "shift:imagenet-r"].source) == {"timm v1.0.15"}
    assert set(frame[frame.setting == "shift:sketch"].source) == {"timm results-sketch.csv"}


@pytest.mark.parametrize(
    ("name", "stage", "dataset", "setting", "metric", "task"),
    [
        ("results-imagenet.csv", "finetune", "imagenet", "full", "top1",
         "finetune-classification"),
        ("results-imagenet-real.csv", "finetune", "imagenet-real", "full", "top1",
         "finetune-classification"),
        ("results-imagenet-r-clean.csv", "ood", "imagenet", "shift:imagenet-r", "id_top1_shared",
         "ood"),
        ("results-imagenetv2-matched-frequency.csv", "ood", "imagenet",
         "shift:imagenetv2-matched-frequency", "top1", "ood"),
    ],
)  # fmt: skip
def test_each_sibling_table_lands_in_its_task(
    tmp_path: Path, name: str, stage: str, dataset: str, setting: str, metric: str, task: str
) -> None:
    header = "model,top1,top1_err,top5,top5_err,param_count,img_size,crop_pct,interpolation"
    rows = [",".join(r.split(",")[:9]) for r in ROWS[1:]]  # the ID tables have no *_diff
    import_timm_results(timm_csv(tmp_path, name, rows, header), results=tmp_path / "r")
    frame = ResultsTable.open(tmp_path / "r").read()
    row = frame[(frame.backbone == "resnet50.tv_in1k") & (frame.metric == metric)].iloc[0]
    assert (row.stage, row.dataset, row.setting, row.split) == (stage, dataset, setting, "val")
    assert assign_tasks(frame.loc[[row.name]]).iloc[0] == task


def _unchanged(tmp_path: Path) -> None:
    assert len(ResultsTable.open(tmp_path / "r").read()) == 4


@pytest.mark.parametrize(
    ("rows", "header", "name", "message"),
    [
        (ROWS, HEADER.replace("param_count,", ""), "results-imagenet-r.csv",
         r"lacks the column\(s\) param_count\. timm's results-\*\.csv files have model, top1"),
        ([ROWS[1], ROWS[2], ROWS[1].replace("36.153", "36.2")], HEADER, "results-imagenet-r.csv",
         r"1 problem\(s\); nothing was imported\.\n  line 4: model 'resnet50\.tv_in1k' repeats "
         r"line 2\n.*one row per model"),
        ([ROWS[1].replace("36.153", "n/a"), ROWS[2].replace("47.893", "147.9")], HEADER,
         "results-imagenet-r.csv",
         r"line 2: top1 'n/a' is not a number\n  line 3: top1 147\.9 is not a percentage"),
        (ROWS, HEADER, "imagenet-r.csv", r"results-<set>\.csv.*Pass --set NAME"),
        ([], HEADER, "results-imagenet-r.csv", "has a header but no rows"),
    ],
)  # fmt: skip
def test_bad_tables_are_refused_and_change_nothing(
    tmp_path: Path, rows: list[str], header: str, name: str, message: str
) -> None:
    import_timm_results(timm_csv(tmp_path), results=tmp_path / "r")  # 4 rows already there
    (tmp_path / "bad").mkdir()
    bad = timm_csv(tmp_path / "bad", name, rows, header)
    with pytest.raises(ResultsImportError, match=message):
        import_timm_results(bad, results=tmp_path / "r", all_models=True)
    _unchanged(tmp_path)


def test_the_results_import_command_reads_timm_tables(cli, tmp_path: Path) -> None:
    path = timm_csv(tmp_path)
    args = ["results", "import", "--format", "timm", path, "--results", tmp_path / "r"]
    result = cli(*args)
    assert result.exit_code == 0, result.output
    assert "Imported 4 of 4 row(s) (2 model(s), imagenet-r as ood imagenet · shift:imagenet-r)" in (
        result.output
    )
    assert "not imported: 1 model(s) with no registry entry" in result.output
    assert "eva_giant_patch14_336.clip_ft_in1k); --all imports them" in result.output
    data = json.loads(cli(*args, "--all", "--json").stdout)
    assert data["added"] == 2 and data["registry"]["resnet50.tv_in1k"] == "resnet50"
    (tmp_path / "bad").mkdir()
    bad = timm_csv(tmp_path / "bad", "results-imagenet-r.csv", ROWS, HEADER.replace("top5,", ""))
    refused = cli("results", "import", "--format", "timm", bad, "--results", tmp_path / "r")
    assert refused.exit_code == 1 and "lacks the column(s) top5" in refused.output
    assert "Traceback" not in refused.output
    assert len(ResultsTable.open(tmp_path / "r").read()) == 6
