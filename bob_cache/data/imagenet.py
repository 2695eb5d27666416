"""ImageNet (ILSVRC2012) as distributed, and its shifts: ImageNet-V2, -R, -A and -Sketch.

Every source of this family names its classes by WordNet id (``n01440764``), with the
readable lemmas in ``class_descriptions``, so a 200-class shift set (ImageNet-R, -A) matches
the 1000-class ID set's classes by name in ``bob-cache ood``, with no class map.

- ``imagenet:ROOT``: ``train/nXXXXXXXX/*.JPEG`` and ``val/``, either sorted into WordNet-id
  folders (torchvision's prepared layout) or flat ``ILSVRC2012_val_XXXXXXXX.JPEG`` labelled
  by ``LOC_val_solution.csv`` (Kaggle) or the devkit (``ILSVRC2012_devkit_t12/`` or its
  ``.tar.gz``: ``data/ILSVRC2012_validation_ground_truth.txt`` holds ILSVRC2012_IDs, mapped to
  WordNet ids through ``data/meta.mat``). The Kaggle tree (``ILSVRC/Data/CLS-LOC/``) is read
  too. Splits ``train`` and ``val``: ImageNet has no labelled test split, so the official val
  is the study's test set (a suite sets ``test_split: val``) and probes choose C on a part of
  train held out by id hash. Class order: sorted WordNet ids (torchvision's and timm's).
- ``imagenet-v2:ROOT``: folders ``0`` ... ``999``, the class index in sorted-WordNet-id order.
- ``imagenet-r:ROOT``, ``imagenet-a:ROOT``: WordNet-id folders of their 200 classes.
- ``imagenet-sketch:ROOT``: WordNet-id folders of the 1000 classes (under ``sketch/``).

A shift set is one ``test`` split whose class list is the set's official one (timm's lists),
whatever folders a local copy holds.
"""

from __future__ import annotations

import csv
import io
import logging
import os
import pkgutil
import re
import tarfile
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

from bob_cache.data.catalog import DatasetInfo, register_dataset
from bob_cache.data.folder import FolderSource
from bob_cache.data.images import is_image_file
from bob_cache.data.source import AS_DISTRIBUTED, Sample, register_source
from bob_cache.data.splits import SplitFractions
from bob_cache.errors import DataNotFoundError, DataSourceError

logger = logging.getLogger(__name__)

WNID = re.compile(r"^n\d{8}$")
VAL_NUMBER = re.compile(r"ILSVRC2012_val_(\d{8})")
DEVKIT = "ILSVRC2012_devkit_t12"
GROUND_TRUTH = "data/ILSVRC2012_validation_ground_truth.txt"
META = "data/meta.mat"
LOC_SOLUTION = "LOC_val_solution.csv"
KAGGLE_IMAGES = "ILSVRC/Data/CLS-LOC"


@lru_cache(maxsize=8)
def synsets(file: str = "imagenet_synsets.txt") -> tuple[str, ...]:
    """A WordNet-id list that timm ships (``imagenet_synsets.txt``: the 1000 classes, sorted;
    ``imagenet_r_synsets.txt``, ``imagenet_a_synsets.txt``: the 200 of ImageNet-R and -A)."""
    data = pkgutil.get_data("timm.data", f"_info/{file}")
    return tuple((data or b"").decode("utf-8").split())


@lru_cache(maxsize=1)
def lemmas() -> dict[str, str]:
    """WordNet id → its lemmas (``n01440764`` → ``tench, Tinca tinca``), from timm."""
    data = pkgutil.get_data("timm.data", "_info/imagenet_synset_to_lemma.txt") or b""
    return dict(csv.reader(data.decode("utf-8").splitlines(), delimiter="\t"))


@dataclass
class ImageNetSource(FolderSource):
    """ImageNet images on a local filesystem; class names are WordNet ids."""

    class_descriptions: list[str] = field(default_factory=list)

    kind = "imagenet"

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "class_descriptions": self.class_descriptions}


@dataclass
class ImageNetV2Source(ImageNetSource):
    kind = "imagenet-v2"


@dataclass
class ImageNetRSource(ImageNetSource):
    kind = "imagenet-r"


@dataclass
class ImageNetASource(ImageNetSource):
    kind = "imagenet-a"


@dataclass
class ImageNetSketchSource(ImageNetSource):
    kind = "imagenet-sketch"


def describe_classes(wnids: list[str] | tuple[str, ...]) -> list[str]:
    """Each WordNet id's lemmas (the id itself where timm's list lacks it)."""
    names = lemmas()
    return [names.get(w, w) for w in wnids]


def _prefixed(kind: str) -> Any:
    return lambda spec: spec.startswith(f"{kind}:")


def _root(spec: str, kind: str) -> Path:
    path = spec[len(kind) + 1 :] if spec.startswith(f"{kind}:") else spec
    root = Path(path).expanduser().resolve()
    if not root.is_dir():
        raise DataNotFoundError(
            f"{kind} folder '{path}' does not exist. Pass the folder the dataset was "
            f"extracted into: --data {kind}:ROOT (`bob-cache datasets` shows its layout)."
        )
    return root


# --- ILSVRC2012 ---------------------------------------------------------------------------


def is_ilsvrc_root(path: Path) -> bool:
    """True for a folder plainly in an ILSVRC2012 layout (recognised without ``imagenet:``)."""
    if not path.is_dir():
        return False
    if (path / KAGGLE_IMAGES).is_dir():
        return True
    if not ((path / "train").is_dir() or (path / "val").is_dir()):
        return False
    markers = (LOC_SOLUTION, DEVKIT, f"{DEVKIT}.tar.gz", "meta.bin")
    if any((path / m).exists() for m in markers):
        return True
    val = path / "val"
    if not val.is_dir():
        return False
    with os.scandir(val) as entries:
        first = [e.name for _, e in zip(range(8), entries, strict=False) if e.is_file()]
    return bool(first) and all(VAL_NUMBER.match(n) for n in first)


def _matches_ilsvrc(spec: str) -> bool:
    return spec.startswith("imagenet:") or is_ilsvrc_root(Path(spec).expanduser())


@register_source(
    "imagenet",
    _matches_ilsvrc,
    before="folder",
    syntax="imagenet:ROOT",
    layout="ILSVRC2012: train/nXXXXXXXX/*.JPEG and val/ (WordNet-id folders, or flat "
    "ILSVRC2012_val_*.JPEG labelled by LOC_val_solution.csv or ILSVRC2012_devkit_t12[.tar.gz]); "
    "the Kaggle tree ILSVRC/Data/CLS-LOC/ too. Splits train and val (val is the test set).",
    example="imagenet:~/data/imagenet",
)
def load_imagenet(
    spec: str,
    *,
    name: str | None = None,
    split: str = "all",
    fractions: SplitFractions | None = None,
) -> ImageNetSource:
    """List ILSVRC2012 (see the module docstring for the layouts)."""
    root = _root(spec, "imagenet")
    images = root / KAGGLE_IMAGES if (root / KAGGLE_IMAGES).is_dir() else root
    if not ((images / "train").is_dir() or (images / "val").is_dir()):
        raise DataNotFoundError(
            f"ImageNet folder '{root}' has no train/ or val/ folder (nor {KAGGLE_IMAGES}/). "
            "Expected ROOT/train/nXXXXXXXX/*.JPEG and ROOT/val/ as distributed; pass the folder "
            "that holds them."
        )
    train = _wnid_folders(images / "train", images) if (images / "train").is_dir() else []
    val = _list_val(root, images) if (images / "val").is_dir() else []
    wnids = sorted({w for w, _ in train} | {w for w, _ in val if w})
    index = {w: i for i, w in enumerate(wnids)}
    splits = {
        part: [Sample(p.relative_to(images).as_posix(), index[w] if w else -1, str(p))
               for w, p in rows]
        for part, rows in (("train", train), ("val", val)) if rows
    }  # fmt: skip
    if not splits:
        raise DataSourceError(f"ImageNet folder '{root}' holds no images in train/ or val/.")
    missing = sum(s.label == -1 for s in splits.get("val", []))
    if missing:
        logger.warning(
            "'%s': %d of %d val images have no label in the label file; they are kept as "
            "unlabeled rows (-1), left out of probes and scores.",
            root, missing, len(splits["val"]),
        )  # fmt: skip
    return ImageNetSource(
        name=name or "imagenet",
        origin=f"imagenet:{root}",
        splits=splits,
        class_names=wnids,
        split_rule=AS_DISTRIBUTED,
        catalog="imagenet",
        class_descriptions=describe_classes(wnids),
    )


def _wnid_folders(folder: Path, base: Path, *, allowed: dict[str, int] | None = None) -> list:
    """``(wnid, path)`` of the images in ``folder``'s WordNet-id sub-folders, sorted.

    Raises:
        DataSourceError: a sub-folder is not a WordNet id (or not one of ``allowed``).
    """
    rows = []
    for sub in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")):
        if not WNID.match(sub.name) or (allowed is not None and sub.name not in allowed):
            what = "a WordNet id (nXXXXXXXX)" if not WNID.match(sub.name) else "one of its classes"
            raise DataSourceError(
                f"Folder '{sub}' is not {what}. '{folder}' must hold only WordNet-id class "
                "folders as distributed; move other folders out of it."
            )
        rows += [(sub.name, p) for p in _images_in(sub)]
    return rows


def _images_in(folder: Path) -> list[Path]:
    found = []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        found += [Path(dirpath) / f for f in sorted(filenames) if is_image_file(f)]
    return found


def _list_val(root: Path, images: Path) -> list[tuple[str | None, Path]]:
    """``(wnid or None, path)`` of the val images: from WordNet-id folders, or flat with labels
    from LOC_val_solution.csv or the devkit."""
    val = images / "val"
    if any(p.is_dir() and WNID.match(p.name) for p in val.iterdir()):
        return _wnid_folders(val, images)
    files = [p for p in sorted(val.iterdir()) if p.is_file() and is_image_file(p.name)]
    if not files:
        return []
    labels = _val_labels(root, images, n_images=len(files))
    return [(labels.get(p.name.split(".")[0]), p) for p in files]


def _val_labels(root: Path, images: Path, *, n_images: int) -> dict[str, str]:
    """Val image stem (``ILSVRC2012_val_00000001``) → WordNet id, from the first label file
    found.

    Raises:
        DataNotFoundError: no label file (every file that would do is named), or a devkit
            folder without one of its two files.
    """
    between = [p for p in (images, *images.parents) if p != root and p.is_relative_to(root)]
    for folder in (root, *between):
        if (folder / LOC_SOLUTION).is_file():
            return _read_loc_solution(folder / LOC_SOLUTION)
    devkit = root / DEVKIT
    if devkit.is_dir():
        for member in (GROUND_TRUTH, META):
            if not (devkit / member).is_file():
                raise DataNotFoundError(
                    f"The devkit '{devkit}' is missing {member}. Extract the whole "
                    f"{DEVKIT}.tar.gz there (or place the archive itself in '{root}')."
                )
        return _devkit_labels((devkit / GROUND_TRUTH).read_text(), (devkit / META).read_bytes())
    archive = root / f"{DEVKIT}.tar.gz"
    if archive.is_file():
        with tarfile.open(archive) as tar:
            truth, meta = (_member(tar, archive, f"{DEVKIT}/{m}") for m in (GROUND_TRUTH, META))
        return _devkit_labels(truth.decode(), meta)
    raise DataNotFoundError(
        f"'{images / 'val'}' holds {n_images} images in no class folders, and no labels for them "
        f"were found: expected {root / LOC_SOLUTION} (Kaggle), {devkit / GROUND_TRUTH} with "
        f"{META}, or {archive}. Copy one of them there, or sort val into WordNet-id folders."
    )


def _member(tar: tarfile.TarFile, archive: Path, member: str) -> bytes:
    try:
        handle = tar.extractfile(member)
    except KeyError:
        handle = None
    if handle is None:
        raise DataNotFoundError(
            f"'{archive}' has no {member}. Download the ILSVRC2012 devkit again (image-net.org)."
        )
    return handle.read()


def _read_loc_solution(path: Path) -> dict[str, str]:
    """``ImageId,PredictionString`` rows; the first token of the prediction is the WordNet id."""
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if rows and not {"ImageId", "PredictionString"} <= set(rows[0]):
        raise DataSourceError(
            f"'{path}' has columns {list(rows[0])}; expected ImageId,PredictionString as in "
            "Kaggle's ImageNet Object Localization Challenge. Copy the file again."
        )
    return {r["ImageId"]: r["PredictionString"].split()[0] for r in rows if r["PredictionString"]}


def _devkit_labels(ground_truth: str, meta_mat: bytes) -> dict[str, str]:
    """Line k of the ground truth is image k's ILSVRC2012_ID, a leaf synset of meta.mat."""
    from scipy.io import loadmat

    synsets = loadmat(io.BytesIO(meta_mat), squeeze_me=True)["synsets"]
    to_wnid = {
        int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets if int(s["num_children"]) == 0
    }
    labels = {}
    for k, line in enumerate(ground_truth.split(), start=1):
        ident = int(line)
        if ident not in to_wnid:
            raise DataSourceError(
                f"The devkit's ground truth names ILSVRC2012_ID {ident} (line {k}), which "
                f"{META} does not list as a class. Use the devkit's own meta.mat."
            )
        labels[f"ILSVRC2012_val_{k:08d}"] = to_wnid[ident]
    return labels


# --- The shifts -----------------------------------------------------------------------------


@dataclass(frozen=True)
class Shift:
    """One ImageNet shift set: its kind, class list, how its folders are named, and where its
    images sit below the root as distributed."""

    kind: str
    source: type[ImageNetSource]
    synset_file: str
    by_index: bool = False
    inner: tuple[str, ...] = ()


SHIFTS = {
    s.kind: s
    for s in (
        Shift("imagenet-v2", ImageNetV2Source, "imagenet_synsets.txt", by_index=True,
              inner=tuple(f"imagenetv2-{v}-format-val"
                          for v in ("matched-frequency", "threshold0.7", "top-images"))),
        Shift("imagenet-r", ImageNetRSource, "imagenet_r_synsets.txt", inner=("imagenet-r",)),
        Shift("imagenet-a", ImageNetASource, "imagenet_a_synsets.txt", inner=("imagenet-a",)),
        Shift("imagenet-sketch", ImageNetSketchSource, "imagenet_synsets.txt",
              inner=("sketch", "ImageNet-Sketch/sketch")),
    )
}  # fmt: skip


def load_shift(spec: str, *, kind: str, name: str | None = None) -> ImageNetSource:
    """List one shift set as a single ``test`` split over its official class list."""
    shift = SHIFTS[kind]
    root = _root(spec, kind)
    folder = next((root / d for d in shift.inner if (root / d).is_dir()), root)
    wnids = list(synsets(shift.synset_file))
    index = {w: i for i, w in enumerate(wnids)}
    if shift.by_index:
        rows = _index_folders(folder, len(wnids))
    else:
        rows = [(index[w], p) for w, p in _wnid_folders(folder, folder, allowed=index)]
    if not rows:
        layout = "0/ ... 999/" if shift.by_index else "nXXXXXXXX/ (WordNet id)"
        raise DataNotFoundError(
            f"{kind} folder '{folder}' holds no images in class folders. Expected {layout} "
            f"folders of images as distributed; pass the folder that holds them (--data "
            f"{kind}:ROOT)."
        )
    samples = [Sample(p.relative_to(folder).as_posix(), label, str(p)) for label, p in rows]
    return shift.source(
        name=name or kind,
        origin=f"{kind}:{root}",
        splits={"test": samples},
        class_names=wnids,
        split_rule=AS_DISTRIBUTED,
        catalog=kind,
        class_descriptions=describe_classes(wnids),
    )


def _index_folders(folder: Path, n_classes: int) -> list[tuple[int, Path]]:
    """``(class index, path)`` of ImageNet-V2's ``0`` ... ``999`` folders, by number."""
    subs = [p for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")]
    bad = [p.name for p in subs if not p.name.isdigit() or int(p.name) >= n_classes]
    if bad:
        raise DataSourceError(
            f"Folder(s) {sorted(bad)[:5]} in '{folder}' are not class indices 0 ... "
            f"{n_classes - 1}. ImageNet-V2 names its folders by class index; move other "
            "folders out of it."
        )
    return [
        (int(p.name), f) for p in sorted(subs, key=lambda p: int(p.name)) for f in _images_in(p)
    ]


def _register_shift(kind: str, layout: str) -> None:
    def loader(
        spec: str,
        *,
        name: str | None = None,
        split: str = "all",
        fractions: SplitFractions | None = None,
    ) -> ImageNetSource:
        return load_shift(spec, kind=kind, name=name)

    register_source(kind, _prefixed(kind), syntax=f"{kind}:ROOT", layout=layout,
                    example=f"{kind}:~/data/{kind}")(loader)  # fmt: skip


_register_shift(
    "imagenet-v2",
    "ImageNet-V2: folders 0/ ... 999/ (the class index in sorted "
    "WordNet-id order) of images; one test split.",
)
_register_shift(
    "imagenet-r",
    "ImageNet-R: 200 WordNet-id folders of renditions (under "
    "imagenet-r/); one test split, mapped onto ImageNet's classes by WordNet id.",
)
_register_shift(
    "imagenet-a",
    "ImageNet-A: 200 WordNet-id folders of natural adversarial "
    "examples (under imagenet-a/); one test split.",
)
_register_shift(
    "imagenet-sketch",
    "ImageNet-Sketch: 1000 WordNet-id folders of sketches (under sketch/); one test split.",
)


# --- Catalog ----------------------------------------------------------------------------------

register_dataset(DatasetInfo(
    name="imagenet", spec="imagenet:ROOT", task="classification",
    counts={"train": 1_281_167, "val": 50_000}, classes=1000,
    source="https://image-net.org/download.php (ILSVRC2012_img_train.tar, ILSVRC2012_img_val.tar,"
    " ILSVRC2012_devkit_t12.tar.gz), or Kaggle's imagenet-object-localization-challenge",
    layout="train/nXXXXXXXX/*.JPEG; val/ILSVRC2012_val_*.JPEG with LOC_val_solution.csv or "
    "ILSVRC2012_devkit_t12[.tar.gz] (or val/ in WordNet-id folders)",
    note="No labelled test split: val (the official validation set) is the test set "
    "(test_split: val); probes choose C on a part of train held out by id hash.",
    env="IMAGENET_DIR",
))  # fmt: skip
register_dataset(DatasetInfo(
    name="imagenet-v2", spec="imagenet-v2:ROOT", task="ood", counts={"test": 10_000},
    classes=1000, source="https://github.com/modestyachts/ImageNetV2 (matched-frequency)",
    layout="imagenetv2-matched-frequency-format-val/{0..999}/*.jpeg", env="IMAGENET_V2_DIR",
))  # fmt: skip
register_dataset(DatasetInfo(
    name="imagenet-r", spec="imagenet-r:ROOT", task="ood", counts={"test": 30_000}, classes=200,
    source="https://github.com/hendrycks/imagenet-r (imagenet-r.tar)",
    layout="imagenet-r/nXXXXXXXX/*.jpg (200 WordNet ids)", env="IMAGENET_R_DIR",
))  # fmt: skip
register_dataset(DatasetInfo(
    name="imagenet-a", spec="imagenet-a:ROOT", task="ood", counts={"test": 7_500}, classes=200,
    source="https://github.com/hendrycks/natural-adv-examples (imagenet-a.tar)",
    layout="imagenet-a/nXXXXXXXX/*.jpg (200 WordNet ids)", env="IMAGENET_A_DIR",
))  # fmt: skip
register_dataset(DatasetInfo(
    name="imagenet-sketch", spec="imagenet-sketch:ROOT", task="ood", counts={"test": 50_889},
    classes=1000, source="https://github.com/HaohanWang/ImageNet-Sketch",
    layout="sketch/nXXXXXXXX/*.JPEG (1000 WordNet ids)", env="IMAGENET_SKETCH_DIR",
))  # fmt: skip
