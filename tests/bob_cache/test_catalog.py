"""`bob-cache datasets`: every --data kind with its layout, the catalogued datasets, and the
check of a local copy against the official counts."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bob_cache.data import parse_source
from bob_cache.data.catalog import (
    DatasetInfo,
    UnknownDatasetError,
    check_counts,
    get_dataset,
    list_datasets,
    list_kinds,
)


def _digits_folder(root: Path, *, drop_test: int = 0) -> Path:
    """builtin:digits written as train/ val/ test/ class folders (``drop_test`` images fewer)."""
    source = parse_source("builtin:digits")
    for split, rows in source.splits.items():
        keep = rows[: len(rows) - drop_test] if split == "test" else rows
        for s in keep:
            out = root / split / source.class_names[s.label] / f"{s.id.split('/')[-1]}.png"
            out.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(np.asarray(source.open_image(s))).save(out)
    return root


def test_every_kind_is_described() -> None:
    kinds = {k.kind: k for k in list_kinds()}
    assert {"builtin", "folder", "manifest", "segfolder"} <= set(kinds)
    assert all(k.syntax and k.layout for k in kinds.values())


def test_check_counts_names_what_differs() -> None:
    source = parse_source("builtin:digits")
    info = get_dataset("DIGITS")  # case-insensitive
    assert check_counts(source, info).ok and not check_counts(source, info).problems()
    short = DatasetInfo(
        name="x", spec="", task="classification", counts={"train": 1078, "val": 400, "extra": 5},
        classes=11, source="somewhere", layout="",
    )  # fmt: skip
    check = check_counts(source, short)
    assert not check.ok
    assert check.problems() == [
        "split 'val' lacks 41 of 400 images",
        "split 'extra' is missing (5 images expected)",
        "split 'test' (360 images) is not an official split",
        "10 classes found, 11 expected",
    ]


def test_unknown_dataset_names_close_matches() -> None:
    with pytest.raises(UnknownDatasetError, match="Did you mean 'digits'.*bob-cache datasets"):
        get_dataset("digit")
    assert "digits" in {d.name for d in list_datasets()}


def test_cli_lists_kinds_and_datasets(cli) -> None:
    result = cli("datasets", "--json")
    assert result.exit_code == 0
    listing = json.loads(result.stdout)
    assert {"folder", "builtin"} <= {k["kind"] for k in listing["kinds"]}
    digits = next(d for d in listing["datasets"] if d["name"] == "digits")
    assert digits["counts"] == {"train": 1078, "val": 359, "test": 360}
    assert cli("datasets", "--task", "classification").exit_code == 0


def test_cli_check_passes_on_a_complete_copy(cli) -> None:
    result = cli("datasets", "check", "--data", "builtin:digits", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["ok"] is True


def test_cli_check_fails_naming_the_missing_images(cli, tmp_path: Path) -> None:
    root = _digits_folder(tmp_path / "digits", drop_test=7)
    result = cli("datasets", "check", "--data", str(root), "--dataset", "digits")
    assert result.exit_code == 1
    assert "split 'test' lacks 7 of 360 images" in result.output
    assert "Complete it from there" in result.output
    assert result.output.count("lacks") == 1  # train and val are whole


def test_cli_check_of_an_uncatalogued_source_asks_for_the_dataset(cli, image_folder) -> None:
    result = cli("datasets", "check", "--data", str(image_folder))
    assert result.exit_code == 1
    assert "has no official counts" in result.output and "--dataset NAME" in result.output


def test_a_dataset_without_official_counts_is_not_checked_silently() -> None:
    from bob_cache.errors import DataSourceError

    info = DatasetInfo(
        name="uncounted", spec="", task="classification", counts={}, classes=None,
        source="https://example.org", layout="", note="split by id hash",
    )  # fmt: skip
    with pytest.raises(DataSourceError, match=r"no official per-split counts.*train 1,078"):
        check_counts(parse_source("builtin:digits"), info)
