"""Suite files: every problem listed at once, each with its key path, line and valid choices."""

from __future__ import annotations

from pathlib import Path

import pytest

from bob_cache.pipelines.battle import load_battle_suite
from bob_cache.suite import SuiteError

GOOD = """\
name: tiny
backbones:
  - name: test_resnet
    random_init: true
    image_size: 32
datasets:
  - name: digits
    data: builtin:digits
    limit: 60
tasks:
  - kind: linear
  - kind: knn
    k: [5]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "suite.yaml"
    path.write_text(text)
    return path


def test_a_good_suite_loads_with_its_task_options(tmp_path: Path) -> None:
    suite = load_battle_suite(write(tmp_path, GOOD))
    assert suite.name == "tiny" and [b.name for b in suite.backbones] == ["test_resnet"]
    assert suite.task_options[1].k == (5,)
    assert suite.datasets_of(suite.tasks[0])[0].data == "builtin:digits"


def test_every_problem_is_listed_at_once_with_its_line(tmp_path: Path) -> None:
    bad = """\
name: broken
backbones:
  - name: resnt18
    random_init: true
  - name: test_resnet
    colour: red
datasets:
  - name: digits
    data: ./no-such-folder
tasks:
  - kind: lineer
  - kind: knn
    k: [5]
    temprature: 0.1
  - kind: linear
    datasets: [digitz]
"""
    with pytest.raises(SuiteError) as info:
        load_battle_suite(write(tmp_path, bad))
    text = str(info.value)
    assert "has 6 problem(s); nothing was run" in text
    assert "backbones.1.colour (line 6): unknown key" in text and "Valid keys: name" in text
    assert "backbones.0.name (line 3): Unknown backbone 'resnt18'. Did you mean" in text
    assert "datasets.0.data (line 9)" in text and "does not exist" in text
    assert "tasks.0.kind (line 11): unknown task kind 'lineer'. Did you mean 'linear'?" in text
    assert "Valid kinds: dense, few-shot, finetune, knn, linear, ood, retrieval" in text
    assert "tasks.1.temprature (line 14)" in text and "Did you mean 'temperature'?" in text
    assert "tasks.2.datasets.0 (line 16): unknown dataset 'digitz'" in text


def test_environment_variables_and_relative_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "imgs").mkdir()
    text = GOOD.replace("builtin:digits", "${DATA_DIR}").replace("    limit: 60\n", "")
    monkeypatch.delenv("DATA_DIR", raising=False)
    unset = r"datasets.0.data \(line 8\): environment variable \$\{DATA_DIR\} is not set"
    with pytest.raises(SuiteError, match=unset):
        load_battle_suite(write(tmp_path, text))
    monkeypatch.setenv("DATA_DIR", "imgs")
    suite = load_battle_suite(write(tmp_path, text))
    assert suite.datasets[0].data == str((tmp_path / "imgs").resolve())


def test_a_prefixed_source_resolves_its_path_part(tmp_path: Path) -> None:
    """`torchvision:NAME:ROOT` and the like keep their prefix; only ROOT resolves against the
    suite's folder, and a missing ROOT is named; shard patterns are left to the source."""
    (tmp_path / "cifar").mkdir()
    text = GOOD.replace("builtin:digits", "torchvision:CIFAR100:cifar")
    suite = load_battle_suite(write(tmp_path, text))
    assert suite.datasets[0].data == f"torchvision:CIFAR100:{(tmp_path / 'cifar').resolve()}"
    missing = GOOD.replace("builtin:digits", "imagenet-r:nowhere")
    with pytest.raises(SuiteError, match=r"the folder '.*nowhere' of data source 'imagenet-r:"):
        load_battle_suite(write(tmp_path, missing))
    shards = load_battle_suite(write(tmp_path, GOOD.replace("builtin:digits", "s/{0..3}.tar")))
    assert shards.datasets[0].data == str(tmp_path.resolve() / "s" / "{0..3}.tar")


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is empty"),
        ("name: [unclosed\n", "is not valid YAML"),
        ("name: x\n", r"backbones \(line 1\): required key is missing"),
    ],
)
def test_unusable_files_say_why(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(SuiteError, match=message):
        load_battle_suite(write(tmp_path, text))


def test_a_missing_suite_file_names_the_example(tmp_path: Path) -> None:
    with pytest.raises(SuiteError, match=r"does not exist.*suites/demo.yaml"):
        load_battle_suite(tmp_path / "nope.yaml")


def test_the_shipped_suites_load(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    weights = tmp_path / "w.pth"
    weights.write_bytes(b"x")
    monkeypatch.setenv("BOB_CACHE_MOBILENET_WEIGHTS", str(weights))
    monkeypatch.setenv("BOB_CACHE_DEMO_SHIFT", str(tmp_path))
    root = Path(__file__).resolve().parents[2] / "suites"
    demo = load_battle_suite(root / "demo.yaml")
    assert len(demo.backbones) == 3 and {t.kind for t in demo.tasks} >= {"linear", "retrieval"}
    assert {t.kind for t in demo.tasks} >= {"ood"} and demo.datasets[0].shift == ("digits-noise",)


def test_the_bob_suite_loads_once_its_locations_are_set(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    import re

    root = Path(__file__).resolve().parents[2] / "suites" / "bob.yaml"
    for name in sorted(set(re.findall(r"\$\{(\w+)\}", root.read_text()))):
        target = tmp_path / name
        if name.endswith("_CKPT"):
            target.write_bytes(b"checkpoint")
        else:
            target.mkdir()
        monkeypatch.setenv(name, str(target))
    suite = load_battle_suite(root)
    assert len(suite.backbones) >= 30 and len(suite.datasets) == 10
    assert {t.kind for t in suite.tasks} == {"linear", "knn", "few-shot", "retrieval", "ood"}
    data = {d.name: d.data for d in suite.datasets}
    assert data["cifar100"] == f"torchvision:CIFAR100:{tmp_path / 'CIFAR100_DIR'}"
    assert data["imagenet-r"] == f"imagenet-r:{tmp_path / 'IMAGENET_R_DIR'}"
    assert data["roxford5k"].startswith("revisitop:roxford5k:")
    imagenet = next(d for d in suite.datasets if d.name == "imagenet")
    assert imagenet.shift == ("imagenet-v2", "imagenet-r", "imagenet-a", "imagenet-sketch")


def test_a_backbones_metadata_is_never_resolved_as_a_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only path fields resolve against the suite's folder: a dataset's data, a backbone's
    weights; a backbone's data, method, family and params stay as written."""
    (tmp_path / "imgs").mkdir()
    (tmp_path / "w.pth").write_bytes(b"x")
    text = (
        GOOD.replace("builtin:digits", "imgs")
        .replace("    limit: 60\n", "")
        .replace(
            "  - name: test_resnet\n    random_init: true\n",
            "  - name: test_resnet\n    weights: w.pth\n    data: ImageNet-1k\n"
            "    method: supervised\n"
            "    family: ResNet\n    params: 1000\n"
            "  - name: test_vit\n    random_init: true\n    data: none\n",
        )
    )
    suite = load_battle_suite(write(tmp_path, text))
    pretrained, random = suite.backbones
    assert pretrained.data == "ImageNet-1k" and pretrained.method == "supervised"
    assert pretrained.family == "ResNet" and pretrained.params == 1000
    assert pretrained.weights == str((tmp_path / "w.pth").resolve())  # a path: resolved
    assert random.data == "none"
    assert suite.datasets[0].data == str((tmp_path / "imgs").resolve())


def test_a_random_init_backbone_with_pretraining_data_is_refused(tmp_path: Path) -> None:
    text = GOOD.replace("    random_init: true\n", "    random_init: true\n    data: ImageNet-1k\n")
    with pytest.raises(SuiteError, match=r"backbones.0 \(line 3\): a random_init backbone saw "
                       r"no pretraining data.*drop `data` or write `data: none`"):  # fmt: skip
        load_battle_suite(write(tmp_path, text))
