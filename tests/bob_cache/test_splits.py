"""The one split rule for sources without splits: id hash, stratified, recorded."""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import numpy as np
import pytest

from bob_cache.data import parse_source
from bob_cache.data.splits import (
    DEFAULT_FRACTIONS,
    SplitFractions,
    check_fractions_apply,
    hash_split,
    parse_split_fractions,
)
from bob_cache.errors import SpecError
from tests.conftest import write_image_folder


def _expected(labels: list[int], ids: list[str], f: SplitFractions) -> dict[str, set[str]]:
    """The README's rule, written out independently: per class, rows ordered by
    blake2b('split:' + id); test takes round-half-up(f_test·n), val the next
    round-half-up(f_val·n), train the rest (at least one row)."""
    out: dict[str, set[str]] = {"train": set(), "val": set(), "test": set()}
    for c in sorted(set(labels)):
        rows = [i for i, y in zip(ids, labels, strict=True) if y == c]
        rows.sort(key=lambda i: hashlib.blake2b(f"split:{i}".encode(), digest_size=8).digest())
        n = len(rows)
        n_test = min(math.floor(f.test * n + 0.5), n - 1)
        n_val = min(math.floor(f.val * n + 0.5), n - 1 - n_test)
        out["test"] |= set(rows[:n_test])
        out["val"] |= set(rows[n_test : n_test + n_val])
        out["train"] |= set(rows[n_test + n_val :])
    return {k: v for k, v in out.items() if v}


@pytest.mark.parametrize("fractions", [DEFAULT_FRACTIONS, SplitFractions(0.7, 0.1, 0.2)])
def test_hash_split_follows_the_stated_rule_and_ignores_row_order(
    fractions: SplitFractions,
) -> None:
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 7, size=503).tolist()
    ids = [f"img/{i:04d}.jpg" for i in range(503)]
    got = {k: {ids[i] for i in v} for k, v in hash_split(labels, ids, fractions).items()}
    assert got == _expected(labels, ids, fractions)
    perm = rng.permutation(503)
    shuffled = hash_split([labels[i] for i in perm], [ids[i] for i in perm], fractions)
    assert {k: {ids[perm[i]] for i in v} for k, v in shuffled.items()} == got
    for c in set(labels):  # stratified: each class's share of test is its rounded fraction
        n = labels.count(c)
        in_test = sum(1 for i in got["test"] if labels[ids.index(i)] == c)
        assert in_test == math.floor(fractions.test * n + 0.5)


def test_small_classes_keep_a_training_row() -> None:
    parts = hash_split([0, 1, 1, 2, 2, 2], [f"{i}" for i in range(6)], DEFAULT_FRACTIONS)
    train = set(parts["train"].tolist())
    assert {0} <= train and train & {1, 2} and train & {3, 4, 5}
    assert sum(len(v) for v in parts.values()) == 6


def test_plain_class_folder_is_split_and_the_rule_recorded(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "pets", splits=("",), per_class=10)
    src = parse_source(str(root))
    assert {k: len(v) for k, v in src.splits.items()} == {"train": 18, "val": 6, "test": 6}
    for rows in src.splits.values():  # stratified: every class in every split
        assert sorted({s.label for s in rows}) == [0, 1, 2]
    rule = src.describe()["split_rule"]
    assert rule["kind"] == "id-hash" and rule["text"] == "id-hash 0.6/0.2/0.2"
    assert rule["fractions"] == {"train": 0.6, "val": 0.2, "test": 0.2}
    again = parse_source(str(root), name="other")  # the same rows, whatever the name
    assert {k: [s.id for s in v] for k, v in again.splits.items()} == {
        k: [s.id for s in v] for k, v in src.splits.items()
    }
    custom = parse_source(str(root), fractions=SplitFractions(0.8, 0, 0.2))
    assert {k: len(v) for k, v in custom.splits.items()} == {"train": 24, "test": 6}
    assert custom.fingerprint() != src.fingerprint()  # another split is another dataset


def test_manifest_without_split_column_uses_the_rule(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "pets", splits=("",), per_class=10)
    files = sorted(root.rglob("*.*"))
    manifest = tmp_path / "pets.csv"
    manifest.write_text(
        "path,label\n" + "".join(f"{f.relative_to(tmp_path)},{f.parent.name}\n" for f in files)
    )
    src = parse_source(str(manifest))
    assert src.split_rule.kind == "id-hash"
    assert {k: len(v) for k, v in src.splits.items()} == {"train": 18, "val": 6, "test": 6}
    with_column = tmp_path / "with.csv"
    with_column.write_text(
        "path,label,split\n"
        + "".join(f"{f.relative_to(tmp_path)},{f.parent.name},test\n" for f in files)
    )
    assert parse_source(str(with_column)).split_rule.kind == "distributed"
    assert list(parse_source(str(with_column)).splits) == ["test"]


def test_split_folders_and_builtins_keep_their_own_splits(image_folder: Path) -> None:
    assert parse_source(str(image_folder)).describe()["split_rule"]["kind"] == "distributed"
    digits = parse_source("builtin:digits").describe()["split_rule"]
    assert digits["kind"] == "distributed" and "seed 0" in digits["text"]


def test_fractions_are_refused_where_they_do_not_apply(image_folder: Path, tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="has splits of its own .* Drop --split-fractions"):
        check_fractions_apply(parse_source(str(image_folder)), SplitFractions(0.5, 0.25, 0.25))
    loose = tmp_path / "loose"
    loose.mkdir()
    next(image_folder.rglob("*.png")).rename(loose / "a.png")
    with pytest.raises(SpecError, match="has no labels, so it stays one split"):
        check_fractions_apply(parse_source(str(loose)), SplitFractions(0.5, 0.25, 0.25))
    check_fractions_apply(parse_source(str(image_folder)), None)  # nothing asked: fine


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("0.5,0.5", "takes three numbers"),
        ("a,b,c", "takes three numbers"),
        ("0.7,0.2,0.2", "must sum to 1"),
        ("0,0.5,0.5", "train above 0"),
        ("1.2,-0.1,-0.1", r"in \[0, 1\]"),
    ],
)
def test_bad_split_fractions_name_the_fix(text: str, message: str) -> None:
    with pytest.raises(SpecError, match=message) as info:
        parse_split_fractions(text)
    assert "--split-fractions 0.6,0.2,0.2" in str(info.value)


def test_parse_split_fractions_accepts_text_and_lists() -> None:
    assert parse_split_fractions("0.7,0.1,0.2") == SplitFractions(0.7, 0.1, 0.2)
    assert parse_split_fractions([0.8, 0.0, 0.2]) == SplitFractions(0.8, 0.0, 0.2)
    assert parse_split_fractions(None) is None
