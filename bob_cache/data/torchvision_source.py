"""torchvision's classification datasets, read from a local copy and never downloaded.

``torchvision:NAME:ROOT`` lists a ``torchvision.datasets`` class (``CIFAR100``, ``Flowers102``,
...) from ``ROOT``, the folder torchvision's own ``root`` argument names, constructed with
``download=False``. The expected files are checked first, so a missing one is named with
where the official copy comes from.

Splits are the class's own official ones, mapped to train/val/test (Country211's ``valid`` is
``val``, Oxford-IIIT Pet's ``trainval`` is ``train``). Where the distribution has no val
(CIFAR, Food-101, Pets, Cars, ...), none is made here: the source keeps the official splits and
the probes hold out a part of each class of train by id hash (``--val-fraction``). Where the
class reads no split at all (SUN397, Caltech101, EuroSAT), the rows are split by the project's
id-hash rule (:func:`bob_cache.data.splits.split_rows`, ``--split-fractions``).

Ids are the image files' paths relative to ``ROOT`` where the class reads files; for classes
that hold their images as arrays (CIFAR, SVHN, STL10, MNIST), ``split/index`` within the
split (``train/00042``), and the pixels are decoded from the array (no JPEG round trip) with
the digest taken over the array's bytes.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from bob_cache.data.catalog import DatasetInfo, register_dataset
from bob_cache.data.images import open_image_file
from bob_cache.data.source import (
    AS_DISTRIBUTED,
    DataSource,
    Sample,
    SplitRule,
    content_digest,
    register_source,
)
from bob_cache.data.splits import SplitFractions, split_rows
from bob_cache.errors import BobCacheError, DataNotFoundError, DataSourceError, did_you_mean
from bob_cache.registry import Registry

PREFIX = "torchvision:"
NO_VAL = SplitRule("distributed", detail="as distributed (no val: probes hold out from train)")
NO_VAL_NOTE = (
    "No official val: the source keeps the official splits and probes hold out "
    "round(val_fraction * n) images of each class of train by id hash (--val-fraction, 0.1)."
)
HASH_NOTE = (
    "torchvision reads no official split: rows are split train/val/test by the id-hash rule "
    "(stratified, --split-fractions, default 0.6/0.2/0.2)."
)
HASH_COUNTS_NOTE = (
    " The counts are what the rule gives at the default fractions on the official per-class "
    "counts (a check with other --split-fractions differs)."
)


@dataclass(frozen=True)
class Adapter:
    """How one ``torchvision.datasets`` class is read.

    Attributes:
        name: the torchvision class name.
        catalog: the catalog name of the dataset it reads.
        splits: bob-cache split → constructor arguments (one ``""`` entry for a class without
            splits: its rows are split by id hash).
        files: paths under ROOT the class needs (a trailing ``/`` marks a folder).
        source: where the official copy comes from.
        counts: official images per split (empty where the split comes from the hash rule).
        classes: number of classes.
        kwargs: constructor arguments for every split.
        array: ``HWC``, ``CHW`` or ``HW`` for classes holding images as arrays; ``""`` for files.
        class_names: names for a class without a ``classes`` attribute.
        note: how val is made, or anything else a user must know.
    """

    name: str
    catalog: str
    splits: dict[str, dict[str, Any]]
    files: tuple[str, ...]
    source: str
    counts: dict[str, int]
    classes: int
    kwargs: dict[str, Any] = field(default_factory=dict)
    array: str = ""
    class_names: tuple[str, ...] = ()
    note: str = ""

    @property
    def rule(self) -> SplitRule:
        return NO_VAL if "val" not in self.splits and "" not in self.splits else AS_DISTRIBUTED


ADAPTERS: Registry[Adapter] = Registry(
    "torchvision dataset", hint="See `bob-cache datasets`.", error=DataNotFoundError
)

# torchvision classes that give something other than one class per image, and what they give.
NOT_CLASSIFICATION = {
    "VOCDetection": "boxes", "VOCSegmentation": "masks", "SBDataset": "masks",
    "Cityscapes": "masks", "CocoDetection": "boxes", "CocoCaptions": "captions",
    "Kitti": "boxes", "WIDERFace": "face boxes", "Flickr8k": "captions",
    "Flickr30k": "captions", "SBU": "captions", "CelebA": "attributes and landmarks",
    "LFWPairs": "image pairs", "PhotoTour": "patch pairs", "KittiFlow": "optical flow",
    "Sintel": "optical flow", "FlyingChairs": "optical flow", "FlyingThings3D": "optical flow",
    "HD1K": "optical flow", "Kinetics": "videos", "HMDB51": "videos", "UCF101": "videos",
    "MovingMNIST": "videos", "FakeData": "random images",
    "ImageFolder": "a plain folder (give the folder itself as --data)",
    "DatasetFolder": "a plain folder (give the folder itself as --data)",
}  # fmt: skip
OTHER_SOURCES = (
    "For detection or segmentation use the project's own sources: a segmentation folder "
    "(images/ + masks/), ade20k:ROOT, or COCO annotations with `bob-cache finetune`."
)


def _layout(adapter: Adapter) -> str:
    return "ROOT holds " + ", ".join(adapter.files)


def _define(name: str, catalog: str, splits: dict[str, dict[str, Any]], files: str,
            source: str, counts: dict[str, int], classes: int, **extra: Any) -> None:  # fmt: skip
    """Register the adapter of one class and its dataset's catalog entry."""
    adapter = Adapter(name, catalog, splits, tuple(files.split()), source, counts, classes, **extra)
    ADAPTERS.register(name, adapter)
    register_dataset(
        DatasetInfo(
            name=catalog,
            spec=f"{PREFIX}{name}:ROOT",
            task="classification",
            counts=dict(counts),
            classes=classes,
            source=source,
            layout=_layout(adapter),
            note=adapter.note or (NO_VAL_NOTE if adapter.rule is NO_VAL else ""),
            env=f"{catalog.upper().replace('-', '_')}_DIR",
        )
    )


TRAIN_TEST = {"train": {"train": True}, "test": {"train": False}}
SPLIT_ARG = {s: {"split": s} for s in ("train", "val", "test")}
TRAIN_TEST_ARG = {s: {"split": s} for s in ("train", "test")}
WHOLE: dict[str, dict[str, Any]] = {"": {}}
MNIST_FILES = " ".join(
    f"{{0}}/raw/{f}-idx{d}-ubyte"
    for f, d in (("train-images", 3), ("train-labels", 1), ("t10k-images", 3), ("t10k-labels", 1))
)
DIGITS = tuple(str(d) for d in range(10))

# fmt: off
_define("CIFAR10", "cifar10", TRAIN_TEST,
        " ".join(f"cifar-10-batches-py/{f}" for f in (
            "data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5",
            "test_batch", "batches.meta")),
        "https://www.cs.toronto.edu/~kriz/cifar.html (cifar-10-python.tar.gz)",
        {"train": 50_000, "test": 10_000}, 10, array="HWC")
_define("CIFAR100", "cifar100", TRAIN_TEST,
        "cifar-100-python/train cifar-100-python/test cifar-100-python/meta",
        "https://www.cs.toronto.edu/~kriz/cifar.html (cifar-100-python.tar.gz)",
        {"train": 50_000, "test": 10_000}, 100, array="HWC")
_define("Flowers102", "flowers102", SPLIT_ARG,
        "flowers-102/jpg/ flowers-102/imagelabels.mat flowers-102/setid.mat",
        "https://www.robots.ox.ac.uk/~vgg/data/flowers/102/ (102flowers.tgz, imagelabels.mat, "
        "setid.mat)", {"train": 1020, "val": 1020, "test": 6149}, 102)
_define("FGVCAircraft", "fgvc-aircraft", SPLIT_ARG,
        " ".join(f"fgvc-aircraft-2013b/data/{f}" for f in (
            "images/", "variants.txt", "images_variant_train.txt", "images_variant_val.txt",
            "images_variant_test.txt")),
        "https://www.robots.ox.ac.uk/~vgg/data/fgvc-aircraft/ (fgvc-aircraft-2013b.tar.gz)",
        {"train": 3334, "val": 3333, "test": 3333}, 100, kwargs={"annotation_level": "variant"},
        note="Classes are the 100 variants (annotation_level='variant').")
_define("DTD", "dtd", SPLIT_ARG,
        "dtd/dtd/images/ dtd/dtd/labels/train1.txt dtd/dtd/labels/val1.txt "
        "dtd/dtd/labels/test1.txt",
        "https://www.robots.ox.ac.uk/~vgg/data/dtd/ (dtd-r1.0.1.tar.gz, unpacked in ROOT/dtd)",
        {"train": 1880, "val": 1880, "test": 1880}, 47, kwargs={"partition": 1},
        note="Partition 1 of the ten official ones.")
_define("Food101", "food101", TRAIN_TEST_ARG,
        "food-101/images/ food-101/meta/train.json food-101/meta/test.json",
        "https://data.vision.ee.ethz.ch/cvl/datasets_extra/food-101/ (food-101.tar.gz)",
        {"train": 75_750, "test": 25_250}, 101)
_define("OxfordIIITPet", "oxford-pets",
        {"train": {"split": "trainval"}, "test": {"split": "test"}},
        "oxford-iiit-pet/images/ oxford-iiit-pet/annotations/trainval.txt "
        "oxford-iiit-pet/annotations/test.txt",
        "https://www.robots.ox.ac.uk/~vgg/data/pets/ (images.tar.gz, annotations.tar.gz, "
        "unpacked in ROOT/oxford-iiit-pet)", {"train": 3680, "test": 3669}, 37,
        note="train is the official trainval list. " + NO_VAL_NOTE)
_define("StanfordCars", "stanford-cars", TRAIN_TEST_ARG,
        "stanford_cars/devkit/cars_meta.mat stanford_cars/devkit/cars_train_annos.mat "
        "stanford_cars/cars_train/ stanford_cars/cars_test/ "
        "stanford_cars/cars_test_annos_withlabels.mat",
        "https://ai.stanford.edu/~jkrause/cars/car_dataset.html (the original links are down; "
        "torchvision cannot download it either: use a mirror of the same files)",
        {"train": 8144, "test": 8041}, 196)
_define("SUN397", "sun397", WHOLE, "SUN397/ClassName.txt",
        "https://vision.princeton.edu/projects/2010/SUN/ (SUN397.tar.gz)", {}, 397,
        note="108,754 images. " + HASH_NOTE + " No counts per split: the per-class counts "
        "that the rule's split sizes depend on are not catalogued.")
_define("Caltech101", "caltech101", WHOLE, "caltech101/101_ObjectCategories/",
        "https://data.caltech.edu/records/mzrjq-6wc02 (caltech-101.zip; unpack "
        "101_ObjectCategories.tar.gz in ROOT/caltech101)",
        {"train": 5205, "val": 1736, "test": 1736}, 101,
        note="8,677 images (BACKGROUND_Google left out, as torchvision does). " + HASH_NOTE
        + HASH_COUNTS_NOTE)
_define("Country211", "country211",
        {"train": {"split": "train"}, "val": {"split": "valid"}, "test": {"split": "test"}},
        "country211/train/ country211/valid/ country211/test/",
        "https://github.com/openai/CLIP/blob/main/data/country211.md (country211.tgz)",
        {"train": 31_650, "val": 10_550, "test": 21_100}, 211)
_define("EuroSAT", "eurosat", WHOLE, "eurosat/2750/",
        "https://github.com/phelber/EuroSAT (EuroSAT.zip, RGB; unpacked in ROOT/eurosat)",
        {"train": 16_200, "val": 5400, "test": 5400}, 10,
        note="27,000 images. " + HASH_NOTE + HASH_COUNTS_NOTE)
_define("GTSRB", "gtsrb", TRAIN_TEST_ARG,
        "gtsrb/GTSRB/Training/ gtsrb/GTSRB/Final_Test/Images/ gtsrb/GT-final_test.csv",
        "https://benchmark.ini.rub.de/gtsrb_dataset.html (GTSRB-Training_fixed.zip, "
        "GTSRB_Final_Test_Images.zip, GTSRB_Final_Test_GT.zip, unpacked in ROOT/gtsrb)",
        {"train": 26_640, "test": 12_630}, 43, class_names=tuple(f"{i:05d}" for i in range(43)))
_define("STL10", "stl10", TRAIN_TEST_ARG,
        " ".join(f"stl10_binary/{f}" for f in (
            "train_X.bin", "train_y.bin", "test_X.bin", "test_y.bin", "unlabeled_X.bin")),
        "https://cs.stanford.edu/~acoates/stl10/ (stl10_binary.tar.gz)",
        {"train": 5000, "test": 8000}, 10, array="CHW",
        note="The unlabeled images are not listed (torchvision still checks unlabeled_X.bin). "
        + NO_VAL_NOTE)
_define("SVHN", "svhn", TRAIN_TEST_ARG, "train_32x32.mat test_32x32.mat",
        "http://ufldl.stanford.edu/housenumbers/ (train_32x32.mat, test_32x32.mat)",
        {"train": 73_257, "test": 26_032}, 10, array="CHW", class_names=DIGITS,
        note="The 'extra' split is not listed. " + NO_VAL_NOTE)
_define("MNIST", "mnist", TRAIN_TEST, MNIST_FILES.format("MNIST"),
        "https://yann.lecun.com/exdb/mnist/ (the four idx files, gunzipped in ROOT/MNIST/raw)",
        {"train": 60_000, "test": 10_000}, 10, array="HW")
_define("FashionMNIST", "fashion-mnist", TRAIN_TEST, MNIST_FILES.format("FashionMNIST"),
        "https://github.com/zalandoresearch/fashion-mnist (the four idx files, gunzipped in "
        "ROOT/FashionMNIST/raw)", {"train": 60_000, "test": 10_000}, 10, array="HW")
# fmt: on


@dataclass
class TorchvisionSource(DataSource):
    """A torchvision dataset: ``location`` is a file's absolute path, or ``(split, index)``
    into :attr:`arrays` for classes that hold their images as arrays (laid out as
    :attr:`array_layout`)."""

    arrays: dict[str, Any] = field(default_factory=dict)
    array_layout: str = ""

    kind = "torchvision"

    def _pixels(self, sample: Sample) -> np.ndarray:
        split, index = sample.location
        return np.asarray(self.arrays[split][index])

    def open_image(self, sample: Sample) -> Image.Image:
        if isinstance(sample.location, str):
            return open_image_file(sample.location)
        pixels = self._pixels(sample)
        if self.array_layout == "CHW":
            pixels = np.transpose(pixels, (1, 2, 0))
        return Image.fromarray(np.ascontiguousarray(pixels)).convert("RGB")

    def read_bytes(self, sample: Sample) -> bytes | None:
        if not isinstance(sample.location, str):
            return None
        with open(sample.location, "rb") as f:
            return f.read()

    def digest(self, sample: Sample) -> str:
        if isinstance(sample.location, str):
            return super().digest(sample)
        return content_digest(np.ascontiguousarray(self._pixels(sample)).tobytes())

    def fingerprint_rows(self) -> list[Any]:
        if self.arrays:
            digests = {
                split: hashlib.sha256(np.ascontiguousarray(a).tobytes()).hexdigest()
                for split, a in sorted(self.arrays.items())
            }
            return [digests, super().fingerprint_rows()]
        return [
            (split, s.id, s.label, os.path.getsize(s.location))
            for split, rows in self.splits.items()
            for s in rows
        ]


def parse_spec(spec: str) -> tuple[Adapter, Path]:
    """``torchvision:NAME:ROOT`` → (the class's adapter, ROOT made absolute)."""
    parts = spec.split(":", 2)
    if len(parts) != 3 or not parts[1] or not parts[2]:
        raise DataSourceError(
            f"'{spec}' is not a torchvision source: expected torchvision:NAME:ROOT, with NAME a "
            f"torchvision.datasets class ({', '.join(ADAPTERS)}) and ROOT the folder that holds "
            "its files. Example: torchvision:Flowers102:/data/flowers."
        )
    return find_adapter(parts[1]), Path(parts[2]).expanduser().absolute()


def find_adapter(name: str) -> Adapter:
    """The adapter of torchvision class ``name`` (case-insensitive); raises naming the
    supported classes for a class that is not one (or not a classification dataset)."""
    lowered = {k.lower(): k for k in ADAPTERS}
    if name.lower() in lowered:
        return ADAPTERS.get(lowered[name.lower()])
    import torchvision.datasets as tvd

    supported = ", ".join(ADAPTERS)
    what = NOT_CLASSIFICATION.get(name) or ("stereo disparity" if name.endswith("Stereo") else "")
    if what:
        raise DataSourceError(
            f"torchvision.datasets.{name} is not a classification dataset (it gives {what}); "
            f"torchvision:NAME reads classification datasets only: {supported}. "
            f"{OTHER_SOURCES}"
        )
    if name in tvd.__all__:
        raise DataSourceError(
            f"torchvision.datasets.{name} is not read by torchvision:NAME yet. Supported: "
            f"{supported}. Or export it to class folders and give the folder as --data."
        )
    raise DataNotFoundError(
        f"Unknown torchvision dataset '{name}'.{did_you_mean(name, ADAPTERS)} "
        f"Supported: {supported}. Example: torchvision:Flowers102:/data/flowers."
    )


def missing_files(adapter: Adapter, root: Path) -> list[str]:
    """The files (and folders, ending in ``/``) of ``adapter`` that ``root`` lacks."""
    exists = {True: Path.is_dir, False: Path.is_file}
    return [f for f in adapter.files if not exists[f.endswith("/")](root / f)]


def open_split(adapter: Adapter, root: Path, arguments: dict[str, Any]) -> Any:
    """Construct the torchvision dataset for one split, never downloading.

    Raises:
        DataNotFoundError: a file the class needs is missing.
        DataSourceError: torchvision refused or could not read the files present.
    """
    missing = missing_files(adapter, root)
    if missing:
        shown = ", ".join(os.path.join(root, f) for f in missing[:5])
        raise DataNotFoundError(
            f"torchvision:{adapter.name} at '{root}' lacks {len(missing)} of the "
            f"{len(adapter.files)} files and folders it needs: missing "
            f"{shown}{' ...' if len(missing) > 5 else ''}. Get the official copy from "
            f"{adapter.source} and unpack it so that {_layout(adapter)}."
        )
    import torchvision.datasets as tvd

    try:
        return getattr(tvd, adapter.name)(str(root), download=False, **adapter.kwargs, **arguments)
    except BobCacheError:
        raise
    except Exception as exc:  # torchvision's checksum refusals, unreadable files
        raise DataSourceError(
            f"torchvision.datasets.{adapter.name} could not read the copy at '{root}' "
            f"({type(exc).__name__}: {exc}). Every expected file is present, so one is probably "
            f"truncated or modified (torchvision checks MD5 sums of some): download it again "
            f"from {adapter.source}."
        ) from exc


def _files_and_labels(dataset: Any) -> tuple[list[str] | None, list[int]]:
    """The image files (None for array datasets) and labels a torchvision dataset holds."""
    for attr in ("_samples", "samples"):  # GTSRB, StanfordCars, ImageFolder subclasses
        if isinstance(getattr(dataset, attr, None), list):
            pairs = getattr(dataset, attr)
            return [str(p) for p, _ in pairs], [int(y) for _, y in pairs]
    for attr in ("_image_files", "_images"):  # Flowers, FGVC, DTD, Food, SUN397; Pets
        if hasattr(dataset, attr):
            return [str(p) for p in getattr(dataset, attr)], [int(y) for y in dataset._labels]
    if hasattr(dataset, "categories"):  # Caltech101: category folder and 1-based number
        folder = Path(dataset.root) / "101_ObjectCategories"
        files = [
            str(folder / dataset.categories[y] / f"image_{i:04d}.jpg")
            for y, i in zip(dataset.y, dataset.index, strict=True)
        ]
        return files, [int(y) for y in dataset.y]
    labels = getattr(dataset, "targets", None)
    labels = dataset.labels if labels is None else labels
    return None, [int(y) for y in np.asarray(labels).reshape(-1)]


def _relative(path: str, root: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def list_split(
    adapter: Adapter, root: Path, split: str, arguments: dict[str, Any]
) -> tuple[list[Sample], list[str], Any]:
    """One split's samples, its class names, and its image array (None for file datasets)."""
    dataset = open_split(adapter, root, arguments)
    files, labels = _files_and_labels(dataset)
    names = getattr(dataset, "classes", None) or getattr(dataset, "categories", None)
    names = [str(c) for c in (names or adapter.class_names)]
    if files is not None:
        rows = [Sample(_relative(f, root), y, f) for f, y in zip(files, labels, strict=True)]
        return rows, names, None
    data = dataset.data
    data = data.numpy() if hasattr(data, "numpy") else np.asarray(data)
    rows = [Sample(f"{split}/{i:05d}", y, (split, i)) for i, y in enumerate(labels)]
    return rows, names, data


@register_source(
    "torchvision",
    lambda spec: spec.startswith(PREFIX),
    syntax="torchvision:NAME:ROOT",
    layout="A torchvision.datasets classification class read from ROOT as torchvision lays it "
    "out (never downloaded): the official splits as train/val/test; ids are file paths "
    "relative to ROOT, or split/index for array datasets (CIFAR, SVHN, STL10, MNIST).",
    example="torchvision:Flowers102:/data/flowers",
)
def load_torchvision(
    spec: str,
    *,
    name: str | None = None,
    split: str = "all",
    fractions: SplitFractions | None = None,
) -> TorchvisionSource:
    """List ``torchvision:NAME:ROOT`` (see module docstring)."""
    adapter, root = parse_spec(spec)
    splits: dict[str, list[Sample]] = {}
    arrays: dict[str, Any] = {}
    class_names: list[str] = []
    for part, arguments in adapter.splits.items():
        rows, names, data = list_split(adapter, root, part or "all", arguments)
        if class_names and names != class_names:
            raise DataSourceError(
                f"torchvision:{adapter.name} at '{root}': split '{part}' lists other classes "
                f"({len(names)}) than the splits before it ({len(class_names)}), so its labels "
                f"would not match. The copy is incomplete: get it again from {adapter.source}."
            )
        class_names, splits[part] = names, rows
        if data is not None:
            arrays[part or "all"] = data
    rule = adapter.rule
    if "" in splits:
        rows = sorted(splits.pop(""), key=lambda s: s.id)
        splits, rule = split_rows(rows, split=split, fractions=fractions, labelled=True)
    return TorchvisionSource(
        name=name or adapter.catalog,
        origin=f"{PREFIX}{adapter.name}:{root}",
        splits=splits,
        class_names=class_names,
        split_rule=rule,
        catalog=adapter.catalog,
        arrays=arrays,
        array_layout=adapter.array,
    )
