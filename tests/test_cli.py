"""The command line: help with examples, exit codes, JSON output, errors without tracebacks."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conftest import TINY, run_cli

COMMANDS = ("extract", "backbones", "ls", "info", "verify")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(cli, command: str) -> None:
    result = cli(command, "--help")
    assert result.exit_code == 0
    assert "Example: bob-cache " + command in result.output


def test_usage_errors_exit_2(cli) -> None:
    assert cli("extract", "--data", "builtin:digits").exit_code == 2  # --backbone missing
    assert cli("no-such-command").exit_code == 2


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
