"""The command line: help with examples, exit codes, JSON output, errors without tracebacks."""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import pytest

import bob_cache
from tests.conftest import TINY, run_cli

COMMANDS = (
    "extract", "probe", "results", "backbones", "ls", "info", "verify", "index build",
    "index update", "index ls", "query", "serve", "retrieval-eval",
)  # fmt: skip


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(cli, command: str) -> None:
    result = cli(*command.split(), "--help")
    assert result.exit_code == 0
    assert "Example: bob-cache " + command in result.output


def test_usage_errors_exit_2(cli) -> None:
    assert cli("extract", "--data", "builtin:digits").exit_code == 2  # --backbone missing
    assert cli("no-such-command").exit_code == 2


def test_log_level_shows_the_probe_sweep_on_stderr(tmp_path: Path) -> None:
    from tests.conftest import blobs, write_feature_sets

    x, y = blobs(300, classes=3, dim=8, spread=2.0)
    splits = {"train": (x[:200], y[:200]), "val": (x[200:250], y[200:250])}
    write_feature_sets(tmp_path / "s", {**splits, "test": (x[250:], y[250:])})
    args = ["probe", "--store", tmp_path / "s", "--dataset", "toy", "--backbone", "model"]
    args += ["--method", "linear", "--results", tmp_path / "r"]
    env = {k: v for k, v in os.environ.items() if k != "BOB_CACHE_LOG_LEVEL"}
    quiet = run_cli(*args, env=env)
    loud = run_cli("--log-level", "info", *args, "--force")
    assert quiet.returncode == loud.returncode == 0, quiet.stderr + loud.stderr
    assert "linear probe fit" not in quiet.stderr
    assert "bob_cache.probes.linear INFO linear probe fit: {'stage': 'final'" in loud.stderr
    bad = run_cli("--log-level", "chatty", *args)
    assert bad.returncode == 2 and "'chatty' is not one of 'warning', 'info', 'debug'" in bad.stderr


def test_log_lines_go_through_the_console_a_live_view_draws_on(cli, monkeypatch) -> None:
    """The battle's live view redraws below what this console prints; a log line written to
    stderr behind its back would tear it."""
    import io
    import logging

    from rich.console import Console

    from bob_cache.commands import common

    console = Console(file=io.StringIO(), width=60)
    monkeypatch.setattr(common, "err", console)
    assert cli("--log-level", "info", "backbones", "--json").exit_code == 0
    logging.getLogger("bob_cache.test").info("a [red]long[/] line :cat: " + "x" * 80)
    text = console.file.getvalue()
    assert "bob_cache.test INFO a [red]long[/] line :cat: " + "x" * 80 in text  # as written


@pytest.fixture(scope="module")
def digits_store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("cli") / "store"
    result = run_cli(
        "extract",
        "--data",
        "builtin:digits",
        "--split",
        "val",
        "--limit",
        "40",
        *TINY,
        "--store",
        store,
    )
    assert result.returncode == 0, result.stderr
    return store


def test_extract_json_summary(cli, tmp_path: Path) -> None:
    result = cli(
        "extract",
        "--data",
        "builtin:digits",
        "--split",
        "test",
        "--limit",
        "12",
        *TINY,
        "--store",
        tmp_path / "s",
        "--json",
    )
    assert result.exit_code == 0
    summary = json.loads(result.stdout)
    assert summary["rows"] == summary["rows_computed"] == 12
    assert summary["invalid_rows"] == 0 and summary["images_per_second"] > 0
    (fs,) = summary["feature_sets"]
    assert fs["group"].startswith("digits/test/test_resnet.random-s0/") and fs["complete"]


def test_ls_info_verify_on_a_real_store(cli, digits_store: Path) -> None:
    listing = json.loads(cli("ls", digits_store, "--json").stdout)
    assert [(r["dataset"], r["split"], r["rows"], r["dim"], r["complete"]) for r in listing] == [
        ("digits", "val", 40, 96, True)
    ]
    key = listing[0]["key"]
    info = json.loads(cli("info", digits_store, key[:6], "--json").stdout)
    assert info["attributes"]["command"].startswith("bob-cache extract --data builtin:digits")
    assert info["attributes"]["dataset"]["class_names"] == [str(i) for i in range(10)]
    human = cli("ls", digits_store)
    assert "digits/val/test_resnet.random-s0/" + key in human.stdout
    verify = cli("verify", digits_store, "--json")
    assert verify.exit_code == 0 and json.loads(verify.stdout)[0]["ok"]


def test_verify_exits_1_on_damage_and_repair_lets_extract_recompute(cli, tmp_path: Path) -> None:
    store = tmp_path / "s"
    args = [
        "extract",
        "--data",
        "builtin:digits",
        "--split",
        "val",
        "--limit",
        "40",
        *TINY,
        "--shard-rows",
        "16",
        "--store",
        store,
    ]
    assert cli(*args).exit_code == 0
    (shard,) = store.glob("digits/val/*/*/features/c/1/0")
    shard.write_bytes(b"\x00" * 10)
    damaged = cli("verify", store)
    assert damaged.exit_code == 1 and "DAMAGED" in damaged.stdout and "shard 1" in damaged.stdout
    assert cli("verify", store, "--repair").exit_code == 1
    rerun = json.loads(cli(*args, "--json").stdout)
    assert rerun["rows_computed"] == 16 and rerun["shards_skipped"] == 2
    assert cli("verify", store).exit_code == 0


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--backbone", "resnt50"], "Did you mean 'resnet50'"),
        (["--data", "no/such/folder"], "does not exist. Expected a folder of images"),
        (
            ["--weights", "missing.pth", "--backbone", "test_resnet"],
            "does not exist or is not a file",
        ),
        (["--pool", "token"], "needs a model with a class token"),
        (["--layers", "layer9"], "Unknown layer 'layer9'"),
        (["--part", "3/2"], "is not K/N"),
        (["--compression", "brotli"], "Unknown compression"),
        (["--device", "cuda:0"], "CUDA is not available"),
    ],
)
def test_user_errors_exit_1_with_the_fix(
    cli, tmp_path: Path, args: list[str], message: str
) -> None:
    base = {"--data": "builtin:digits", "--backbone": "test_resnet", "--store": str(tmp_path / "s")}
    for flag, value in zip(args[::2], args[1::2], strict=True):
        base[flag] = value
    extra = [a for pair in base.items() for a in pair]
    if "--weights" not in args:
        extra.append("--random-init")
    result = cli("extract", *extra, "--quiet", "--limit", "4", "--image-size", "32")
    assert result.exit_code == 1, result.output
    assert message in result.output
    assert not (tmp_path / "s").exists() or not list((tmp_path / "s").rglob("features"))


def test_a_user_error_in_a_real_process_prints_no_traceback(tmp_path: Path) -> None:
    result = run_cli(
        "extract", "--data", "builtin:digits", "--backbone", "resnt50", "--store", tmp_path
    )
    assert result.returncode == 1
    assert result.stderr.startswith("Error: Unknown backbone 'resnt50'. Did you mean 'resnet50'")
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_unwritable_store_exits_1_before_any_work(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    result = run_cli("extract", "--data", "builtin:digits", *TINY, "--store", blocker / "store")
    assert result.returncode == 1
    assert "is not writable" in result.stderr and "Traceback" not in result.stderr
    assert blocker.read_text() == "not a directory"


def test_reading_a_missing_store_or_feature_set(cli, tmp_path: Path, digits_store: Path) -> None:
    missing = cli("ls", tmp_path / "nowhere")
    assert missing.exit_code == 1 and "No feature store at" in missing.output
    unknown = cli("info", digits_store, "ffffff")
    assert unknown.exit_code == 1 and "matches no feature set" in unknown.output


def test_backbones_listing(cli) -> None:
    rows = json.loads(cli("backbones", "--json").stdout)
    by_name = {r["name"]: r for r in rows}
    assert by_name["dino_vit_base"]["model"] == "vit_base_patch16_224.dino"
    assert (
        by_name["dino_vit_base"]["params"] == 85798656
        and by_name["dino_vit_base"]["feature_dim"] == 768
    )
    assert by_name["vicreg_resnet50"]["available"] is False
    assert {
        r["method"] for r in json.loads(cli("backbones", "--method", "clip", "--json").stdout)
    } == {"CLIP"}
    human = cli("backbones").stdout
    assert "not in timm" in human and "85.8M" in human


def test_data_and_weights_errors_exit_1_through_the_cli(
    cli, tmp_path: Path, image_folder: Path, mobilenet_weights: Path
) -> None:
    store = tmp_path / "s"
    empty = tmp_path / "empty"
    (empty / "cls").mkdir(parents=True)
    no_cols = tmp_path / "cols.csv"
    no_cols.write_text("file,class\na.png,cat\n")
    no_files = tmp_path / "files.csv"
    no_files.write_text("path,label\nmissing.png,cat\n")
    garbage = tmp_path / "garbage.pth"
    garbage.write_bytes(b"nope")
    cases = [
        (["--data", empty, "--random-init"], "holds no images"),
        (["--data", no_cols, "--random-init"], "lacks column(s) path, label"),
        (["--data", no_files, "--random-init"], "1 of 1 files listed"),
        (
            ["--data", image_folder, "--weights", mobilenet_weights],
            "does not fit architecture 'test_resnet'",
        ),
        (["--data", image_folder, "--weights", garbage], "Cannot read weights file"),
    ]
    for args, message in cases:
        result = cli("extract", *args, "--backbone", "test_resnet", "--store", store, "-q")
        assert result.exit_code == 1, (args, result.output)
        assert message in result.output, (args, result.output)


def test_layout_mismatch_through_the_cli_keeps_committed_data(cli, tmp_path: Path) -> None:
    args = [
        "extract",
        "--data",
        "builtin:digits",
        "--split",
        "val",
        "--limit",
        "16",
        *TINY,
        "--store",
        tmp_path / "s",
    ]
    assert cli(*args, "--shard-rows", "8").exit_code == 0
    (features,) = (tmp_path / "s").glob("digits/val/*/*/features")
    before = {p: p.read_bytes() for p in features.rglob("*") if p.is_file()}
    result = cli(*args, "--shard-rows", "16")
    assert result.exit_code == 1
    assert (
        "already exists with a different spec or layout" in result.output
        and "--overwrite" in result.output
    )
    assert {p: p.read_bytes() for p in features.rglob("*") if p.is_file()} == before


# --- missing stores, bugs, Ctrl-C, ambiguous keys -------------------------------------------

SELECT = ["--dataset", "digits", "--backbone", "test_resnet"]
READERS = {
    "ls": lambda s: ["ls", s],
    "info": lambda s: ["info", s, "abc"],
    "verify": lambda s: ["verify", s],
    "verify --repair": lambda s: ["verify", s, "--repair"],
    "index build": lambda s: ["index", "build", "--store", s, *SELECT, "--kind", "flat"],
    "index update": lambda s: ["index", "update", "--store", s, *SELECT],
    "index ls": lambda s: ["index", "ls", s],
    "query": lambda s: ["query", "--store", s, *SELECT, "--id", "val/00000"],
}


@pytest.mark.parametrize("command", READERS)
def test_a_missing_store_is_named_and_never_created(cli, tmp_path: Path, command: str) -> None:
    typo = tmp_path / "typo"
    result = cli(*READERS[command](typo))
    assert result.exit_code == 1, result.output
    assert f"No feature store at '{typo}'" in result.output and "bob-cache extract" in result.output
    assert not typo.exists()


@pytest.mark.parametrize("command", ["verify --repair", "index build"])
def test_a_directory_that_is_no_store_is_left_alone(cli, tmp_path: Path, command: str) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    result = cli(*READERS[command](folder))
    assert result.exit_code == 1, result.output
    assert "holds no Zarr v3 root group" in result.output
    assert list(folder.iterdir()) == []


@pytest.fixture
def stage_raising(monkeypatch: pytest.MonkeyPatch) -> Callable[[str, BaseException], None]:
    """Make the stage called ``name`` raise ``exc`` when a command runs it."""
    import bob_cache.pipelines as pipelines

    real = pipelines.get_stage

    def patch(name: str, exc: BaseException) -> None:
        def stage(config: object) -> None:
            raise exc

        monkeypatch.setattr(pipelines, "get_stage", lambda n: stage if n == name else real(n))

    return patch


EXTRACT = ["extract", "--data", "builtin:digits", *TINY]


def test_a_bug_exits_3_with_one_line_naming_the_crash_log(
    cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, stage_raising
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "crash"))
    (tmp_path / "crash").mkdir()
    stage_raising("extract", RuntimeError("shard table\nis inconsistent"))
    result = cli(*EXTRACT, "--store", tmp_path / "s")
    assert result.exit_code == 3
    (line,) = result.stderr.splitlines()
    (log,) = (tmp_path / "crash").glob("bob-cache-crash-*.log")
    assert line == (
        "bob-cache hit a bug: RuntimeError: shard table is inconsistent The traceback was "
        f"written to {log}; please report it."
    )
    text = log.read_text()
    assert "Traceback (most recent call last)" in text and "in stage" in text
    assert text.startswith(f"bob-cache {bob_cache.__version__}, Python ")
    assert "RuntimeError: shard table" in text
    assert result.stdout == ""


def test_a_user_error_prints_brackets_verbatim(cli, tmp_path: Path, stage_raising) -> None:
    from bob_cache.errors import StoreError

    stage_raising("extract", StoreError("Install the s3 extra: pip install 'bob-cache[s3]'."))
    result = cli(*EXTRACT, "--store", tmp_path / "s")
    assert result.exit_code == 1
    assert result.stderr == "Error: Install the s3 extra: pip install 'bob-cache[s3]'.\n"


def test_ctrl_c_during_extract_says_how_to_resume(cli, tmp_path: Path, stage_raising) -> None:
    stage_raising("extract", KeyboardInterrupt())
    result = cli(*EXTRACT, "--store", tmp_path / "s")
    assert result.exit_code == 130
    assert result.stderr == (
        "Interrupted. Committed shards are kept; rerun the same command to resume.\n"
    )


@pytest.mark.parametrize(
    ("stage", "command"),
    [
        ("probe", ["probe", "--store", "{store}", *SELECT]),
        ("index", ["index", "build", "--store", "{store}", *SELECT]),
        ("retrieval-eval", ["retrieval-eval", "--store", "{store}", *SELECT]),
    ],
)
def test_ctrl_c_elsewhere_only_says_interrupted(
    cli, digits_store: Path, stage_raising, stage: str, command: list[str]
) -> None:
    stage_raising(stage, KeyboardInterrupt())
    result = cli(*(str(digits_store) if a == "{store}" else a for a in command))
    assert result.exit_code == 130
    assert result.stderr == "Interrupted.\n"


@pytest.fixture(scope="module")
def three_split_store(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    """builtin:digits extracted for train, val and test: three sets sharing one key."""
    store = tmp_path_factory.mktemp("splits") / "store"
    done = run_cli("extract", "--data", "builtin:digits", "--limit", "8", *TINY, "--store", store)
    assert done.returncode == 0, done.stderr
    (key,) = {r["key"] for r in json.loads(run_cli("ls", store, "--json").stdout)}
    return store, key


def test_info_on_a_key_shared_by_splits_asks_for_split(cli, three_split_store) -> None:
    store, key = three_split_store
    result = cli("info", store, key[:6])
    assert result.exit_code == 1
    assert f"'{key[:6]}' matches 3 feature sets" in result.output
    assert "Pass --split NAME to pick one (test, train, val)." in result.output
    for split in ("train", "val", "test"):
        assert f"digits/{split}/test_resnet.random-s0/{key} (split {split})" in result.output
    assert "longer key" not in result.output


def test_info_split_picks_one_of_the_sets_sharing_a_key(cli, three_split_store) -> None:
    store, key = three_split_store
    result = cli("info", store, key[:6], "--split", "val", "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    assert info["group"] == f"digits/val/test_resnet.random-s0/{key}"
    assert info["attributes"]["split"] == "val"
    human = cli("info", store, key, "--split", "test")
    assert human.exit_code == 0 and f"digits/test/test_resnet.random-s0/{key}" in human.stdout


def test_info_with_a_split_the_key_lacks_lists_the_splits(cli, three_split_store) -> None:
    store, key = three_split_store
    result = cli("info", store, key[:6], "--split", "holdout")
    assert result.exit_code == 1
    assert "matches no feature set of split 'holdout'" in result.output
    assert "its splits are test, train, val. Pass one of them to --split." in result.output


def test_allow_mixed_lets_extract_resume_in_another_environment(
    cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bob_cache.pipelines import resume

    args = ["extract", "--data", "builtin:digits", "--split", "val", "--limit", "32",
            "--backbone", "test_resnet", "--random-init", "--image-size", "32", "--workers", "0",
            "--shard-rows", "16", "--quiet", "--store", tmp_path / "s"]  # fmt: skip
    assert cli(*args, "--part", "0/2").exit_code == 0
    real = resume.writer_identity
    monkeypatch.setattr(
        "bob_cache.pipelines.extract_single.writer_identity",
        lambda device: {**real(device), "timm": "0.0.1"},
    )
    refused = cli(*args)
    assert refused.exit_code == 1 and "--allow-mixed" in refused.output
    assert cli(*args, "--allow-mixed").exit_code == 0
    shown = cli("info", tmp_path / "s", "digits/val", "--json")
    assert sorted(w["timm"] for w in json.loads(shown.output)["mixed"]) == sorted(
        ["0.0.1", real("cpu")["timm"]]
    )


def test_query_without_an_index_searches_exactly_and_says_so(cli, tmp_path: Path) -> None:
    store = tmp_path / "s"
    args = ["--data", "builtin:digits", "--split", "val", "--limit", "24", *TINY]
    assert cli("extract", *args, "--store", store).exit_code == 0
    found = cli("query", "--store", store, "--dataset", "digits", "--backbone", "test_resnet",
                "--split", "val", "--id", "digits/00011", "-k", "3", "--json")  # fmt: skip
    assert found.exit_code == 0, found.output
    assert "No index is built" in found.output and "exactly" in found.output


# --- the report family: results (a group whose default shows the table), import, report ---


@pytest.mark.parametrize("command", ["results", "results import", "report"])
def test_report_family_help_has_examples(cli, command: str) -> None:
    result = cli(*command.split(), "--help")
    assert result.exit_code == 0
    assert "Example: bob-cache " + command in result.output


PAPER_CSV = """dataset,backbone,method,setting,metric,value,seed
digits,resnet50.paper,linear,full,top1,0.95,0
digits,vit.paper,linear,full,top1,0.91,0
digits,mae.paper,linear,full,top1,0.62,0
digits,resnet50.paper,knn@20,full,top1,0.80,0
digits,vit.paper,knn@20,full,top1,0.99,0
digits,mae.paper,knn@20,full,top1,0.50,0
"""


def test_results_import_round_trips_and_reimport_is_a_no_op(cli, tmp_path: Path) -> None:
    csv = tmp_path / "paper.csv"
    csv.write_text(PAPER_CSV)
    res = tmp_path / "res"
    first = cli("results", "import", csv, "--results", res, "--source", "BoB paper")
    assert first.exit_code == 0, first.output
    assert "Imported 6 of 6 row(s)" in first.output
    again = cli("results", "import", csv, "--results", res, "--source", "BoB paper")
    assert "Imported 0 of 6" in again.output and "6 row(s) were already imported" in again.output
    rows = json.loads(cli("results", res, "--long", "--json").stdout)
    assert len(rows) == 6 and {r["source"] for r in rows} == {"BoB paper"}
    assert {r["protocol"] for r in rows} == {"imported"} and rows[0]["train_rows"] is None
    pivot = cli("results", res, "--metric", "top1")  # `results DIR` is still the default
    assert pivot.exit_code == 0 and "resnet50.paper" in pivot.output and "0.9500" in pivot.output


def test_results_import_of_a_bad_csv_lists_the_problems_and_exits_1(cli, tmp_path: Path) -> None:
    csv = tmp_path / "bad.csv"
    csv.write_text("dataset,backbone,method,setting,metric,value\nd,b,linear,full,top1,x\n"
                   "d,,linear,full,top1,0.5\n")  # fmt: skip
    result = cli("results", "import", csv, "--results", tmp_path / "res", "--source", "s")
    assert result.exit_code == 1
    assert "line 2: value 'x' is not a number" in result.output
    assert "line 3: empty backbone" in result.output and "Traceback" not in result.output


def test_report_command_writes_the_report(cli, tmp_path: Path) -> None:
    csv = tmp_path / "paper.csv"
    csv.write_text(PAPER_CSV)
    res = tmp_path / "res"
    assert cli("results", "import", csv, "--results", res, "--source", "paper").exit_code == 0
    result = cli("report", res, "--out", tmp_path / "out", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["top_backbone"] == "vit.paper" and summary["tasks"] == ["linear", "knn"]
    assert Path(summary["files"]["html"]).is_file() and Path(summary["files"]["md"]).is_file()
    empty = cli("report", tmp_path / "nothing", "--out", tmp_path / "out2")
    assert empty.exit_code == 1 and "No results in" in empty.output
    assert "bob-cache probe" in empty.output


def test_report_suite_names_the_report_and_picks_its_metadata(cli, tmp_path: Path) -> None:
    csv = tmp_path / "paper.csv"
    csv.write_text(PAPER_CSV)
    res = tmp_path / "res"
    assert cli("results", "import", csv, "--results", res, "--source", "paper").exit_code == 0
    (res / "backbones-mini.json").write_text(json.dumps({"vit.paper": {"label": "ViT-B (paper)"}}))
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        "name: mini\nbackbones:\n  - name: resnet18\n    random_init: true\n"
        "datasets:\n  - name: digits\n    data: builtin:digits\ntasks:\n  - kind: linear\n"
    )
    result = cli("report", res, "--out", tmp_path / "out", "--suite", suite)
    assert result.exit_code == 0, result.output
    markdown = (tmp_path / "out" / "report.md").read_text()
    assert markdown.startswith("# bob-cache report: mini")
    assert "Top backbone: ViT-B (paper) (vit.paper)" in markdown
