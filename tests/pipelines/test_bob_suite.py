"""suites/bob.yaml reads the study's datasets as they are distributed: with tiny copies of each
(in the exact on-disk formats) behind its variables, its dry run lists every dataset with the
splits its source gives, and nothing is converted or written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.bob_cache.test_source_imagenet import WNIDS, write_ilsvrc, write_shift
from tests.bob_cache.test_source_revisitop import write_revisitop
from tests.bob_cache.test_source_torchvision import (
    no_md5,  # noqa: F401  (tiny copies: torchvision's MD5 check patched in tests only)
    write_cifar100,
    write_fgvc_aircraft,
    write_flowers102,
)

SUITE = Path(__file__).resolve().parents[2] / "suites" / "bob.yaml"


def test_the_bob_suite_plans_every_dataset_from_its_distributed_layout(
    cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    r_classes = {WNIDS[1]: 2, WNIDS[2]: 2}  # goldfish, great white shark: in ImageNet-R and -A
    roots = {
        "IMAGENET_DIR": write_ilsvrc(tmp_path / "imagenet"),
        "IMAGENET_V2_DIR": write_shift(tmp_path / "v2", {"0": 2, "1": 1}),
        "IMAGENET_R_DIR": write_shift(tmp_path / "r", r_classes),
        "IMAGENET_A_DIR": write_shift(tmp_path / "a", {"n01498041": 2, "n01531178": 2}),
        "IMAGENET_SKETCH_DIR": write_shift(tmp_path / "sketch", {w: 1 for w in WNIDS}),
        "CIFAR100_DIR": write_cifar100(tmp_path / "cifar"),
        "FLOWERS102_DIR": write_flowers102(tmp_path / "flowers"),
        "FGVC_AIRCRAFT_DIR": write_fgvc_aircraft(tmp_path / "aircraft"),
        "ROXFORD_DIR": write_revisitop(tmp_path / "roxford"),
        "RPARIS_DIR": write_revisitop(tmp_path / "rparis", name="rparis6k"),
    }
    for name, root in roots.items():
        monkeypatch.setenv(name, str(root))
    for name in {w for w in SUITE.read_text().split("${")[1:] if w.split("}")[0].endswith("_CKPT")}:
        checkpoint = tmp_path / f"{name.split('}')[0]}.pth"
        checkpoint.write_bytes(b"checkpoint")
        monkeypatch.setenv(name.split("}")[0], str(checkpoint))
    store = tmp_path / "store"
    result = cli(
        "battle", SUITE, "--store", store, "--results", tmp_path / "res", "--dry-run", "--json"
    )
    assert result.exit_code == 0, result.output
    plan = json.loads(result.stdout)
    splits = {name: d["rows"] for name, d in plan["splits"].items()}
    assert splits["imagenet"] == {"train": 12, "val": 6}
    assert splits["imagenet-r"] == splits["imagenet-a"] == {"test": 4}
    assert splits["imagenet-v2"] == {"test": 3} and splits["imagenet-sketch"] == {"test": 3}
    assert splits["cifar100"] == {"train": 12, "test": 6}
    assert set(splits["flowers102"]) == set(splits["aircraft"]) == {"train", "val", "test"}
    assert splits["roxford5k"] == splits["rparis6k"] == {"train": 12, "query": 3}
    assert plan["splits"]["cifar100"]["rule"].startswith("as distributed (no val")
    kinds = {j["kind"] for j in plan["jobs"]}
    assert {"extract", "linear", "knn", "few-shot", "retrieval", "ood"} <= kinds
    assert not store.exists()  # a dry run writes nothing
