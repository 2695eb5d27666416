"""Queries on real extracted features: by image (same backbone, rebuilt from provenance),
by id and by vector, through the Python API and the CLI, and their bad inputs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest

from bob_cache.errors import (
    DataNotFoundError,
    ImageTooLargeError,
    IndexNotFoundError,
    InvalidRowError,
    QueryError,
    SpecMismatchError,
    UnknownIdError,
    WeightsError,
)
from bob_cache.pipelines.index import IndexConfig, build_index
from bob_cache.pipelines.query import QueryConfig, Searcher, query
from bob_cache.stores import open_store
from tests.conftest import TINY, run_cli, write_image_folder
from tests.pipelines.conftest import BROKEN_ID


def searcher(store: Path, **kw: object) -> Searcher:
    return Searcher.open(QueryConfig(str(store), "photos", "test_resnet", **kw))


def test_a_stored_image_finds_itself_first_with_the_same_features(photo_store) -> None:
    store, photos = photo_store
    s = searcher(store)
    image = sorted(photos.glob("cat/*.jpg"))[0]
    table = s.search_images([image, image.read_bytes()], k=3)
    top = table[table["rank"] == 1]
    assert top["id"].tolist() == ["cat/" + image.name] * 2
    assert top["score"].min() > 0.9999  # same backbone, weights and preprocessing
    assert top["class"].tolist() == ["cat", "cat"]
    assert list(table.columns) == ["query", "rank", "row", "id", "label", "class", "score"]


def test_id_and_vector_queries_agree_with_brute_force(photo_store) -> None:
    store, _ = photo_store
    s = searcher(store)
    x = s.fs.features[:].astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    by_vector = s.search_vectors(x[4], k=5)
    assert by_vector["row"].tolist() == np.argsort(-(x @ x[4]))[:5].tolist()
    by_id = s.search_ids([str(s.ids[4])], k=4)
    assert 4 not in by_id["row"].tolist()  # the query row itself is left out
    assert by_id["row"].tolist() == by_vector["row"].tolist()[1:]
    frame = query(str(store), dataset="photos", backbone="test_resnet", vectors=x[:2], k=2)
    assert frame["query"].tolist() == [0, 0, 1, 1]


def test_bad_queries_get_clear_errors(photo_store, tmp_path: Path) -> None:
    store, _ = photo_store
    s = searcher(store)
    with pytest.raises(UnknownIdError, match="No row with id 'cat/nope.jpg'.*Did you mean"):
        s.search_ids(["cat/nope.jpg"])
    with pytest.raises(QueryError, match=r"shape \(3,\).*Pass \(N, \d+\) vectors"):
        s.search_vectors(np.zeros(3))
    with pytest.raises(QueryError, match="Pass -k 15 or less"):
        s.search_vectors(np.ones(s.fs.dim), k=16)
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8\xff garbage")
    with pytest.raises(QueryError, match="Cannot decode '.*broken.jpg' as an image"):
        s.search_images([broken])
    with pytest.raises(DataNotFoundError, match="does not exist"):
        s.search_images([tmp_path / "absent.png"])
    with pytest.raises(QueryError, match="exactly one of"):
        query(str(store), dataset="photos", backbone="test_resnet")


def test_weights_file_recorded_in_provenance_is_needed_for_image_queries(
    tmp_path: Path,
) -> None:
    import timm
    import torch

    weights = tmp_path / "w.pth"
    torch.save(timm.create_model("test_resnet", pretrained=False).state_dict(), weights)
    photos = write_image_folder(tmp_path / "photos", splits=("",), per_class=2)
    options = [o for o in TINY if o != "--random-init"]
    done = run_cli("extract", "--data", photos, "--store", tmp_path / "s", "--weights", weights,
                   *options)  # fmt: skip
    assert done.returncode == 0, done.stderr
    build_index(IndexConfig(str(tmp_path / "s"), "photos", "test_resnet", quiet=True))
    moved = weights.rename(tmp_path / "moved.pth")
    image = next(photos.glob("cat/*"))
    with pytest.raises(WeightsError, match="Pass the same checkpoint with --weights"):
        searcher(tmp_path / "s").search_images([image], k=1)
    found = searcher(tmp_path / "s", weights=str(moved)).search_images([image], k=1)
    assert found["score"].iloc[0] > 0.999
    other = tmp_path / "other.pth"
    torch.save(timm.create_model("test_resnet", pretrained=False).state_dict(), other)
    with pytest.raises(SpecMismatchError, match="does not reproduce its spec"):
        searcher(tmp_path / "s", weights=str(other)).search_images([image], k=1)


def test_query_cli_prints_json_and_fails_cleanly(photo_store, tmp_path: Path) -> None:
    store, photos = photo_store
    image = sorted(photos.glob("coffee/*"))[0]
    base = ["query", "--store", store, "--dataset", "photos", "--backbone", "test_resnet"]
    done = run_cli(*base, "--image", image, "-k", "2", "--json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert rows[0]["id"] == f"coffee/{image.name}" and rows[0]["query"] == str(image)
    dim = open_store(store).feature_sets()[0].dim
    np.save(tmp_path / "v.npy", np.ones((2, dim + 1), np.float32))
    bad = run_cli(*base, "--vectors", tmp_path / "v.npy")
    assert bad.returncode == 1 and "Traceback" not in bad.stderr
    assert f"Pass (N, {dim}) vectors" in bad.stderr.replace("\n", "")
    none = run_cli(*base)
    assert none.returncode == 1 and "exactly one of --image, --id or --vectors" in none.stderr


def test_top_level_api_and_lean_hits(photo_store) -> None:
    import bob_cache

    store, _ = photo_store
    s = bob_cache.Searcher.open(bob_cache.QueryConfig(str(store), "photos", "test_resnet"))
    hits = s.search(s.fs.features[:2], k=3)
    assert hits.rows.shape == (2, 3) and hits.rows[:, 0].tolist() == [0, 1]
    records = hits.records()
    assert records[1][0] == {
        "rank": 1, "row": 1, "id": str(s.ids[1]), "label": int(s.labels[1]),
        "class": s.class_names[s.labels[1]], "score": pytest.approx(1.0, abs=1e-5),
    }  # fmt: skip
    table = bob_cache.query(str(store), dataset="photos", backbone="test_resnet", ids=[s.ids[0]])
    assert table["query_id"].unique().tolist() == [str(s.ids[0])]


# --- inputs that cannot hurt ----------------------------------------------------------------
def test_ragged_non_finite_and_misshapen_vectors_are_refused(photo_store) -> None:
    store, _ = photo_store
    s = searcher(store)
    dim = s.fs.dim
    nan_row, big_row = [0.5] * dim, [0.5] * dim
    nan_row[3], big_row[0] = float("nan"), 1e39
    cases = {
        "ragged": ([[1.0, 2.0], [1.0]], r"rows of different lengths \(1, 2\)"),
        "nan": ([[0.5] * dim, nan_row], r"Query vector\(s\) 1 contain NaN or inf"),
        "inf": ([[float("inf")] * dim], "contain NaN or inf"),
        "beyond float32": ([big_row], "beyond float32's range"),
        "text": ([["a"] * dim], r"do not form an \(N, D\) array of numbers"),
        "wrong dim": ([[1.0] * (dim - 1)], rf"Pass \(N, {dim}\) vectors"),
    }
    for name, (vectors, message) in cases.items():
        with pytest.raises(QueryError, match=message):
            s.search(vectors)
        with pytest.raises(QueryError, match=message):  # the table API (and the CLI) too
            s.search_vectors(np.asarray(vectors, dtype=object) if name == "ragged" else vectors)


def test_an_id_of_an_unreadable_row_is_refused_with_its_reason(unindexed_store) -> None:
    s = Searcher.open(QueryConfig(str(unindexed_store), "photos", "test_resnet"))
    row = int(np.flatnonzero(~s.valid)[0])
    assert str(s.ids[row]) == BROKEN_ID and not np.isfinite(s.fs.features[row]).all()
    reason = str(s.fs.group["error"][row])
    assert reason
    with pytest.raises(InvalidRowError, match=r"has no features: its image could not be read"):
        s.search_ids(["cat/cat_00.png", BROKEN_ID], k=2)
    with pytest.raises(QueryError, match=re.escape(reason[:40])):  # InvalidRowError is one
        s.search_by_ids([BROKEN_ID], k=1)
    assert len(s.search_ids(["cat/cat_00.png"], k=2)) == 2


def test_a_set_without_an_index_is_searched_exactly(unindexed_store) -> None:
    s = Searcher.open(QueryConfig(str(unindexed_store), "photos", "test_resnet"))
    assert s.exact and s.index_name is None and s.index_kind == "exact (no index built)"
    assert "No index is built" in (s.note or "") and "bob-cache index build" in (s.note or "")
    x = s.fs.features[:].astype(np.float32)
    rows = np.flatnonzero(s.valid)
    assert s.n_indexed == len(rows) == 9
    unit = x[rows] / np.linalg.norm(x[rows], axis=1, keepdims=True)
    rng = np.random.default_rng(0)
    queries = x[rows[:4]] + rng.normal(0, 0.05, size=(4, x.shape[1])).astype(np.float32)
    truth = rows[np.argsort(-(queries @ unit.T), axis=1)[:, :6]]
    assert s.search(queries, k=6).rows.tolist() == truth.tolist()
    own = s.search_ids([str(s.ids[rows[0]])], k=8)["row"].tolist()
    order = rows[np.argsort(-(unit @ unit[0]))]
    assert own == order[order != rows[0]].tolist()  # every other valid row, exact order
    with pytest.raises(IndexNotFoundError, match="has no retrieval index"):
        Searcher.open(QueryConfig(str(unindexed_store), "photos", "test_resnet", index="nope"))


def test_image_headers_are_checked_before_any_pixel_is_decoded(
    photo_store, blank_png, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from PIL import ImageFile

    from bob_cache.pipelines.query import decode_image, image_size

    store, _ = photo_store
    s = searcher(store)
    decoded: list[tuple[int, int]] = []
    load = ImageFile.ImageFile.load
    monkeypatch.setattr(ImageFile.ImageFile, "load", lambda im: decoded.append(im.size) or load(im))
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(blank_png(20_000, 20_000))
    with pytest.raises(
        ImageTooLargeError, match=r"too large to decode.*over the 40 MP per-image limit"
    ):
        image_size(bomb)
    with pytest.raises(ImageTooLargeError, match=r"8000 × 6000 = 48.0 MP, over the 40 MP"):
        decode_image(blank_png(8000, 6000))
    with pytest.raises(ImageTooLargeError, match=r"100 × 100 = 0.0 MP, over the 0.005 MP"):
        decode_image(blank_png(100, 100), max_pixels=5000)
    with pytest.raises(ImageTooLargeError, match=r"3 images .* 108.0 MP together, over the 100"):
        s.search_by_images([blank_png(6000, 6000)] * 3, k=1, max_request_pixels=100_000_000)
    with pytest.raises(ImageTooLargeError, match="per-image limit"):
        s.search_images([blank_png(64, 64), bomb], k=1)  # the good one is not decoded either
    assert decoded == []
    assert decode_image(blank_png(64, 48)).size == (64, 48) and set(decoded) == {(64, 48)}


def test_images_are_decoded_and_embedded_a_bounded_number_of_pixels_at_a_time(
    photo_store, blank_png
) -> None:
    store, _ = photo_store
    s = searcher(store)

    class Recorder:  # stands in for the backbone: records what each forward receives
        def __init__(self) -> None:
            self.groups: list[list[tuple[int, int]]] = []

        def embed(self, images: list) -> np.ndarray:
            self.groups.append([im.size for im in images])
            return np.ones((len(images), s.fs.dim), np.float32)

    s._embedder = recorder = Recorder()
    sizes = [(100, 100), (100, 50), (100, 100), (100, 100), (40, 40)]
    hits = s.search_by_images([blank_png(*wh) for wh in sizes], k=2, max_image_pixels=20_000)
    assert hits.rows.shape == (5, 2)
    assert recorder.groups == [[(100, 100), (100, 50)], [(100, 100), (100, 100)], [(40, 40)]]
    assert all(sum(w * h for w, h in g) <= 20_000 for g in recorder.groups)
