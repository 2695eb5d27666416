"""Revisited Oxford and Paris (revisitop) as distributed: ``jpg/`` and ``gnd_<name>.pkl``.

``revisitop:roxford5k:ROOT`` (or ``rparis6k``) reads ROOT holding ``jpg/*.jpg`` and
``gnd_roxford5k.pkl``, or the ``ROOT/datasets/roxford5k/`` folder revisitop's download script
makes. The ground truth (read by the restricted unpickler of :mod:`bob_cache.retrieval.gnd`)
names the database images (``imlist``), the query images (``qimlist``) and, per query, the
``bbx`` [x1, y1, x2, y2] of the queried object with its ``easy``/``hard``/``junk`` answers.

Two splits, as the protocol evaluates them: ``train`` is the database (every ``imlist`` image,
whole; the split retrieval-eval searches by default) and ``query`` holds the ``qimlist``
images, each cropped to its ``bbx`` with ``PIL.Image.crop`` after conversion to RGB, as
revisitop's ``example_process_images.py`` does (PIL rounds the float box). Ids are
``jpg/<name>.jpg`` in both splits, so ground-truth names match them by file stem. A query's
content digest covers its file's bytes and its box, so a changed box is a changed row; the
ground truth's path, sha256, the crop rule and every box are recorded under ``retrieval`` in
the provenance, where ``retrieval-eval --protocol gnd`` finds the file and the query split.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from bob_cache.data.catalog import DatasetInfo, register_dataset
from bob_cache.data.images import open_image_file
from bob_cache.data.source import DataSource, Sample, content_digest, register_source
from bob_cache.data.splits import SplitFractions
from bob_cache.errors import DataNotFoundError, DataSourceError, GroundTruthError, did_you_mean

PREFIX = "revisitop:"
DATASETS = ("roxford5k", "rparis6k")
DATABASE_SPLIT, QUERY_SPLIT = "train", "query"
QUERY_CROP = "bbx from gnd_{name}.pkl, PIL Image.crop of the RGB image (the float box rounded)"
SOURCE_URL = "http://cmp.felk.cvut.cz/revisitop/"


@dataclass
class RevisitopSource(DataSource):
    """Database images whole, query images cropped to their box (``location``: the path, or
    ``(path, bbx)`` for a query)."""

    ground_truth: str = ""
    ground_truth_sha256: str = ""
    boxes: dict[str, list[float]] = field(default_factory=dict)  # query id -> bbx

    kind = "revisitop"

    def open_image(self, sample: Sample) -> Image.Image:
        return self.load(sample)[0]

    def read_bytes(self, sample: Sample) -> bytes | None:
        """The file's bytes for a database image; None for a query (its pixels are a crop)."""
        if isinstance(sample.location, tuple):
            return None
        return Path(sample.location).read_bytes()

    def digest(self, sample: Sample) -> str:
        return self.load(sample)[1]

    def load(self, sample: Sample) -> tuple[Image.Image, str]:
        """Read once: a query's file is decoded, converted to RGB and cropped to its box, and
        its digest covers the file's bytes and the box."""
        if not isinstance(sample.location, tuple):
            return super().load(sample)
        path, bbx = sample.location
        data = Path(path).read_bytes()
        image = open_image_file(io.BytesIO(data), name=path).crop(tuple(bbx))
        return image, content_digest(data + _box_tag(bbx))

    def fingerprint_rows(self) -> list[Any]:
        rows: list[Any] = [("ground_truth", self.ground_truth_sha256)]
        for split, samples in self.splits.items():
            for s in samples:
                path, bbx = s.location if isinstance(s.location, tuple) else (s.location, None)
                rows.append((split, s.id, s.label, os.path.getsize(path), bbx))
        return rows

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "retrieval": {
                "ground_truth": self.ground_truth,
                "ground_truth_sha256": self.ground_truth_sha256,
                "database_split": DATABASE_SPLIT,
                "query_split": QUERY_SPLIT,
                "query_crop": QUERY_CROP.format(name=self.catalog),
                "query_bbx": self.boxes,
            },
        }


def _box_tag(bbx: tuple[float, ...] | list[float]) -> bytes:
    return b"\0crop:" + json.dumps([float(v) for v in bbx]).encode()


@register_source(
    "revisitop",
    lambda spec: spec.startswith(PREFIX),
    syntax="revisitop:roxford5k|rparis6k:ROOT",
    layout="jpg/*.jpg and gnd_<name>.pkl (or datasets/<name>/ of revisitop's download script); "
    "splits train (the database) and query (the 70 queries cropped to their bbx).",
    example="revisitop:roxford5k:~/data/revisitop",
)
def load_revisitop(
    spec: str,
    *,
    name: str | None = None,
    split: str = "all",
    fractions: SplitFractions | None = None,
) -> RevisitopSource:
    """List a revisitop dataset (see the module docstring)."""
    from bob_cache.retrieval.gnd import load_pickle, parse_ground_truth

    dataset, _, where = spec[len(PREFIX) :].partition(":")
    if dataset not in DATASETS or not where:
        raise DataSourceError(
            f"Data source '{spec}': expected revisitop:NAME:ROOT with NAME one of "
            f"{', '.join(DATASETS)}.{did_you_mean(dataset, DATASETS)} "
            "Example: revisitop:roxford5k:~/data/revisitop."
        )
    root, gnd_path = find_root(Path(where).expanduser().resolve(), dataset)
    raw = load_pickle(gnd_path)
    truth = parse_ground_truth(raw, gnd_path)
    boxes = _boxes(raw, truth.qimlist, gnd_path)
    files = _jpg_files(root)
    database = [_sample(root, n, files, gnd_path) for n in truth.imlist]
    queries = [
        Sample(s.id, -1, (s.location, tuple(boxes[i])))
        for i, s in enumerate(_sample(root, n, files, gnd_path, query=True) for n in truth.qimlist)
    ]
    return RevisitopSource(
        name=name or dataset,
        origin=f"{PREFIX}{dataset}:{root}",
        splits={DATABASE_SPLIT: database, QUERY_SPLIT: queries},
        catalog=dataset,
        ground_truth=str(gnd_path),
        ground_truth_sha256=hashlib.sha256(gnd_path.read_bytes()).hexdigest(),
        boxes={s.id: list(b) for s, b in zip(queries, boxes, strict=True)},
    )


def find_root(where: Path, dataset: str) -> tuple[Path, Path]:
    """The folder holding ``jpg/`` and ``gnd_<dataset>.pkl``: ``where`` itself or
    ``where/datasets/<dataset>``.

    Raises:
        DataNotFoundError: neither holds both (the missing file is named).
    """
    gnd_name = f"gnd_{dataset}.pkl"
    candidates = [where, where / "datasets" / dataset]
    for folder in candidates:
        if (folder / gnd_name).is_file() and (folder / "jpg").is_dir():
            return folder, folder / gnd_name
    folder = next((c for c in candidates if c.is_dir() and any(c.iterdir())), where)
    missing = [str(folder / p) for p in (gnd_name, "jpg/") if not (folder / p).exists()]
    raise DataNotFoundError(
        f"revisitop {dataset}: expected {gnd_name} and jpg/ in {where} (or in "
        f"{where / 'datasets' / dataset}, where revisitop's download script puts them); "
        f"missing: {', '.join(missing)}. Fix: download them from {SOURCE_URL} "
        "(python download.py in revisitop's repository) and pass that folder as ROOT."
    )


def _jpg_files(root: Path) -> set[str]:
    return {e.name for e in os.scandir(root / "jpg") if e.is_file()}


def _sample(
    root: Path, image: str, files: set[str], gnd_path: Path, *, query: bool = False
) -> Sample:
    filename = image if image.lower().endswith(".jpg") else f"{image}.jpg"
    if filename not in files:
        role = "query" if query else "database image"
        raise DataNotFoundError(
            f"The {role} '{image}' named by {gnd_path.name} has no file {filename} in "
            f"{root / 'jpg'}. Fix: restore the complete jpg/ folder from {SOURCE_URL} (every "
            f"qimlist and imlist name of {gnd_path.name} must be there)."
        )
    return Sample(f"jpg/{filename}", -1, str(root / "jpg" / filename))


def _boxes(raw: dict[str, Any], qimlist: list[str], path: Path) -> list[tuple[float, ...]]:
    """Each query's ``bbx`` as four floats with x1 < x2 and y1 < y2."""
    boxes = []
    for q, entry in enumerate(raw["gnd"]):
        bbx = entry.get("bbx") if isinstance(entry, dict) else None
        try:
            box = tuple(float(v) for v in bbx)  # type: ignore[union-attr]
        except (TypeError, ValueError):
            box = ()
        if len(box) != 4 or not (box[0] < box[2] and box[1] < box[3]):
            raise GroundTruthError(
                f"{path}, query {q} ('{qimlist[q]}'): expected 'bbx' [x1, y1, x2, y2] with "
                f"x1 < x2 and y1 < y2, got {bbx!r:.80}. Fix: use revisitop's gnd_*.pkl as "
                "downloaded, whose every query has its box."
            )
        boxes.append(box)
    return boxes


for _name, _counts, _env in (
    ("roxford5k", {DATABASE_SPLIT: 4993, QUERY_SPLIT: 70}, "ROXFORD_DIR"),
    ("rparis6k", {DATABASE_SPLIT: 6322, QUERY_SPLIT: 70}, "RPARIS_DIR"),
):
    register_dataset(
        DatasetInfo(
            name=_name,
            spec=f"revisitop:{_name}:ROOT",
            task="retrieval",
            counts=_counts,
            classes=None,
            source=SOURCE_URL,
            layout=f"jpg/*.jpg and gnd_{_name}.pkl (or datasets/{_name}/ holding them)",
            note="train is the database (every image, whole); query holds the 70 queries "
            "cropped to their bbx, as the revisitop protocol evaluates them",
            env=_env,
        )
    )
