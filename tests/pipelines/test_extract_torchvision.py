"""Extraction end to end from ``torchvision:NAME:ROOT`` sources (tiny CIFAR-100 and
Flowers-102 copies in their distributed formats): ids, labels, class names, splits and content
digests in the store, and a rerun that has nothing to do."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from bob_cache.data import parse_source
from bob_cache.stores import open_store
from tests.bob_cache.test_source_torchvision import (
    CIFAR_CLASSES,
    no_md5,  # noqa: F401  (autouse fixture: tiny copies have other MD5 sums)
    write_cifar100,
    write_flowers102,
)
from tests.pipelines.test_extract import run


def _stored(store: Path) -> dict[str, dict]:
    out = {}
    for fs in open_store(store).feature_sets():
        out[fs.attrs["split"]] = {
            "ids": fs.array("ids")[:].tolist(),
            "labels": fs.array("labels")[:].tolist(),
            "digest": fs.array("digest")[:].tolist(),
            "valid": fs.array("valid")[:].tolist(),
            "dataset": fs.attrs["dataset"],
            "complete": fs.complete,
        }
    return out


@pytest.mark.parametrize(
    ("name", "write", "sizes"),
    [
        ("CIFAR100", write_cifar100, {"train": 12, "test": 6}),
        ("Flowers102", write_flowers102, {"train": 3, "val": 3, "test": 5}),
    ],
)
def test_extract_stores_the_official_splits_and_resumes(
    name: str, write, sizes: dict[str, int], tmp_path: Path
) -> None:
    spec = f"torchvision:{name}:{write(tmp_path / 'root')}"
    source = parse_source(spec)
    summary = run(spec, tmp_path / "s")
    assert summary.rows_computed == sum(sizes.values())
    stored = _stored(tmp_path / "s")
    assert {split: len(v["ids"]) for split, v in stored.items()} == sizes
    for split, rows in source.splits.items():
        got = stored[split]
        assert got["complete"] and all(got["valid"])
        assert got["ids"] == [s.id for s in rows]
        assert got["labels"] == [s.label for s in rows]
        assert got["digest"] == [source.digest(s) for s in rows]
        assert got["dataset"]["class_names"] == source.class_names
        assert got["dataset"]["catalog"] == source.catalog
        assert got["dataset"]["origin"] == spec
    again = run(spec, tmp_path / "s")
    assert again.rows_computed == 0 and again.shards_skipped == summary.shards_computed


def test_cifar100_store_carries_its_class_names_and_array_ids(tmp_path: Path) -> None:
    spec = f"torchvision:CIFAR100:{write_cifar100(tmp_path / 'root')}"
    run(spec, tmp_path / "s", split="test")
    stored = _stored(tmp_path / "s")
    assert list(stored) == ["test"]
    assert stored["test"]["dataset"]["class_names"] == CIFAR_CLASSES
    assert stored["test"]["ids"][:2] == ["test/00000", "test/00001"]
    assert stored["test"]["labels"] == (np.arange(6) % 5).tolist()
    assert stored["test"]["dataset"]["split_rule"]["kind"] == "distributed"
