"""Data sources: folder layouts, manifests, the built-in digits, and their errors."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest

from bob_cache.data import ImageDataset, parse_source
from bob_cache.data.splits import SplitFractions
from bob_cache.errors import DataNotFoundError, DataSourceError, ManifestError
from tests.conftest import write_image_folder


def test_split_folders_in_imagefolder_layout(image_folder: Path) -> None:
    src = parse_source(str(image_folder))
    assert src.name == "photos"
    assert src.class_names == ["astronaut", "cat", "coffee"]
    assert {k: len(v) for k, v in src.splits.items()} == {"train": 18, "val": 18}
    first = src.splits["train"][0]
    assert (first.id, first.label) == ("train/astronaut/astronaut_00.png", 0)
    assert src.select("val").keys() == {"val"}


def test_flat_unlabelled_folder_stays_one_split_named_by_split_option(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "pets", splits=("",), per_class=2)
    unlabeled = tmp_path / "loose"
    unlabeled.mkdir()
    for i, f in enumerate(sorted(root.rglob("*.*"))):
        shutil.copy(f, unlabeled / f"{i}.png")
    src = parse_source(str(unlabeled))
    assert list(src.splits) == ["train"] and len(src.splits["train"]) == 6
    assert {s.label for s in src.splits["train"]} == {-1} and src.class_names == []
    assert src.split_rule.kind == "whole"
    assert list(parse_source(str(unlabeled), split="test", name="mine").splits) == ["test"]


def test_missing_empty_and_mixed_folders(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="does not exist. Expected a folder of images"):
        parse_source(str(tmp_path / "nope"))
    (tmp_path / "empty" / "cls").mkdir(parents=True)
    with pytest.raises(DataSourceError, match="holds no images"):
        parse_source(str(tmp_path / "empty"))
    mixed = write_image_folder(tmp_path / "mixed", splits=("train", ""), per_class=1)
    with pytest.raises(DataSourceError, match="mixes split folders"):
        parse_source(str(mixed))


def test_unknown_split_lists_the_available_ones(image_folder: Path) -> None:
    with pytest.raises(
        DataSourceError,
        match="Split 'tset' is not in dataset 'photos'. Did you mean 'test'?|Available: train, val",
    ):
        parse_source(str(image_folder)).select("tset")


def _manifest_rows(root: Path) -> list[dict[str, str]]:
    files = sorted(root.rglob("*.*"))
    return [
        {"path": f.relative_to(root).as_posix(), "label": f.parent.name, "split": f.parts[-3]}
        for f in files
    ]


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_manifests_resolve_relative_paths_and_map_labels(image_folder: Path, fmt: str) -> None:
    rows = _manifest_rows(image_folder)
    path = image_folder / f"list.{fmt}"
    if fmt == "csv":
        path.write_text(
            "path,label,split\n" + "".join(f"{r['path']},{r['label']},{r['split']}\n" for r in rows)
        )
    else:
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    src = parse_source(str(path))
    assert src.name == "list" and src.kind == "manifest"
    assert src.class_names == ["astronaut", "cat", "coffee"]
    assert {k: len(v) for k, v in src.splits.items()} == {"train": 18, "val": 18}
    folder = parse_source(str(image_folder))
    assert [s.label for s in src.splits["val"]] == [s.label for s in folder.splits["val"]]


def test_manifest_integer_and_empty_labels(image_folder: Path) -> None:
    files = sorted(image_folder.rglob("*.png"))[:3]
    path = image_folder / "ints.csv"
    path.write_text("path,label,id\n" + f"{files[0]},2,a\n{files[1]},,b\n{files[2]},0,c\n")
    src = parse_source(str(path), fractions=SplitFractions(1, 0, 0))
    assert [(s.id, s.label) for s in src.splits["train"]] == [("a", 2), ("b", -1), ("c", 0)]
    assert src.class_names == ["0", "1", "2"]


def test_manifest_errors_name_the_fix(image_folder: Path) -> None:
    bad = image_folder / "bad.csv"
    bad.write_text("file,class\nx.png,cat\n")
    with pytest.raises(ManifestError, match="lacks column\\(s\\) path, label; it has file, class"):
        parse_source(str(bad))
    missing = image_folder / "missing.csv"
    missing.write_text("path,label\nnot/here.png,cat\ntrain/cat/cat_00.png,cat\n")
    with pytest.raises(
        ManifestError, match=r"1 of 2 files .* do not exist.*resolve against the manifest's folder"
    ):
        parse_source(str(missing))
    dup = image_folder / "dup.csv"
    dup.write_text("path,label,id\ntrain/cat/cat_00.png,cat,x\ntrain/cat/cat_01.jpg,cat,x\n")
    with pytest.raises(ManifestError, match="repeats ids"):
        parse_source(str(dup))
    with pytest.raises(DataNotFoundError, match="Manifest .* does not exist"):
        parse_source(str(image_folder / "absent.jsonl"))


def test_builtin_digits_is_split_deterministically() -> None:
    a, b = parse_source("builtin:digits"), parse_source("builtin:digits")
    assert {k: len(v) for k, v in a.splits.items()} == {"train": 1078, "val": 359, "test": 360}
    assert [s.id for s in a.splits["test"]] == [s.id for s in b.splits["test"]]
    assert a.fingerprint() == b.fingerprint()
    counts = [sum(s.label == c for s in a.splits["test"]) for c in range(10)]
    assert min(counts) >= 35  # stratified: every digit is in every split
    assert a.open_image(a.splits["train"][0]).mode == "RGB"
    with pytest.raises(DataNotFoundError, match="Did you mean 'builtin:digits'"):
        parse_source("builtin:digit")


def test_fingerprint_changes_with_content(image_folder: Path) -> None:
    before = parse_source(str(image_folder)).fingerprint()
    victim = next(image_folder.rglob("*.png"))
    victim.write_bytes(victim.read_bytes() + b"\0")
    assert parse_source(str(image_folder)).fingerprint() != before


def test_dataset_records_unreadable_images_instead_of_failing(image_folder: Path) -> None:
    src = parse_source(str(image_folder))
    samples = src.splits["train"]
    Path(samples[1].location).write_bytes(b"not an image")
    good = Path(samples[2].location)
    good.write_bytes(good.read_bytes()[:200])  # truncated
    ds = ImageDataset(
        src,
        samples,
        lambda im: __import__("torchvision").transforms.functional.to_tensor(im.resize((8, 8))),
        (3, 8, 8),
    )
    x0, _, e0, d0 = ds[0]
    x1, _, e1, d1 = ds[1]
    _, _, e2, _ = ds[2]
    assert e0 == "" and x0.shape == (3, 8, 8)
    assert "UnidentifiedImageError" in e1 and float(x1.abs().sum()) == 0.0
    assert "truncated" in e2 or "OSError" in e2
    # Each row carries the BLAKE2b digest of the bytes it read, unreadable rows too.
    assert d0 == hashlib.blake2b(Path(samples[0].location).read_bytes(), digest_size=16).hexdigest()
    assert d1 == hashlib.blake2b(b"not an image", digest_size=16).hexdigest()


def test_an_invalid_images_reason_names_its_path_not_a_bytesio(image_folder: Path) -> None:
    import io

    from PIL import UnidentifiedImageError

    from bob_cache.data.images import decode_sample, open_image_file

    src = parse_source(str(image_folder))
    sample = src.splits["train"][1]
    Path(sample.location).write_bytes(b"not an image")
    image, _, reason = decode_sample(src, sample)
    assert image is None
    assert reason == (
        f"UnidentifiedImageError: cannot identify image file '{sample.location}': "
        "not in an image format PIL reads"
    )
    with pytest.raises(UnidentifiedImageError, match="bytes given without a file name") as caught:
        open_image_file(io.BytesIO(b"still not an image"))
    assert "BytesIO" not in str(caught.value)


def test_default_names_are_made_store_safe(tmp_path: Path) -> None:
    root = write_image_folder(tmp_path / "My Photos (2024)", splits=("",), per_class=1)
    assert parse_source(str(root)).name == "My-Photos-2024"
    assert parse_source(str(root), name="photos_v2").name == "photos_v2"
