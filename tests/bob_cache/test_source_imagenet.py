"""ImageNet as distributed and its shifts, on tiny copies written here in the exact layouts:
ILSVRC2012 train folders with a flat val labelled by the devkit (folder or .tar.gz, meta.mat's
ILSVRC2012_IDs differing from the sorted order) or Kaggle's LOC_val_solution.csv, compared
with what torchvision.datasets.ImageNet reads from the same archives; ImageNet-V2/-R/-A/-Sketch
compared with torchvision's ImageFolder over the same folders."""

from __future__ import annotations

import csv
import io
import logging
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import scipy.io
from PIL import Image
from torchvision.datasets import ImageFolder

from bob_cache.data import parse_source
from bob_cache.data.catalog import get_dataset
from bob_cache.data.imagenet import lemmas, synsets
from bob_cache.errors import DataNotFoundError, DataSourceError

# Real WordNet ids: tench (not in ImageNet-R), goldfish and great white shark (in it).
WNIDS = ["n01440764", "n01443537", "n01484850"]
# The devkit numbers classes by ILSVRC2012_ID, which is not the sorted-wnid order.
ILSVRC_ID = {"n01484850": 1, "n01440764": 2, "n01443537": 3}
VAL_WNIDS = ["n01443537", "n01484850", "n01440764", "n01484850", "n01443537", "n01440764"]
MAT_FIELDS = ["ILSVRC2012_ID", "WNID", "words", "gloss", "num_children", "children",
              "wordnet_height", "num_train_images"]  # fmt: skip


def jpeg(seed: int, size: int = 16) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="JPEG")
    return out.getvalue()


def write_meta_mat(path: Path) -> None:
    """The devkit's meta.mat: leaf synsets with their ILSVRC2012_IDs, and one inner synset."""
    rows = [(ILSVRC_ID[w], w, lemmas()[w], 0) for w in WNIDS] + [(1001, "n01440000", "fish", 3)]
    synsets_ = np.empty((len(rows), 1), dtype=[(f, "O") for f in MAT_FIELDS])
    for i, (ident, wnid, words, children) in enumerate(rows):
        synsets_[i, 0] = (np.array([[ident]], np.uint16), np.array([wnid]), np.array([words]),
                          np.array(["a gloss"]), np.array([[children]], np.uint8),
                          np.arange(1, children + 1, dtype=np.uint16).reshape(1, -1),
                          np.array([[0]], np.uint8), np.array([[4]], np.uint16))  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    scipy.io.savemat(path, {"synsets": synsets_})


def write_devkit(root: Path) -> Path:
    """``ILSVRC2012_devkit_t12/data/{meta.mat, ILSVRC2012_validation_ground_truth.txt}``."""
    devkit = root / "ILSVRC2012_devkit_t12"
    write_meta_mat(devkit / "data" / "meta.mat")
    truth = "".join(f"{ILSVRC_ID[w]}\n" for w in VAL_WNIDS)
    (devkit / "data" / "ILSVRC2012_validation_ground_truth.txt").write_text(truth)
    return devkit


def write_ilsvrc(root: Path, *, per_class: int = 4, labels: str = "devkit") -> Path:
    """A tiny ILSVRC2012 copy: ``train/WNID/WNID_N.JPEG`` and a flat
    ``val/ILSVRC2012_val_0000000K.JPEG``, labelled by ``labels``: ``devkit`` (folder),
    ``archive`` (the devkit .tar.gz), ``kaggle`` (LOC_val_solution.csv, Kaggle's tree) or
    ``none``."""
    images = root / "ILSVRC" / "Data" / "CLS-LOC" if labels == "kaggle" else root
    for c, wnid in enumerate(WNIDS):
        (images / "train" / wnid).mkdir(parents=True)
        for i in range(per_class):
            (images / "train" / wnid / f"{wnid}_{i}.JPEG").write_bytes(jpeg(100 * c + i))
    (images / "val").mkdir(parents=True)
    for k in range(1, len(VAL_WNIDS) + 1):
        (images / "val" / f"ILSVRC2012_val_{k:08d}.JPEG").write_bytes(jpeg(1000 + k))
    if labels in ("devkit", "archive"):
        devkit = write_devkit(root)
        if labels == "archive":
            with tarfile.open(root / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tar:
                tar.add(devkit, arcname=devkit.name)
            shutil.rmtree(devkit)
    if labels == "kaggle":
        with open(root / "LOC_val_solution.csv", "w", newline="") as f:
            out = csv.writer(f)
            out.writerow(["ImageId", "PredictionString"])
            for k, wnid in enumerate(VAL_WNIDS, start=1):
                out.writerow([f"ILSVRC2012_val_{k:08d}", f"{wnid} 10 12 200 210 {wnid} 1 2 3 4 "])
    return root


def write_shift(root: Path, folders: dict[str, int], *, seed: int = 5000) -> Path:
    """Class folders (WordNet ids or V2's indices) of ``n`` JPEGs each, and a README.txt."""
    for c, (folder, n) in enumerate(folders.items()):
        (root / folder).mkdir(parents=True)
        for i in range(n):
            (root / folder / f"{i}.jpg").write_bytes(jpeg(seed + 10 * c + i))
    (root / "README.txt").write_text("as distributed")
    return root


def torchvision_imagenet(root: Path, split: str, monkeypatch: pytest.MonkeyPatch):
    """torchvision's ImageNet over the archives as image-net.org ships them (the md5 check of
    these tiny archives patched out, nothing else)."""
    import torchvision.datasets.imagenet as tv

    monkeypatch.setattr(tv, "_verify_archive", lambda *a, **k: None)
    return tv.ImageNet(str(root), split=split)


def test_ilsvrc_devkit_layout_equals_torchvision_imagenet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = write_ilsvrc(tmp_path / "imagenet")
    src = parse_source(str(root))  # recognised without the imagenet: prefix
    assert src.kind == "imagenet" and src.catalog == "imagenet" and src.name == "imagenet"
    assert src.origin == f"imagenet:{root}" and list(src.splits) == ["train", "val"]
    assert src.class_names == WNIDS  # sorted WordNet ids, not the devkit's ILSVRC2012_ID order
    # torchvision from the archives: the devkit .tar.gz and ILSVRC2012_img_val.tar
    tv_root = tmp_path / "tv"
    tv_root.mkdir()
    with tarfile.open(tv_root / "ILSVRC2012_devkit_t12.tar.gz", "w:gz") as tar:
        tar.add(root / "ILSVRC2012_devkit_t12", arcname="ILSVRC2012_devkit_t12")
    with tarfile.open(tv_root / "ILSVRC2012_img_val.tar", "w") as tar:
        for f in sorted((root / "val").iterdir()):
            tar.add(f, arcname=f.name)
    shutil.copytree(root / "train", tv_root / "train")
    for split in ("train", "val"):
        tv = torchvision_imagenet(tv_root, split, monkeypatch)
        assert tv.wnids == src.class_names
        ours = {Path(s.id).name: s.label for s in src.splits[split]}
        theirs = {Path(p).name: t for p, t in tv.samples}
        assert ours == theirs and len(ours) == len(src.splits[split])
    assert [", ".join(c) for c in tv.classes] == src.describe()["class_descriptions"]
    val = src.splits["val"]
    assert [src.class_names[s.label] for s in val] == VAL_WNIDS
    assert val[0].id == "val/ILSVRC2012_val_00000001.JPEG"
    assert src.read_bytes(val[2]) == jpeg(1003)
    # torchvision's prepared layout (val sorted into folders, meta.bin) reads the same
    prepared = parse_source(str(tv_root))
    assert prepared.kind == "imagenet" and prepared.class_names == WNIDS
    assert {Path(s.id).name: s.label for s in prepared.splits["val"]} == ours


@pytest.mark.parametrize("labels", ["archive", "kaggle"])
def test_devkit_archive_and_kaggle_csv_give_the_same_labels(tmp_path: Path, labels: str) -> None:
    expected = parse_source(str(write_ilsvrc(tmp_path / "devkit")))
    src = parse_source(f"imagenet:{write_ilsvrc(tmp_path / labels, labels=labels)}")
    assert src.class_names == expected.class_names
    for split in ("train", "val"):
        assert [s.id for s in src.splits[split]] == [s.id for s in expected.splits[split]]
        assert [s.label for s in src.splits[split]] == [s.label for s in expected.splits[split]]
    assert src.fingerprint() == expected.fingerprint()  # same files, same labels
    assert parse_source(src.origin).splits == src.splits


def test_missing_label_files_are_named_and_unlabeled_val_rows_counted(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    bare = write_ilsvrc(tmp_path / "bare", labels="none")
    with pytest.raises(DataNotFoundError, match=r"no labels.*LOC_val_solution.csv.*"
                       r"ILSVRC2012_validation_ground_truth.txt.*sort val into"):  # fmt: skip
        parse_source(str(bare))  # flat ILSVRC2012_val_* files: recognised, and refused
    root = write_ilsvrc(tmp_path / "partial")
    (root / "ILSVRC2012_devkit_t12" / "data" / "meta.mat").unlink()
    with pytest.raises(DataNotFoundError, match="missing data/meta.mat. Extract the whole"):
        parse_source(str(root))
    kaggle = write_ilsvrc(tmp_path / "kaggle", labels="kaggle")
    solution = kaggle / "LOC_val_solution.csv"
    solution.write_text("\n".join(solution.read_text().splitlines()[:-2]) + "\n")  # 2 lost
    with caplog.at_level(logging.WARNING, logger="bob_cache.data.imagenet"):
        src = parse_source(str(kaggle))
    assert [s.label for s in src.splits["val"]][-2:] == [-1, -1]
    assert "2 of 6 val images have no label" in caplog.text
    with pytest.raises(DataNotFoundError, match="no train/ or val/ folder"):
        parse_source(f"imagenet:{tmp_path / 'bare' / 'train'}")


def test_imagenet_r_and_a_use_their_200_wordnet_ids_like_imagefolder(tmp_path: Path) -> None:
    r_root = write_shift(tmp_path / "dl" / "imagenet-r", {"n01443537": 2, "n01494475": 3})
    src = parse_source(f"imagenet-r:{tmp_path / 'dl'}")  # the archive's imagenet-r/ inside
    assert (src.kind, src.catalog, list(src.splits)) == ("imagenet-r", "imagenet-r", ["test"])
    assert src.class_names == list(synsets("imagenet_r_synsets.txt"))
    assert len(src.class_names) == 200
    folder = ImageFolder(str(r_root))
    theirs = [(Path(p).relative_to(r_root).as_posix(), folder.classes[t])
              for p, t in folder.samples]  # fmt: skip
    assert theirs == [(s.id, src.class_names[s.label]) for s in src.splits["test"]]
    assert src.describe()["class_descriptions"][src.class_names.index("n01443537")].startswith(
        "goldfish"
    )
    a_root = write_shift(tmp_path / "imagenet-a", {"n01498041": 1, "n01531178": 2})
    a = parse_source(f"imagenet-a:{a_root}")
    assert a.class_names == list(synsets("imagenet_a_synsets.txt")) and a.name == "imagenet-a"
    assert [a.class_names[s.label] for s in a.splits["test"]] == ["n01498041"] + ["n01531178"] * 2
    write_shift(tmp_path / "bad-r", {"n01443537": 1, "n01440764": 1})  # tench is not in -R
    with pytest.raises(DataSourceError, match="n01440764' is not one of its classes"):
        parse_source(f"imagenet-r:{tmp_path / 'bad-r'}")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataNotFoundError, match=r"no images in class folders. Expected nX"):
        parse_source(f"imagenet-a:{tmp_path / 'empty'}")


def test_imagenet_v2_folders_are_class_indices_not_sorted_names(tmp_path: Path) -> None:
    root = write_shift(tmp_path / "imagenetv2-matched-frequency-format-val",
                       {"0": 1, "2": 2, "10": 1})  # fmt: skip
    src = parse_source(f"imagenet-v2:{tmp_path}")
    full = list(synsets())
    assert src.class_names == full and len(full) == 1000 and full[0] == "n01440764"
    folder = ImageFolder(str(root))  # sorts "0" < "10" < "2": its targets are not the classes
    by_folder = {Path(p).relative_to(root).as_posix(): int(folder.classes[t])
                 for p, t in folder.samples}  # fmt: skip
    assert {s.id: s.label for s in src.splits["test"]} == by_folder
    assert [s.label for s in src.splits["test"]] == [0, 2, 2, 10]
    write_shift(tmp_path / "bad", {"0": 1, "1000": 1})
    with pytest.raises(DataSourceError, match=r"\['1000'\].*not class indices 0 ... 999"):
        parse_source(f"imagenet-v2:{tmp_path / 'bad'}")


def test_imagenet_sketch_and_the_catalog(tmp_path: Path) -> None:
    write_shift(tmp_path / "sketch", {"n01440764": 2, "n15075141": 1})
    src = parse_source(f"imagenet-sketch:{tmp_path}")
    assert [src.class_names[s.label] for s in src.splits["test"]] == ["n01440764"] * 2 + [
        "n15075141"
    ]
    assert src.splits["test"][0].id == "n01440764/0.jpg"
    assert src.read_bytes(src.splits["test"][2]) == jpeg(5010)
    expected = {"imagenet": ({"train": 1_281_167, "val": 50_000}, 1000),
                "imagenet-v2": ({"test": 10_000}, 1000), "imagenet-r": ({"test": 30_000}, 200),
                "imagenet-a": ({"test": 7_500}, 200),
                "imagenet-sketch": ({"test": 50_889}, 1000)}  # fmt: skip
    for name, (counts, classes) in expected.items():
        info = get_dataset(name)
        assert (info.counts, info.classes) == (counts, classes)
        assert info.env.startswith("IMAGENET") and info.source.startswith("https://")
        assert info.spec == f"{name}:ROOT"
