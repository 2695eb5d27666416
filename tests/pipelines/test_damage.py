"""Damage is never read as data: every command that reads a damaged or missing object of a
committed shard exits 1 naming the set, the shard and `verify --repair`, and the repair
followed by the same extraction gives back the same numbers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync

from bob_cache.stores import open_store
from tests.conftest import TINY

EXTRACT = ("extract", "--data", "builtin:digits", "--limit", "40", "--shard-rows", "8", *TINY)
PROBE = ("probe", "--dataset", "digits", "--backbone", "test_resnet", "--method", "knn",
         "--k", "5", "--json")  # fmt: skip


def train_set(store: Path):
    sets = open_store(store, mode="a").feature_sets()
    return next(fs for fs in sets if fs.attrs["split"] == "train")


def flip(fs, shard: int, name: str) -> None:
    key = fs.object_keys(shard)[name]
    store, proto = fs.group.store, default_buffer_prototype()
    data = bytearray(sync(store.get(key, prototype=proto)).to_bytes())
    data[len(data) // 2] ^= 0x10
    sync(store.set(key, proto.buffer.from_bytes(bytes(data))))


@pytest.fixture
def extracted(cli, tmp_path: Path) -> Path:
    store = tmp_path / "store"
    assert cli(*EXTRACT, "--store", store).exit_code == 0
    index = ("index", "build", "--store", store, "--dataset", "digits", "--backbone",
             "test_resnet", "--kind", "flat")  # fmt: skip
    assert cli(*index).exit_code == 0
    return store


def said(result) -> str:
    return " ".join(result.output.split())


@pytest.mark.parametrize(
    ("damage", "name"), [("flip", "features"), ("flip", "labels"), ("delete", "valid")]
)
def test_probe_and_query_name_the_damaged_shard_and_the_repair_gives_the_same_numbers(
    cli, extracted: Path, tmp_path: Path, damage: str, name: str
) -> None:
    clean = cli(*PROBE, "--store", extracted, "--results", tmp_path / "r0")
    assert clean.exit_code == 0
    fs = train_set(extracted)
    row_in_shard_1 = str(fs.array("ids")[8])
    if damage == "flip":
        flip(fs, 1, name)
    else:
        sync(fs.group.store.delete(fs.object_keys(1)[name]))
    probed = cli(*PROBE, "--store", extracted, "--results", tmp_path / "r1")
    assert probed.exit_code == 1, probed.output  # not 0 with other numbers, not 3
    assert f"Shard 1 (rows 8-15) of feature set '{fs.path}'" in said(probed)
    assert f"bob-cache verify {extracted} --repair" in said(probed)
    query = cli("query", "--store", extracted, "--dataset", "digits", "--backbone",
                "test_resnet", "--id", row_in_shard_1)  # fmt: skip
    if name == "features":  # the index holds the vectors: the damaged object is not read
        assert query.exit_code == 0
    else:  # ids, labels and validity come from the set
        assert query.exit_code == 1 and "is damaged" in said(query)
    assert cli("verify", extracted).exit_code == 1
    assert cli("verify", extracted, "--repair").exit_code == 1  # damage found (and repaired)
    assert cli(*EXTRACT, "--store", extracted).exit_code == 0  # the same command recomputes it
    again = cli(*PROBE, "--store", extracted, "--results", tmp_path / "r2")
    assert again.exit_code == 0 and cli("verify", extracted).exit_code == 0
    first, second = json.loads(clean.output), json.loads(again.output)
    assert first["table"] == second["table"]


def test_a_resume_reads_a_damaged_digest_as_damage_not_as_changed_images(
    cli, extracted: Path
) -> None:
    fs = train_set(extracted)
    fs.uncommit([fs.n_shards - 1])  # an interrupted run: the rerun checks the committed rows
    flip(fs, 0, "digest")
    resumed = cli(*EXTRACT, "--store", extracted)
    assert resumed.exit_code == 1
    assert "Shard 0 (rows 0-7)" in said(resumed) and "--repair" in said(resumed)
    assert "changed" not in said(resumed) and "--overwrite" not in said(resumed)


def test_a_truncated_metadata_file_is_named_by_every_command_and_the_advice_works(
    cli, extracted: Path, tmp_path: Path
) -> None:
    import shutil

    fs = train_set(extracted)
    meta = extracted / fs.path / "labels" / "zarr.json"
    meta.write_bytes(meta.read_bytes()[:50])
    for command in (("ls", extracted), ("verify", extracted),
                    (*PROBE, "--store", extracted, "--results", tmp_path / "r")):  # fmt: skip
        done = cli(*command)
        assert done.exit_code == 1, (command, done.output)  # never 3, never a crash log
        assert f"'{extracted}/{fs.path}/labels/zarr.json' is damaged" in said(done)
    listed = cli("ls", extracted, "--json")
    assert {r["split"] for r in json.loads(listed.stdout)} == {"val", "test"}  # the rest
    shutil.rmtree(extracted / fs.path)  # the advice: delete that set, rerun its extraction
    assert cli(*EXTRACT, "--store", extracted).exit_code == 0
    assert cli(*PROBE, "--store", extracted, "--results", tmp_path / "r").exit_code == 0
