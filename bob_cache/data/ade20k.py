"""ADE20K scene parsing (``ADEChallengeData2016``) as distributed, for the dense probe and
``finetune --task semantic``.

``ade20k:ROOT`` reads ROOT = the unzipped ``ADEChallengeData2016``: ``images/training`` and
``images/validation`` (``.jpg``), ``annotations/training`` and ``annotations/validation``
(``.png`` masks paired by file stem) and ``objectInfo150.csv`` (or the zip's
``objectInfo150.txt``) naming the 150 classes. ``ade20k:ROOT/train`` or ``ade20k:ROOT/val``
names one split (what ``finetune --train``/``--val`` take). Splits: training → ``train``,
validation → ``val``; the public test images have no annotations, so val is where models are
scored, as in BoB (mmsegmentation's ADE20K setting).

Masks hold 0 for "other" (ignored) and ``v`` for class ``v`` of objectInfo150; they are read
as mmsegmentation's ``reduce_zero_label`` does: 0 becomes the ignore index (255) and ``v``
becomes label ``v - 1``, so the label space is exactly the 150 classes (no background) and mIoU
averages them. The class names are the first synonym of each ``Name`` (``building;edifice`` →
``building``). The segmentation record in the provenance names the folders of each split, so
the dense probe finds every row's mask.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bob_cache.data.catalog import DatasetInfo, register_dataset
from bob_cache.data.segfolder import SegFolderSource
from bob_cache.data.source import Sample, register_source
from bob_cache.data.splits import SplitFractions
from bob_cache.errors import AnnotationError, DataNotFoundError, DataSourceError, SpecError

PREFIX = "ade20k:"
SPLIT_DIRS = {"train": "training", "val": "validation"}
CLASS_FILES = ("objectInfo150.csv", "objectInfo150.txt")
NUM_CLASSES = 150
IGNORE_INDEX = 255
SOURCE_URL = "http://sceneparsing.csail.mit.edu/"
MASK_VALUES = "0 ('other') is ignored; value v is class v-1 of class_names (reduce_zero_label)"


@dataclass
class ADE20KSource(SegFolderSource):
    """ADE20K images (read as files), with where each split's masks are."""

    kind = "ade20k"


@register_source(
    "ade20k",
    lambda spec: spec.startswith(PREFIX),
    syntax="ade20k:ROOT (one split: ade20k:ROOT/train, ade20k:ROOT/val)",
    layout="ADEChallengeData2016: images/{training,validation}/*.jpg, "
    "annotations/{training,validation}/*.png and objectInfo150.csv (or .txt); splits train "
    "and val, mask 0 ignored.",
    example="ade20k:~/data/ADEChallengeData2016",
)
def load_ade20k(
    spec: str,
    *,
    name: str | None = None,
    split: str = "all",
    fractions: SplitFractions | None = None,
) -> ADE20KSource:
    """List ADE20K (see the module docstring)."""
    from bob_cache.finetune.seg_data import pair_by_stem

    root, chosen = parse_ade20k_spec(spec)
    classes = read_class_names(root)
    splits = {}
    for s in chosen:
        images, _ = pair_by_stem(root, *_split_dirs(root, s))
        splits[s] = [Sample(p.name, -1, str(p)) for p in images]
    segmentation: dict[str, Any] = {
        "root": str(root),
        "splits": dict.fromkeys(chosen, "."),
        "dirs": {s: {"images": f"images/{SPLIT_DIRS[s]}", "masks": f"annotations/{SPLIT_DIRS[s]}"}
                 for s in chosen},
        "ignore_index": IGNORE_INDEX,
        "reduce_zero_label": True,
        "mask_values": MASK_VALUES,
    }  # fmt: skip
    suffix = f"/{chosen[0]}" if len(chosen) == 1 else ""
    return ADE20KSource(
        name=name or "ade20k",
        origin=f"{PREFIX}{root}{suffix}",
        splits=splits,
        class_names=classes,
        segmentation=segmentation,
        catalog="ade20k",
    )


def parse_ade20k_spec(spec: str) -> tuple[Path, list[str]]:
    """``ade20k:ROOT`` → (ROOT, both splits); ``ade20k:ROOT/val`` → (ROOT, [val]).

    Raises:
        DataNotFoundError: ROOT lacks a folder or the class file (each missing one named).
    """
    where = Path(spec[len(PREFIX) :]).expanduser().resolve()
    by_dir = {d: s for s, d in SPLIT_DIRS.items()}
    if not where.is_dir() and (where.name in SPLIT_DIRS or where.name in by_dir):
        root, chosen = where.parent, [by_dir.get(where.name, where.name)]
    else:
        root, chosen = where, list(SPLIT_DIRS)
    expected = [f"{kind}/{SPLIT_DIRS[s]}/" for s in chosen for kind in ("images", "annotations")]
    missing = [str(root / e) for e in expected if not (root / e).is_dir()]
    if not any((root / f).is_file() for f in CLASS_FILES):
        missing.append(str(root / CLASS_FILES[0]) + " (or .txt)")
    if missing:
        raise DataNotFoundError(
            f"ADE20K at {root}: expected {', '.join(expected)} and {CLASS_FILES[0]} (or "
            f"{CLASS_FILES[1]}), as ADEChallengeData2016.zip unzips; missing: "
            f"{', '.join(missing)}. Fix: download ADEChallengeData2016.zip from {SOURCE_URL} "
            "and pass its unzipped folder as ade20k:ROOT."
        )
    return root, chosen


def _split_dirs(root: Path, split: str) -> tuple[Path, Path]:
    return root / "images" / SPLIT_DIRS[split], root / "annotations" / SPLIT_DIRS[split]


def read_class_names(root: Path) -> list[str]:
    """The 150 class names of ``objectInfo150.csv`` (comma-separated) or ``.txt`` (tabs), in
    ``Idx`` order, each its first synonym (the whole name where first synonyms repeat).

    Raises:
        AnnotationError: no ``Idx``/``Name`` columns, or not indices 1..150.
    """
    path = next(root / f for f in CLASS_FILES if (root / f).is_file())
    text = path.read_text(encoding="utf-8", errors="replace")
    delimiter = "\t" if "\t" in text.splitlines()[0] else ","
    try:
        rows = {
            int(r["Idx"]): r["Name"].strip()
            for r in csv.DictReader(text.splitlines(), delimiter=delimiter)
        }
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise AnnotationError(
            f"{path} is not ADE20K's class list ({type(exc).__name__}: {exc}); expected a header "
            "Idx,Ratio,Train,Val,Name and one row per class. Fix: restore the file from "
            f"ADEChallengeData2016.zip ({SOURCE_URL})."
        ) from exc  # fmt: skip
    if sorted(rows) != list(range(1, NUM_CLASSES + 1)):
        raise AnnotationError(
            f"{path} lists classes {first_indices(rows)}; expected Idx 1..{NUM_CLASSES} once each. "
            f"Fix: restore the file from ADEChallengeData2016.zip ({SOURCE_URL})."
        )
    names = [rows[i] for i in range(1, NUM_CLASSES + 1)]
    short = [re.split(r"[;,]", n)[0].strip() for n in names]
    return short if len(set(short)) == len(short) else names


def first_indices(rows: dict[int, str]) -> str:
    values = sorted(rows)
    more = ", ..." if len(values) > 5 else ""
    return f"{len(values)} indices ({', '.join(map(str, values[:5]))}{more})"


def load_ade20k_split(
    spec: str, *, classes: Sequence[str] | None = None, ignore_index: int | None = None
) -> Any:
    """One split of ADE20K as the semantic fine-tuning task reads it (a ``SegSet``).

    Args:
        spec: ``ade20k:ROOT/train`` or ``ade20k:ROOT/val``.
        classes: must be None or ADE20K's own 150 names.
        ignore_index: the value stored 0 becomes (default 255; outside 0..149).
    """
    from bob_cache.finetune.seg_data import SegSet, pair_by_stem

    root, chosen = parse_ade20k_spec(spec)
    if len(chosen) != 1:
        raise DataSourceError(
            f"'{spec}' names both ADE20K splits; fine-tuning takes one per option. Fix: pass "
            f"--train {PREFIX}{root}/train --val {PREFIX}{root}/val."
        )
    names = read_class_names(root)
    if classes is not None and list(classes) != names:
        raise SpecError(
            f"--classes gives {len(classes)} names but ADE20K's come from its objectInfo150 "
            f"({NUM_CLASSES} classes). Fix: drop --classes."
        )
    ignore = IGNORE_INDEX if ignore_index is None else int(ignore_index)
    if 0 <= ignore < NUM_CLASSES:
        raise SpecError(
            f"--ignore-index {ignore} is an ADE20K class label (0..{NUM_CLASSES - 1} after mask "
            f"value 0 is ignored). Fix: use {IGNORE_INDEX}."
        )
    images, masks = pair_by_stem(root, *_split_dirs(root, chosen[0]))
    return SegSet(root, images, masks, tuple(names), ignore, reduce_zero_label=True)


register_dataset(
    DatasetInfo(
        name="ade20k",
        spec="ade20k:ROOT",
        task="segmentation",
        counts={"train": 20210, "val": 2000},
        classes=NUM_CLASSES,
        source=SOURCE_URL,
        layout="ADEChallengeData2016/: images/{training,validation}/*.jpg, "
        "annotations/{training,validation}/*.png, objectInfo150.csv or .txt",
        note="train and val as distributed (the public test set has no annotations, so val is "
        "where models are scored, as in BoB); mask 0 ('other') is ignored, v is class v-1",
        env="ADE20K_DIR",
    )
)
