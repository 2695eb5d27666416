"""Queries on real extracted features: by image (same backbone, rebuilt from provenance),
by id and by vector, through the Python API and the CLI, and their bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bob_cache.errors import (
    DataNotFoundError,
    QueryError,
    SpecMismatchError,
    UnknownIdError,
    WeightsError,
)
from bob_cache.pipelines.index import IndexConfig, build_index
from bob_cache.pipelines.query import QueryConfig, Searcher, query
from bob_cache.stores import open_store
from tests.conftest import TINY, run_cli, write_image_folder


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
