"""The revisitop source: Revisited Oxford/Paris as distributed (``jpg/`` + ``gnd_*.pkl``).

A tiny copy in the exact layout: twelve database images and three queries cut from
scikit-image's sample photos, and a ``gnd_roxford5k.pkl`` pickled as revisitop's files are
(plain dicts and lists, float ``bbx`` boxes), with the queries outside ``imlist`` as in the
real roxford5k (5,063 images, 4,993 in the database).
"""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bob_cache.data import parse_source
from bob_cache.data.catalog import get_dataset
from bob_cache.data.source import content_digest
from bob_cache.errors import DataNotFoundError, DataSourceError, GroundTruthError

LANDMARKS = ("astronaut", "coffee", "chelsea")
# query boxes with fractional corners (PIL rounds them), one per landmark
BOXES = ([10.6, 5.2, 80.4, 70.9], [20.0, 12.5, 95.5, 60.49], [3.3, 30.7, 64.8, 88.1])


def write_revisitop(root: Path, *, name: str = "roxford5k") -> Path:
    """``root/jpg/*.jpg`` (4 database images and 1 query per landmark) and
    ``root/gnd_<name>.pkl``: each query's easy answers are 2 images of its landmark, its hard
    answer the third, the fourth is junk."""
    import skimage.data as data

    (root / "jpg").mkdir(parents=True, exist_ok=True)
    imlist, qimlist, gnd = [], [], []
    for k, landmark in enumerate(LANDMARKS):
        photo = getattr(data, landmark)()
        for i in range(5):  # image 4 is the query
            crop = photo[20 * i : 20 * i + 120, 15 * i : 15 * i + 110]
            image = f"{landmark}_{i:06d}"
            Image.fromarray(crop).save(root / "jpg" / f"{image}.jpg", quality=90)
            (qimlist if i == 4 else imlist).append(image)
        first = 4 * k
        gnd.append({"bbx": BOXES[k], "easy": [first, first + 1], "hard": [first + 2],
                    "junk": [first + 3]})  # fmt: skip
    truth = {"imlist": imlist, "qimlist": qimlist, "gnd": gnd}
    with open(root / f"gnd_{name}.pkl", "wb") as f:
        pickle.dump(truth, f, protocol=2)
    return root


@pytest.fixture
def oxford(tmp_path: Path) -> Path:
    return write_revisitop(tmp_path / "roxford")


def test_database_is_whole_and_queries_are_their_own_split(oxford: Path) -> None:
    source = parse_source(f"revisitop:roxford5k:{oxford}")
    assert source.kind == "revisitop" and source.name == "roxford5k"
    assert source.catalog == "roxford5k" and source.class_names == []
    assert {k: len(v) for k, v in source.splits.items()} == {"train": 12, "query": 3}
    assert [s.id for s in source.splits["query"]] == [f"jpg/{n}_000004.jpg" for n in LANDMARKS]
    assert source.splits["train"][0].id == "jpg/astronaut_000000.jpg"
    assert {s.label for rows in source.splits.values() for s in rows} == {-1}
    again = parse_source(source.origin)  # workers re-parse the origin
    assert again.fingerprint() == source.fingerprint()
    # revisitop's download script layout: ROOT/datasets/roxford5k/{jpg,gnd_roxford5k.pkl}
    nested = oxford.parent / "revisitop"
    shutil.copytree(oxford, nested / "datasets" / "roxford5k")
    deep = parse_source(f"revisitop:roxford5k:{nested}")
    assert deep.origin == f"revisitop:roxford5k:{nested / 'datasets' / 'roxford5k'}"
    assert [s.id for s in deep.splits["query"]] == [s.id for s in source.splits["query"]]


def test_query_crops_equal_a_pil_crop_of_the_bbx(oxford: Path) -> None:
    source = parse_source(f"revisitop:roxford5k:{oxford}")
    for sample, bbx in zip(source.splits["query"], BOXES, strict=True):
        path = oxford / sample.id
        with Image.open(path) as im:
            expected = im.convert("RGB").crop(bbx)  # revisitop: pil_loader(...).crop(bbx)
        image, digest = source.load(sample)
        assert image.size == expected.size == (round(bbx[2]) - round(bbx[0]),
                                               round(bbx[3]) - round(bbx[1]))  # fmt: skip
        np.testing.assert_array_equal(np.asarray(image), np.asarray(expected))
        np.testing.assert_array_equal(np.asarray(source.open_image(sample)), np.asarray(expected))
        assert source.read_bytes(sample) is None  # the pixels are not the file's
        assert digest == source.digest(sample) != content_digest(path.read_bytes())
    database = source.splits["train"][0]
    image, digest = source.load(database)
    assert image.size == (110, 120)
    assert digest == content_digest((oxford / database.id).read_bytes())


def test_the_crop_and_every_box_are_in_the_provenance(oxford: Path) -> None:
    source = parse_source(f"revisitop:roxford5k:{oxford}")
    record = source.describe()["retrieval"]
    assert record["query_crop"].startswith("bbx from gnd_roxford5k.pkl, PIL Image.crop")
    assert record["query_bbx"] == {
        s.id: b for s, b in zip(source.splits["query"], BOXES, strict=True)
    }
    assert record["ground_truth"] == str(oxford / "gnd_roxford5k.pkl")
    assert (record["database_split"], record["query_split"]) == ("train", "query")
    # a moved box changes the query's digest and the dataset's fingerprint (so the feature key)
    truth = pickle.loads((oxford / "gnd_roxford5k.pkl").read_bytes())
    truth["gnd"][0]["bbx"] = [11.0, 5.2, 80.4, 70.9]
    (oxford / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(truth, protocol=2))
    moved = parse_source(f"revisitop:roxford5k:{oxford}")
    assert moved.fingerprint() != source.fingerprint()
    q = source.splits["query"][0]
    assert moved.digest(moved.splits["query"][0]) != source.digest(q)


def test_catalog_holds_the_official_counts() -> None:
    oxford, paris = get_dataset("roxford5k"), get_dataset("rparis6k")
    assert oxford.counts == {"train": 4993, "query": 70} and oxford.env == "ROXFORD_DIR"
    assert paris.counts == {"train": 6322, "query": 70} and paris.env == "RPARIS_DIR"
    assert oxford.spec == "revisitop:roxford5k:ROOT" and "revisitop" in oxford.source


def test_a_root_without_the_ground_truth_names_the_missing_file(tmp_path: Path) -> None:
    (tmp_path / "jpg").mkdir()
    with pytest.raises(DataNotFoundError, match=r"missing: .*gnd_roxford5k\.pkl.*Fix: download"):
        parse_source(f"revisitop:roxford5k:{tmp_path}")
    with pytest.raises(DataSourceError, match="Did you mean 'roxford5k'"):
        parse_source(f"revisitop:roxford:{tmp_path}")


def test_a_query_without_its_image_names_it_and_the_folder(oxford: Path) -> None:
    (oxford / "jpg" / "coffee_000004.jpg").unlink()
    with pytest.raises(DataNotFoundError) as err:
        parse_source(f"revisitop:roxford5k:{oxford}")
    message = str(err.value)
    assert "query 'coffee_000004'" in message and str(oxford / "jpg") in message
    assert "Fix: restore the complete jpg/ folder" in message


def test_a_query_without_a_box_is_refused(oxford: Path) -> None:
    truth = pickle.loads((oxford / "gnd_roxford5k.pkl").read_bytes())
    truth["gnd"][1]["bbx"] = [50, 10, 20, 40]  # x2 < x1
    (oxford / "gnd_roxford5k.pkl").write_bytes(pickle.dumps(truth, protocol=2))
    with pytest.raises(GroundTruthError, match=r"query 1 \('coffee_000004'\).*x1 < x2.*Fix"):
        parse_source(f"revisitop:roxford5k:{oxford}")
