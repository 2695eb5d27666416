"""A plain class folder (no train/ val/ test/) works end to end with no options: one split
by id hash, the same for every backbone, recorded in the provenance and in every row."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from bob_cache.data import parse_source
from bob_cache.stores import open_store
from bob_cache.stores.results import ResultsTable
from tests.conftest import TINY, write_image_folder

RULE = "id-hash 0.6/0.2/0.2"


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three classes of ten real photographs' crops, in class folders only."""
    return write_image_folder(tmp_path_factory.mktemp("plain") / "photos", splits=("",),
                              per_class=10)  # fmt: skip


def _strict(constant: str) -> None:
    raise AssertionError(f"{constant} is not JSON")


def _sets(store: Path) -> dict[str, object]:
    return {fs.attrs["split"]: fs for fs in open_store(store).feature_sets()}


def test_extract_and_probe_a_plain_class_folder_with_no_options(
    cli, photos: Path, tmp_path: Path
) -> None:
    store, results = tmp_path / "store", tmp_path / "results"
    done = cli("extract", "--data", photos, "--store", store, *TINY)
    assert done.exit_code == 0, done.output
    sets = _sets(store)
    assert {s: fs.n_rows for s, fs in sets.items()} == {"train": 18, "val": 6, "test": 6}
    assert len({fs.key for fs in sets.values()}) == 1  # one extraction, three splits
    rule = sets["test"].attrs["dataset"]["split_rule"]
    assert rule["text"] == RULE and rule["fractions"]["test"] == 0.2
    listed = parse_source(str(photos)).splits  # the same rows, listed again independently
    for split, fs in sets.items():
        assert [str(i) for i in fs.array("ids")[:]] == [s.id for s in listed[split]]
    probed = cli("probe", "--dataset", "photos", "--backbone", "test_resnet", "--store", store,
                 "--results", results, "--method", "linear,knn", "--k", "3", "--json")  # fmt: skip
    assert probed.exit_code == 0, probed.output
    summary = json.loads(probed.output, parse_constant=_strict)  # strict JSON: no NaN
    assert {r["method"] for r in summary["table"]} == {"linear", "knn@3"}
    frame = ResultsTable.open(results).read()
    assert set(frame["split_rule"]) == {RULE} and set(frame["split"]) == {"test"}
    full = frame[(frame.method == "linear") & (frame.metric == "top1")].iloc[0]
    assert (full.train_rows, full.val_rows) == (18, 6)  # C on val, refit on train + val


def test_the_missing_split_message_names_a_command_that_works(
    cli, photos: Path, tmp_path: Path
) -> None:
    store, results = tmp_path / "store", tmp_path / "results"
    assert cli("extract", "--data", photos, "--store", store, "--split", "train",
               *TINY).exit_code == 0  # fmt: skip
    probe = ("probe", "--dataset", "photos", "--backbone", "test_resnet", "--store", store,
             "--results", results, "--method", "knn", "--k", "3")  # fmt: skip
    failed = cli(*probe)
    assert failed.exit_code == 1
    text = " ".join(failed.output.split())
    commands = re.findall(r"`(bob-cache extract [^`]*)`", text)
    assert len(commands) == 1 and commands[0].endswith("--split test")  # val is optional
    assert cli(*shlex.split(commands[0])[1:]).exit_code == 0  # the advice, as printed
    assert set(_sets(store)) == {"train", "test"}
    assert cli(*probe).exit_code == 0


def test_split_fractions_change_the_split_and_are_refused_where_splits_exist(
    cli, photos: Path, image_folder: Path, tmp_path: Path
) -> None:
    store = tmp_path / "store"
    done = cli("extract", "--data", photos, "--store", store, "--split-fractions", "0.8,0,0.2",
               "--json", *TINY)  # fmt: skip
    assert done.exit_code == 0, done.output
    assert {s: fs.n_rows for s, fs in _sets(store).items()} == {"train": 24, "test": 6}
    refused = cli("extract", "--data", image_folder, "--store", store, "--split-fractions",
                  "0.8,0,0.2", *TINY)  # fmt: skip
    assert refused.exit_code == 1
    assert "has splits of its own (train, val). Drop --split-fractions" in " ".join(
        refused.output.split()
    )
    bad = cli("extract", "--data", photos, "--store", store, "--split-fractions", "0.8,0.3",
              *TINY)  # fmt: skip
    assert bad.exit_code == 1 and "three numbers for train,val,test" in bad.output
    assert json.loads(done.output)["rows"] == 30


def test_an_invalid_image_is_named_by_its_id_once(cli, photos: Path, tmp_path: Path) -> None:
    files = sorted(photos.rglob("*.*"))[:6]
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff not a JPEG")
    manifest = tmp_path / "abs.csv"  # absolute paths: the id is the whole path
    manifest.write_text("path,label\n" + "".join(f"{f},{f.parent.name}\n" for f in files)
                        + f"{broken},cat\n")  # fmt: skip
    done = cli("extract", "--data", manifest, "--store", tmp_path / "store", *TINY)
    assert done.exit_code == 0, done.output
    line = next(x for x in done.output.splitlines() if "invalid (" in x)
    assert re.match(rf"  invalid \((train|val|test)\): {re.escape(str(broken))}: ", line)
    assert "//" not in line and "BytesIO" not in line


BATTLE = """\
name: plain
backbones:
  - name: test_resnet
    label: r0
    random_init: true
    image_size: 64
datasets:
  - name: photos
    data: {photos}
    shift: [photos-noise]
    detect: [photos-noise]
  - name: photos-noise
    data: {shifted}
    evaluate: false
  - name: shapes
    kind: segmentation
    data: {shapes}
tasks:
  - kind: linear
  - kind: knn
    k: [3]
  - kind: few-shot
    shots: [2]
    seeds: [0]
  - kind: retrieval
  - kind: ood
    detectors: [msp, knn]
  - kind: finetune
    task: classification
    lr: [0.001]
    epochs: 1
    batch_size: 8
    image_size: 64
  - kind: dense
    epochs: 1
    lrs: [0.01]
  - kind: finetune
    task: semantic
    lr: [0.001]
    epochs: 1
    batch_size: 4
    image_size: 64
options:
  workers: 0
  shard_rows: 8
  runs: {runs}
"""


def test_the_whole_battle_runs_on_folders_without_splits(photos: Path, tmp_path: Path) -> None:
    """Every task kind succeeds on a plain class folder (and a segmentation folder without
    split folders) with no split options, all on the same id-hash split."""
    from bob_cache.data.synth_shapes import write_synth_shapes
    from bob_cache.pipelines.battle import BattleConfig, battle, load_battle_suite
    from bob_cache.pipelines.battle.plan import plan_battle
    from bob_cache.pipelines.shift import ShiftConfig, shift

    noise = ShiftConfig(data=str(photos), out=str(tmp_path / "shifted"),
                        corruptions=("gaussian_noise",), severities=(3,), quiet=True)  # fmt: skip
    shifted = shift(noise)
    write_synth_shapes(tmp_path / "synth", n=20, image_size=64, val_fraction=0.1)
    suite = tmp_path / "suite.yaml"
    suite.write_text(BATTLE.format(photos=photos, shifted=shifted.outputs[0]["data"],
                                   shapes=tmp_path / "synth" / "train",
                                   runs=tmp_path / "runs"))  # fmt: skip
    store, results = str(tmp_path / "store"), str(tmp_path / "results")
    plan = plan_battle(load_battle_suite(suite), store=store, results=results)
    assert plan.splits["photos"] == {"rule": RULE, "rows": {"train": 18, "val": 6, "test": 6}}
    assert plan.splits["shapes"]["rule"] == RULE
    summary = battle(BattleConfig(suite=str(suite), store=store, results=results, threads=1))
    assert not summary.failed, summary.failed
    kinds = {o["job"].split("#")[0].split("/")[0] for o in summary.outcomes}
    assert kinds == {"extract", "linear", "knn", "few-shot", "retrieval", "ood", "finetune",
                     "dense"}  # fmt: skip
    frame = ResultsTable.open(results).read()
    photos_rows = frame[frame.dataset == "photos"]
    assert set(photos_rows.stage) == {"probe", "retrieval", "ood", "finetune"}
    assert set(photos_rows.split_rule) == {RULE}
    assert set(frame[frame.dataset == "shapes"].split_rule) == {RULE}
    knn = photos_rows[(photos_rows.stage == "ood") & (photos_rows.method == "knn")]
    assert set(knn.protocol.str.split("; ").str[-1]) == {"k=18 (every ID train row, default 50)"}
    tuned = photos_rows[(photos_rows.stage == "finetune") & (photos_rows.metric == "top1")]
    assert set(tuned.train_rows) == {18} and set(tuned.val_rows) == {6}  # the probes' split
    assert battle(BattleConfig(suite=str(suite), store=store, results=results)).outcomes == []


def test_the_dry_run_shows_each_split_and_its_rule(cli, photos: Path, tmp_path: Path) -> None:
    suite = tmp_path / "suite.yaml"
    suite.write_text(
        "name: dry\nbackbones:\n  - name: test_resnet\n    random_init: true\n"
        f"datasets:\n  - name: photos\n    data: {photos}\n    split_fractions: [0.5, 0.2, 0.3]\n"
        "tasks:\n  - kind: linear\n"
    )
    done = cli("battle", suite, "--store", tmp_path / "s", "--results", tmp_path / "r",
               "--dry-run")  # fmt: skip
    assert done.exit_code == 0, done.output
    assert "photos: train 15, val 6, test 9 (id-hash 0.5/0.2/0.3)" in done.output
    assert not (tmp_path / "s").exists()
    bad = suite.read_text().replace("[0.5, 0.2, 0.3]", "[0.5, 0.2, 0.2]")
    suite.write_text(bad)
    refused = cli("battle", suite, "--dry-run")
    assert refused.exit_code == 1 and "split_fractions" in refused.output
    assert "e.g. [0.6, 0.2, 0.2]" in " ".join(refused.output.split())
