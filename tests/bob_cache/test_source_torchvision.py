"""``torchvision:NAME:ROOT`` sources: tiny copies written in each dataset's on-disk format as
distributed, read by bob-cache and by torchvision itself, which must agree on rows, labels,
class names, splits, ids and pixels."""

from __future__ import annotations

import json
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torchvision.datasets as tvd
from PIL import Image

from bob_cache.data.catalog import get_dataset
from bob_cache.data.splits import SplitFractions, check_fractions_apply
from bob_cache.data.torchvision_source import ADAPTERS, load_torchvision
from bob_cache.errors import DataNotFoundError, DataSourceError, SpecError

CIFAR_CLASSES = [f"fine{i}" for i in range(5)]


@pytest.fixture(autouse=True)
def no_md5(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tiny copies have other MD5 sums than the official files: torchvision's check is
    patched here (existence only), never in the product."""

    def exists(path: str, md5: str | None = None) -> bool:
        return os.path.isfile(path)

    for module in ("cifar", "flowers102", "mnist", "svhn", "stl10"):
        monkeypatch.setattr(f"torchvision.datasets.{module}.check_integrity", exists)


def _jpeg(path: Path, seed: int, size: tuple[int, int] = (12, 10)) -> None:
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)


def write_cifar100(root: Path, *, train: int = 12, test: int = 6, seed: int = 0) -> Path:
    """CIFAR-100's python pickles: ``train``/``test`` dicts of 3072-byte rows (R, G, B planes)
    with fine and coarse labels, and ``meta`` with the label names."""
    rng = np.random.default_rng(seed)
    folder = root / "cifar-100-python"
    folder.mkdir(parents=True, exist_ok=True)
    for name, n in (("train", train), ("test", test)):
        entry = {
            "filenames": [f"img_{name}_{i}.png" for i in range(n)],
            "batch_label": f"{name} batch",
            "fine_labels": [int(i % len(CIFAR_CLASSES)) for i in range(n)],
            "coarse_labels": [0] * n,
            "data": rng.integers(0, 255, (n, 3072), dtype=np.uint8),
        }
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
    meta = {"fine_label_names": CIFAR_CLASSES, "coarse_label_names": ["all"]}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return root


def write_flowers102(root: Path) -> Path:
    """Flowers-102: ``jpg/image_NNNNN.jpg``, ``imagelabels.mat`` (1-based labels) and
    ``setid.mat`` (1-based image numbers of trnid / valid / tstid)."""
    from scipy.io import savemat

    folder = root / "flowers-102"
    labels = np.array([1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2], dtype=np.uint8)
    for i in range(1, len(labels) + 1):
        _jpeg(folder / "jpg" / f"image_{i:05d}.jpg", i)
    savemat(folder / "imagelabels.mat", {"labels": labels[None, :]})
    ids = {"trnid": [5, 1, 2], "valid": [3, 4, 6], "tstid": [11, 7, 8, 9, 10]}
    savemat(folder / "setid.mat", {k: np.array([v], dtype=np.uint16) for k, v in ids.items()})
    return root


def write_fgvc_aircraft(root: Path) -> Path:
    """FGVC-Aircraft 2013b: ``data/images/ID.jpg``, ``variants.txt`` and one
    ``images_variant_SPLIT.txt`` per split ("ID variant name", names with spaces)."""
    data = root / "fgvc-aircraft-2013b" / "data"
    variants = ["707-320", "A300B4", "Boeing 717"]
    data.mkdir(parents=True)
    (data / "variants.txt").write_text("".join(v + "\n" for v in variants))
    rows = {"train": [("1025794", 0), ("0034309", 2)], "val": [("2234567", 1)],
            "test": [("1111111", 2), ("0000042", 1)]}  # fmt: skip
    for split, entries in rows.items():
        lines = [f"{image} {variants[label]}\n" for image, label in entries]
        (data / f"images_variant_{split}.txt").write_text("".join(lines))
        for image, _ in entries:
            _jpeg(data / "images" / f"{image}.jpg", int(image))
    return root


def write_dtd(root: Path) -> Path:
    """DTD r1.0.1: ``dtd/dtd/images/CLASS/NAME.jpg`` and ``labels/{train,val,test}1.txt``
    listing ``CLASS/NAME.jpg``."""
    data = root / "dtd" / "dtd"
    lists = {"train": ["banded/banded_0002.jpg", "zigzagged/zigzagged_0010.jpg"],
             "val": ["banded/banded_0004.jpg", "zigzagged/zigzagged_0011.jpg"],
             "test": ["zigzagged/zigzagged_0012.jpg", "banded/banded_0005.jpg"]}  # fmt: skip
    (data / "labels").mkdir(parents=True)
    for split, names in lists.items():
        (data / "labels" / f"{split}1.txt").write_text("".join(n + "\n" for n in names))
        for i, name in enumerate(names):
            _jpeg(data / "images" / name, len(split) * 10 + i)
    return root


def write_mnist(root: Path, *, train: int = 6, test: int = 3) -> Path:
    """MNIST's raw idx files (big-endian magic, sizes, then uint8 pixels / labels)."""
    rng = np.random.default_rng(1)
    raw = root / "MNIST" / "raw"
    raw.mkdir(parents=True)
    for prefix, n in (("train", train), ("t10k", test)):
        pixels = rng.integers(0, 255, (n, 28, 28), dtype=np.uint8)
        (raw / f"{prefix}-images-idx3-ubyte").write_bytes(
            struct.pack(">IIII", 2051, n, 28, 28) + pixels.tobytes()
        )
        labels = (np.arange(n) % 10).astype(np.uint8)
        (raw / f"{prefix}-labels-idx1-ubyte").write_bytes(
            struct.pack(">II", 2049, n) + labels.tobytes()
        )
    return root


def write_food101(root: Path) -> Path:
    """Food-101: ``images/CLASS/ID.jpg`` and ``meta/{train,test}.json`` ({class: [CLASS/ID]})."""
    base = root / "food-101"
    lists = {"train": {"apple_pie": ["apple_pie/101", "apple_pie/7"], "ramen": ["ramen/3"]},
             "test": {"apple_pie": ["apple_pie/55"], "ramen": ["ramen/9", "ramen/1"]}}  # fmt: skip
    (base / "meta").mkdir(parents=True)
    for split, meta in lists.items():
        (base / "meta" / f"{split}.json").write_text(json.dumps(meta))
        for i, rel in enumerate(r for v in meta.values() for r in v):
            _jpeg(base / "images" / f"{rel}.jpg", 100 + i)
    return root


def write_caltech101(root: Path) -> Path:
    """Caltech-101: ``caltech101/101_ObjectCategories/CLASS/image_NNNN.jpg`` (with the
    BACKGROUND_Google folder torchvision leaves out)."""
    folder = root / "caltech101" / "101_ObjectCategories"
    for c, cls in enumerate(("BACKGROUND_Google", "accordion", "airplanes")):
        for i in range(1, 6):
            _jpeg(folder / cls / f"image_{i:04d}.jpg", c * 10 + i)
    return root


def _agrees_with_torchvision(source, dataset_cls, split_args, root: Path, **kwargs) -> None:
    """Rows, labels, class names and pixels of every split equal torchvision's reading."""
    assert list(source.splits) == list(split_args)
    for split, arguments in split_args.items():
        theirs = dataset_cls(str(root), download=False, **kwargs, **arguments)
        ours = source.splits[split]
        assert len(ours) == len(theirs)
        if hasattr(theirs, "classes"):  # SVHN has none: its digits are named by bob-cache
            assert source.class_names == [str(c) for c in theirs.classes]
        for index, sample in enumerate(ours):
            image, label = theirs[index]
            assert sample.label == label
            expected = np.asarray(image.convert("RGB"))
            np.testing.assert_array_equal(np.asarray(source.open_image(sample)), expected)


def test_cifar100_pickles_read_as_torchvision_does(tmp_path: Path) -> None:
    root = write_cifar100(tmp_path / "c")
    source = load_torchvision(f"torchvision:CIFAR100:{root}")
    split_args = {"train": {"train": True}, "test": {"train": False}}
    _agrees_with_torchvision(source, tvd.CIFAR100, split_args, root)
    assert source.class_names == CIFAR_CLASSES
    assert [s.id for s in source.splits["test"]][:3] == ["test/00000", "test/00001", "test/00002"]
    assert source.origin == f"torchvision:CIFAR100:{root}" and source.catalog == "cifar100"
    assert source.split_rule.kind == "distributed" and "val" not in source.splits
    # pixels come from the array (no file, no JPEG round trip); the digest is of its bytes
    sample = source.splits["train"][3]
    assert source.read_bytes(sample) is None
    image, digest = source.load(sample)
    assert digest == source.digest(sample) and image.size == (32, 32)
    assert source.digest(source.splits["train"][4]) != digest


def test_flowers102_mat_files_give_the_official_splits(tmp_path: Path) -> None:
    root = write_flowers102(tmp_path / "f")
    source = load_torchvision(f"torchvision:Flowers102:{root}")
    split_args = {s: {"split": s} for s in ("train", "val", "test")}
    _agrees_with_torchvision(source, tvd.Flowers102, split_args, root)
    assert [s.id for s in source.splits["train"]] == [
        f"flowers-102/jpg/image_{i:05d}.jpg" for i in (5, 1, 2)
    ]
    assert [s.label for s in source.splits["test"]] == [1, 0, 1, 2, 0]  # 1-based on disk
    assert source.class_names[:2] == ["pink primrose", "hard-leaved pocket orchid"]
    sample = source.splits["val"][0]
    assert source.read_bytes(sample) == (root / sample.id).read_bytes()


def test_fgvc_aircraft_text_lists_give_variants(tmp_path: Path) -> None:
    root = write_fgvc_aircraft(tmp_path / "a")
    source = load_torchvision(f"torchvision:FGVCAircraft:{root}")
    split_args = {s: {"split": s} for s in ("train", "val", "test")}
    _agrees_with_torchvision(source, tvd.FGVCAircraft, split_args, root, annotation_level="variant")
    assert source.class_names == ["707-320", "A300B4", "Boeing 717"]
    assert [(s.id, s.label) for s in source.splits["train"]] == [
        ("fgvc-aircraft-2013b/data/images/1025794.jpg", 0),
        ("fgvc-aircraft-2013b/data/images/0034309.jpg", 2),
    ]


def test_dtd_partition_lists(tmp_path: Path) -> None:
    root = write_dtd(tmp_path / "d")
    source = load_torchvision(f"torchvision:DTD:{root}")
    split_args = {s: {"split": s} for s in ("train", "val", "test")}
    _agrees_with_torchvision(source, tvd.DTD, split_args, root, partition=1)
    assert source.class_names == ["banded", "zigzagged"]
    assert source.splits["test"][0].id == "dtd/dtd/images/zigzagged/zigzagged_0012.jpg"


def test_mnist_idx_files_decode_grey_levels_to_rgb(tmp_path: Path) -> None:
    root = write_mnist(tmp_path / "m")
    source = load_torchvision(f"torchvision:MNIST:{root}")
    _agrees_with_torchvision(source, tvd.MNIST, {"train": {"train": True},
                                                 "test": {"train": False}}, root)  # fmt: skip
    assert source.class_names[0] == "0 - zero"
    assert [s.id for s in source.splits["test"]] == ["test/00000", "test/00001", "test/00002"]


def test_food101_json_lists_keep_train_and_test(tmp_path: Path) -> None:
    root = write_food101(tmp_path / "food")
    source = load_torchvision(f"torchvision:Food101:{root}")
    split_args = {"train": {"split": "train"}, "test": {"split": "test"}}
    _agrees_with_torchvision(source, tvd.Food101, split_args, root)
    assert source.splits["test"][1].id == "food-101/images/ramen/9.jpg"
    assert "no val" in source.split_rule.text
    assert "hold out" in get_dataset("food101").note


def test_caltech101_has_no_split_so_the_id_hash_rule_makes_them(tmp_path: Path) -> None:
    root = write_caltech101(tmp_path / "cal")
    source = load_torchvision(f"torchvision:Caltech101:{root}")
    theirs = tvd.Caltech101(str(root), download=False)
    assert source.class_names == ["accordion", "airplanes"] == theirs.categories
    rows = [s for split in source.splits.values() for s in split]
    assert sorted((s.id, s.label) for s in rows) == sorted(
        (f"caltech101/101_ObjectCategories/{theirs.categories[y]}/image_{i:04d}.jpg", y)
        for y, i in zip(theirs.y, theirs.index, strict=True)
    )
    assert source.split_rule.kind == "id-hash" and set(source.splits) == {"train", "val", "test"}
    check_fractions_apply(source, SplitFractions())  # allowed: no official split
    again = load_torchvision(
        f"torchvision:Caltech101:{root}", fractions=SplitFractions(0.8, 0.2, 0)
    )
    assert set(again.splits) == {"train", "val"}


def test_ids_fingerprint_and_pickling_are_stable(tmp_path: Path) -> None:
    root = write_cifar100(tmp_path / "c")
    first = load_torchvision(f"torchvision:CIFAR100:{root}")
    second = load_torchvision(f"torchvision:CIFAR100:{root}")
    assert first.splits == second.splits and first.fingerprint() == second.fingerprint()
    clone = pickle.loads(pickle.dumps(first))  # DataLoader / Dask workers get a copy
    assert clone.digest(clone.splits["train"][2]) == first.digest(first.splits["train"][2])
    write_cifar100(root, seed=1)  # same ids and labels, other pixels
    assert load_torchvision(f"torchvision:CIFAR100:{root}").fingerprint() != first.fingerprint()


def test_official_splits_refuse_split_fractions(tmp_path: Path) -> None:
    source = load_torchvision(f"torchvision:Flowers102:{write_flowers102(tmp_path / 'f')}")
    with pytest.raises(SpecError, match="Drop --split-fractions"):
        check_fractions_apply(source, SplitFractions(0.6, 0.2, 0.2))


def test_catalog_counts_use_the_split_names_the_source_gives() -> None:
    for name in ADAPTERS:
        adapter = ADAPTERS.get(name)
        info = get_dataset(adapter.catalog)
        assert info.spec == f"torchvision:{name}:ROOT" and info.source.startswith("http")
        made = {"train", "val", "test"} if "" in adapter.splits else set(adapter.splits)
        assert set(info.counts) <= made, name  # the hash rule makes train/val/test
    assert get_dataset("flowers102").counts == {"train": 1020, "val": 1020, "test": 6149}
    assert get_dataset("cifar100").counts == {"train": 50_000, "test": 10_000}
    assert get_dataset("oxford-pets").counts == {"train": 3680, "test": 3669}


# Official images per class: Caltech-101 (BACKGROUND_Google left out) and EuroSAT.
CALTECH101_PER_CLASS = [
    55, 800, 42, 42, 47, 54, 46, 33, 128, 98, 43, 85, 91, 50, 43, 123, 47, 59, 62, 107, 47, 69,
    73, 70, 50, 51, 57, 67, 52, 65, 68, 75, 64, 53, 64, 85, 435, 435, 67, 67, 45, 34, 34, 51,
    99, 100, 42, 54, 88, 80, 31, 64, 86, 114, 61, 81, 200, 78, 41, 66, 43, 40, 87, 32, 76, 798,
    55, 35, 39, 47, 38, 45, 53, 34, 57, 82, 59, 49, 40, 63, 39, 84, 57, 35, 64, 45, 86, 59, 64,
    35, 85, 49, 86, 75, 239, 37, 59, 34, 56, 39, 60,
]  # fmt: skip
EUROSAT_PER_CLASS = [3000, 3000, 3000, 2500, 2500, 2000, 2500, 3000, 2500, 3000]


@pytest.mark.parametrize(
    ("name", "per_class"), [("caltech101", CALTECH101_PER_CLASS), ("eurosat", EUROSAT_PER_CLASS)]
)
def test_hash_split_counts_are_what_the_rule_gives(name: str, per_class: list[int]) -> None:
    """The split sizes of the id-hash rule depend only on the per-class counts."""
    from bob_cache.data.splits import hash_split

    labels = np.repeat(np.arange(len(per_class)), per_class)
    parts = hash_split(labels, [str(i) for i in range(len(labels))], SplitFractions())
    assert get_dataset(name).counts == {k: len(v) for k, v in parts.items()}
    assert get_dataset(name).classes == len(per_class)


# --- bad input -------------------------------------------------------------------------------


def test_missing_file_is_named_with_where_the_copy_comes_from(tmp_path: Path) -> None:
    root = write_flowers102(tmp_path / "f")
    (root / "flowers-102" / "setid.mat").unlink()
    with pytest.raises(DataNotFoundError) as info:
        load_torchvision(f"torchvision:Flowers102:{root}")
    message = str(info.value)
    assert f"missing {root}/flowers-102/setid.mat." in message
    assert "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/" in message
    assert "imagelabels.mat" in message  # the layout it expects


def test_empty_root_names_every_missing_pickle(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="cifar-100-python/train.*cifar.html"):
        load_torchvision(f"torchvision:CIFAR100:{tmp_path}")
    assert not (tmp_path / "cifar-100-python").exists()  # nothing created, nothing downloaded


def test_corrupt_copy_says_to_download_again(tmp_path: Path, monkeypatch) -> None:
    root = write_cifar100(tmp_path / "c")
    monkeypatch.setattr("torchvision.datasets.cifar.check_integrity", lambda *a, **k: False)
    with pytest.raises(DataSourceError, match="truncated or modified.*download it again"):
        load_torchvision(f"torchvision:CIFAR100:{root}")


@pytest.mark.parametrize("name", ["VOCDetection", "CocoDetection", "Kitti", "SintelStereo"])
def test_non_classification_class_is_refused(name: str, tmp_path: Path) -> None:
    with pytest.raises(DataSourceError) as info:
        load_torchvision(f"torchvision:{name}:{tmp_path}")
    message = str(info.value)
    assert "is not a classification dataset" in message
    assert "Flowers102" in message and "ade20k:ROOT" in message


def test_unknown_name_suggests_a_close_one(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match="Did you mean 'Flowers102'"):
        load_torchvision(f"torchvision:Flower102:{tmp_path}")


def test_spec_without_root_shows_the_syntax() -> None:
    with pytest.raises(DataSourceError, match="torchvision:NAME:ROOT.*Example"):
        load_torchvision("torchvision:CIFAR100")


# --- the other layouts, each against torchvision's own reading -------------------------------


def write_svhn(root: Path) -> Path:
    """SVHN's cropped digits: ``{train,test}_32x32.mat`` with X (32, 32, 3, N), y 1..10."""
    from scipy.io import savemat

    rng = np.random.default_rng(2)
    root.mkdir(parents=True)
    for split, n in (("train", 5), ("test", 3)):
        x = rng.integers(0, 255, (32, 32, 3, n), dtype=np.uint8)
        y = np.array([10, 1, 2, 3, 4][:n], dtype=np.uint8)[:, None]  # 10 is the digit 0
        savemat(root / f"{split}_32x32.mat", {"X": x, "y": y})
    return root


def write_stl10(root: Path) -> Path:
    """STL-10's binaries: ``{train,test}_X.bin`` (column-major 3×96×96 uint8 images),
    ``*_y.bin`` (labels 1..10), ``unlabeled_X.bin`` and ``class_names.txt``."""
    rng = np.random.default_rng(3)
    folder = root / "stl10_binary"
    folder.mkdir(parents=True)
    for split, n in (("train", 4), ("test", 2)):
        (folder / f"{split}_X.bin").write_bytes(rng.integers(0, 255, n * 3 * 96 * 96, np.uint8))
        (folder / f"{split}_y.bin").write_bytes(np.arange(1, n + 1, dtype=np.uint8).tobytes())
    (folder / "unlabeled_X.bin").write_bytes(b"")
    (folder / "class_names.txt").write_text("".join(f"c{i}\n" for i in range(10)))
    return root


def write_pets(root: Path) -> Path:
    """Oxford-IIIT Pet: ``images/Breed_N.jpg`` and ``annotations/{trainval,test}.txt``
    ("image class species breed", classes 1-based)."""
    base = root / "oxford-iiit-pet"
    (base / "annotations").mkdir(parents=True)
    lists = {"trainval": ["Abyssinian_1 1 1 1", "american_bulldog_10 2 2 1"],
             "test": ["american_bulldog_3 2 2 1", "Abyssinian_12 1 1 1"]}  # fmt: skip
    for split, lines in lists.items():
        (base / "annotations" / f"{split}.txt").write_text("".join(x + "\n" for x in lines))
        for i, line in enumerate(lines):
            _jpeg(base / "images" / f"{line.split()[0]}.jpg", 40 + i)
    return root


def write_gtsrb(root: Path) -> Path:
    """GTSRB: ``GTSRB/Training/CLASS/*.ppm``, ``GTSRB/Final_Test/Images/*.ppm`` and
    ``GT-final_test.csv`` (semicolon-separated, ClassId column)."""
    base = root / "gtsrb"
    for cls in ("00000", "00001"):
        for i in range(2):
            _jpeg(base / "GTSRB" / "Training" / cls / f"{cls}_{i:05d}.ppm", int(cls) * 5 + i)
    test = base / "GTSRB" / "Final_Test" / "Images"
    rows = ["Filename;Width;Height;Roi.X1;Roi.Y1;Roi.X2;Roi.Y2;ClassId"]
    for i, cls in enumerate((1, 0, 1)):
        _jpeg(test / f"{i:05d}.ppm", 70 + i)
        rows.append(f"{i:05d}.ppm;12;10;1;1;9;9;{cls}")
    (base / "GT-final_test.csv").write_text("\n".join(rows) + "\n")
    return root


def write_country211(root: Path) -> Path:
    """Country211: ``country211/{train,valid,test}/CC/ID.jpg`` (ImageFolder per split)."""
    for split in ("train", "valid", "test"):
        for c, cc in enumerate(("AD", "AE")):
            _jpeg(root / "country211" / split / cc / f"{len(split)}{c}.jpg", len(split) + c)
    return root


def write_stanford_cars(root: Path) -> Path:
    """Stanford Cars: ``devkit/cars_meta.mat`` (class_names), ``devkit/cars_train_annos.mat``
    and ``cars_test_annos_withlabels.mat`` (annotations with fname and 1-based class)."""
    from scipy.io import savemat

    base = root / "stanford_cars"
    (base / "devkit").mkdir(parents=True)
    names = np.array(["AM General Hummer SUV 2000", "Acura RL Sedan 2012"], dtype=object)
    savemat(base / "devkit" / "cars_meta.mat", {"class_names": names[None, :]})
    kind = [("fname", "O"), ("class", "O")]
    train, test = [("00001.jpg", 2), ("00002.jpg", 1)], [("00001.jpg", 1), ("00002.jpg", 2)]
    for mat, folder, rows in (
        (base / "devkit" / "cars_train_annos.mat", "cars_train", train),
        (base / "cars_test_annos_withlabels.mat", "cars_test", test),
    ):
        savemat(mat, {"annotations": np.array([rows], dtype=kind)})
        for i, (fname, _) in enumerate(rows):
            _jpeg(base / folder / fname, 90 + i + len(folder))
    return root


LAYOUTS = {
    "SVHN": (write_svhn, {"train": {"split": "train"}, "test": {"split": "test"}}, {}),
    "STL10": (write_stl10, {"train": {"split": "train"}, "test": {"split": "test"}}, {}),
    "OxfordIIITPet": (write_pets, {"train": {"split": "trainval"}, "test": {"split": "test"}}, {}),
    "Country211": (
        write_country211,
        {"train": {"split": "train"}, "val": {"split": "valid"}, "test": {"split": "test"}},
        {},
    ),
    "StanfordCars": (
        write_stanford_cars,
        {"train": {"split": "train"}, "test": {"split": "test"}},
        {},
    ),
}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_layout_reads_as_torchvision_does(name: str, tmp_path: Path) -> None:
    write, split_args, kwargs = LAYOUTS[name]
    root = write(tmp_path / "root")
    source = load_torchvision(f"torchvision:{name}:{root}")
    _agrees_with_torchvision(source, getattr(tvd, name), split_args, root, **kwargs)
    ids = [s.id for rows in source.splits.values() for s in rows]
    assert len(set(ids)) == len(ids)
    if not isinstance(source.splits["train"][0].location, tuple):  # file ids exist under ROOT
        assert all((root / i).is_file() for i in ids)
    if name == "SVHN":
        assert source.class_names == [str(d) for d in range(10)]
        assert [s.label for s in source.splits["train"]] == [0, 1, 2, 3, 4]


def test_gtsrb_numbers_its_classes(tmp_path: Path) -> None:
    root = write_gtsrb(tmp_path / "g")
    source = load_torchvision(f"torchvision:GTSRB:{root}")
    for split in ("train", "test"):
        theirs = tvd.GTSRB(str(root), split=split)
        assert [s.label for s in source.splits[split]] == [y for _, y in theirs._samples]
    assert source.class_names[:2] == ["00000", "00001"] and len(source.class_names) == 43
    assert source.splits["test"][0].id == "gtsrb/GTSRB/Final_Test/Images/00000.ppm"


def write_sun397(root: Path) -> Path:
    """SUN397: ``ClassName.txt`` ("/a/abbey" lines) and ``LETTER/CLASS/sun_*.jpg``."""
    base = root / "SUN397"
    base.mkdir(parents=True)
    (base / "ClassName.txt").write_text("/a/abbey\n/b/bakery/shop\n")
    for c, cls in enumerate(("a/abbey", "b/bakery/shop")):
        for i in range(4):
            _jpeg(base / cls / f"sun_{c}{i}.jpg", 60 + c * 4 + i)
    return root


def write_eurosat(root: Path) -> Path:
    """EuroSAT RGB: ``eurosat/2750/CLASS/CLASS_N.jpg``."""
    for c, cls in enumerate(("AnnualCrop", "Forest")):
        for i in range(1, 5):
            _jpeg(root / "eurosat" / "2750" / cls / f"{cls}_{i}.jpg", 80 + c * 5 + i)
    return root


@pytest.mark.parametrize(("name", "write"), [("SUN397", write_sun397), ("EuroSAT", write_eurosat)])
def test_classes_without_splits_list_every_image_once(name: str, write, tmp_path: Path) -> None:
    root = write(tmp_path / "root")
    source = load_torchvision(f"torchvision:{name}:{root}")
    theirs = getattr(tvd, name)(str(root))
    files, labels = (
        (theirs._image_files, theirs._labels)
        if name == "SUN397"
        else ([p for p, _ in theirs.samples], theirs.targets)
    )
    pairs = zip(files, labels, strict=True)
    expected = sorted((Path(f).relative_to(root).as_posix(), y) for f, y in pairs)
    rows = [s for split in source.splits.values() for s in split]
    assert sorted((s.id, s.label) for s in rows) == expected
    assert source.class_names == theirs.classes and source.split_rule.kind == "id-hash"
