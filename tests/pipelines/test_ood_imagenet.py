"""ImageNet-R's 200 classes onto an ImageNet head with no class map, end to end: a tiny
ILSVRC2012 copy (devkit-labelled flat val) and a tiny ImageNet-R copy are extracted with a
random-init model, and ``bob-cache ood`` scores the shift rows of the shared classes only."""

from __future__ import annotations

import json
from pathlib import Path

from bob_cache.stores import open_store
from tests.bob_cache.test_source_imagenet import write_ilsvrc, write_shift
from tests.conftest import TINY

# Two of the tiny ImageNet's three classes are in ImageNet-R; hammerhead (n01494475) is in
# ImageNet-R but not in the tiny ImageNet, so its rows are left out.
SHIFT = {"n01443537": 2, "n01484850": 3, "n01494475": 2}


def test_imagenet_r_maps_onto_the_imagenet_head_by_wordnet_id(cli, tmp_path: Path) -> None:
    imagenet = write_ilsvrc(tmp_path / "imagenet", per_class=6)
    shift = write_shift(tmp_path / "imagenet-r", SHIFT)
    store, results = tmp_path / "store", tmp_path / "results"
    for data in (f"imagenet:{imagenet}", f"imagenet-r:{shift}"):
        done = cli("extract", "--data", data, "--store", store, *TINY)
        assert done.exit_code == 0, done.output
    sets = {(fs.attrs["dataset"]["name"], fs.attrs["split"]): fs
            for fs in open_store(store).feature_sets()}  # fmt: skip
    assert {k: fs.n_rows for k, fs in sets.items()} == {
        ("imagenet", "train"): 18, ("imagenet", "val"): 6, ("imagenet-r", "test"): 7
    }  # fmt: skip
    r_names = sets["imagenet-r", "test"].attrs["dataset"]["class_names"]
    assert len(r_names) == 200 and sets["imagenet", "val"].attrs["dataset"]["class_names"] == [
        "n01440764", "n01443537", "n01484850"
    ]  # fmt: skip
    assert sets["imagenet", "val"].attrs["dataset"]["class_descriptions"][0] == "tench, Tinca tinca"
    done = cli("ood", "--store", store, "--backbone", "test_resnet", "--id", "imagenet",
               "--shift", "imagenet-r", "--test-split", "val", "--val-split", "heldout",
               "--results", results, "--json")  # fmt: skip
    assert done.exit_code == 0, done.output
    (g,) = json.loads(done.stdout)["generalization"]
    assert g["classes_shared"] == 2  # goldfish and great white shark, matched by WordNet id
    assert g["rows"] == 5 and g["rows_left_out"] == 2  # the hammerheads are not scored
    assert 0.0 <= g["top1"] <= 1.0 and 0.0 <= g["id_top1_shared"] <= 1.0
