"""The extraction stage end to end, in-process, on real images with a tiny random-init model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from bob_cache.backbones import create_backbone
from bob_cache.config import ExtractConfig
from bob_cache.data import parse_source
from bob_cache.errors import InvalidImageError, SpecMismatchError
from bob_cache.pipelines.extract import extract
from bob_cache.pipelines.writer import NON_FINITE, ShardWriter
from bob_cache.stores import open_store, resolve_layout
from bob_cache.stores.feature_set import FeatureSetRequest


def run(data: Path | str, store: Path, **kwargs: object):
    options = {
        "backbone": "test_resnet",
        "random_init": True,
        "image_size": 32,
        "workers": 0,
        "batch_size": 4,
        "shard_rows": 8,
        "quiet": True,
        **kwargs,
    }
    return extract(ExtractConfig(data=str(data), store=str(store), **options))


def arrays(store: Path) -> dict[str, dict[str, np.ndarray]]:
    return {
        fs.path: {
            name: fs.array(name)[:] for name in ("features", "labels", "ids", "valid", "error")
        }
        for fs in open_store(store).feature_sets()
    }


def test_features_equal_a_direct_forward_and_carry_provenance(
    image_folder: Path, tmp_path: Path
) -> None:
    summary = run(image_folder, tmp_path / "s")
    assert summary.rows == summary.rows_computed == 36
    assert [(f["split"], f["rows"], f["dim"], f["complete"]) for f in summary.feature_sets] == [
        ("train", 18, 96, True),
        ("val", 18, 96, True),
    ]
    fs = open_store(tmp_path / "s").get(summary.feature_sets[1]["group"])
    source = parse_source(str(image_folder))
    bb = create_backbone("test_resnet", random_init=True, image_size=32)
    images = torch.cat([bb.preprocess(source.open_image(s)) for s in source.splits["val"]])
    with torch.no_grad():
        expected = bb(images)["final"].numpy()
    np.testing.assert_allclose(fs.features[:].astype(np.float32), expected, rtol=2e-3, atol=2e-3)
    assert fs.array("labels")[:].tolist() == [s.label for s in source.splits["val"]]
    a = fs.attrs
    assert a["dataset"]["class_names"] == ["astronaut", "cat", "coffee"]
    assert a["dataset"]["fingerprint"] == source.fingerprint()
    assert (
        a["backbone"]["slug"] == "test_resnet.random-s0" and a["backbone"]["weights"]["seed"] == 0
    )
    assert a["spec"]["preprocessing"]["input_size"] == [3, 32, 32]
    assert {"torch", "timm", "zarr", "numpy", "python"} <= set(a["versions"])
    assert fs.complete and fs.n_invalid == 0 and a["created"] and a["device"] == "cpu"


def test_rerun_is_a_no_op_and_new_data_makes_a_new_feature_set(
    image_folder: Path, tmp_path: Path
) -> None:
    first = run(image_folder, tmp_path / "s")
    again = run(image_folder, tmp_path / "s")
    assert again.rows_computed == 0 and again.shards_skipped == first.shards_computed == 6
    extra = image_folder / "train" / "cat" / "extra.png"
    extra.write_bytes((image_folder / "train" / "cat" / "cat_00.png").read_bytes())
    changed = run(image_folder, tmp_path / "s")
    assert changed.rows_computed == 37
    keys = {r["key"] for r in open_store(tmp_path / "s").list()}
    assert len(keys) == 2  # the old feature set is kept, never silently reused


def test_unreadable_images_become_invalid_rows_or_stop_a_strict_run(
    image_folder: Path, tmp_path: Path
) -> None:
    bad = sorted((image_folder / "val").rglob("*.jpg"))[-1]
    bad.write_bytes(bad.read_bytes()[:300])  # truncated JPEG, late in the split
    summary = run(image_folder, tmp_path / "s", split="val")
    assert summary.invalid_rows == 1
    assert summary.invalid_examples[0]["id"] == bad.relative_to(image_folder).as_posix()
    fs = open_store(tmp_path / "s").get(summary.feature_sets[0]["group"])
    row = list(fs.array("ids")[:]).index(bad.relative_to(image_folder).as_posix())
    assert np.isnan(fs.features[row]).all() and not fs.array("valid")[row]
    assert "truncated" in str(fs.array("error")[row]).lower() and fs.n_invalid == 1

    with pytest.raises(
        InvalidImageError, match=r"--strict makes this fatal; shards committed before it are kept"
    ):
        run(image_folder, tmp_path / "strict", split="val", strict=True)
    (strict_set,) = open_store(tmp_path / "strict").feature_sets()
    assert strict_set.missing_shards() == [2] and not strict_set.complete  # shards 0-1 kept


def test_several_layers_from_one_pass_each_get_a_feature_set(
    image_folder: Path, tmp_path: Path
) -> None:
    summary = run(image_folder, tmp_path / "s", split="train", layers=("final", "layer2", "-2"))
    sets = {(f["layer"], f["pool"]): f for f in summary.feature_sets}
    assert set(sets) == {("final", "head"), ("layer2", "avg"), ("layer3", "avg")}
    assert {k: f["dim"] for k, f in sets.items()} == {
        ("final", "head"): 96,
        ("layer2", "avg"): 48,
        ("layer3", "avg"): 192,
    }
    assert len({f["key"] for f in sets.values()}) == 3
    assert summary.rows_computed == 18  # one forward pass for all three


def test_parts_extracted_separately_equal_one_whole_run(tmp_path: Path) -> None:
    whole = run("builtin:digits", tmp_path / "whole", split="val", limit=40)
    first = run("builtin:digits", tmp_path / "parts", split="val", limit=40, part=(0, 2))
    assert first.rows_computed == 24 and not first.feature_sets[0]["complete"]
    second = run("builtin:digits", tmp_path / "parts", split="val", limit=40, part=(1, 2))
    assert second.rows_computed == 16 and second.feature_sets[0]["complete"]
    assert whole.feature_sets[0]["key"] == second.feature_sets[0]["key"]
    a, b = arrays(tmp_path / "whole"), arrays(tmp_path / "parts")
    for path in a:
        for name in a[path]:
            np.testing.assert_array_equal(a[path][name], b[path][name])


def test_loader_workers_give_identical_arrays(tmp_path: Path) -> None:
    run("builtin:digits", tmp_path / "w0", split="test", limit=24, workers=0)
    run("builtin:digits", tmp_path / "w2", split="test", limit=24, workers=2)
    a, b = arrays(tmp_path / "w0"), arrays(tmp_path / "w2")
    assert a.keys() == b.keys()
    for path in a:
        np.testing.assert_array_equal(a[path]["features"], b[path]["features"])


def test_a_different_layout_for_an_existing_set_is_refused_and_keeps_data(tmp_path: Path) -> None:
    run("builtin:digits", tmp_path / "s", split="val", limit=16)
    before = arrays(tmp_path / "s")
    with pytest.raises(SpecMismatchError, match="storage.shard_rows: stored 8, requested 16"):
        run("builtin:digits", tmp_path / "s", split="val", limit=16, shard_rows=16)
    after = arrays(tmp_path / "s")
    for path in before:
        np.testing.assert_array_equal(before[path]["features"], after[path]["features"])


def test_writer_marks_non_finite_model_outputs_invalid(tmp_path: Path) -> None:
    store = open_store(tmp_path / "s", mode="a")
    request = FeatureSetRequest(
        path="d/train/m.t/k", key="k", spec={"layer": "final", "pool": "head", "dtype": "float16"},
        provenance={"dataset": {"name": "d"}, "split": "train", "backbone": {"slug": "m.t"}},
        n_rows=4, dim=2,
    )  # fmt: skip
    fs = store.require(request, resolve_layout(chunk_rows=2, shard_rows=4))
    out = np.ones((4, 2), np.float32)
    out[2, 0] = np.inf
    with ShardWriter({"final": fs}, labels=np.zeros(4, np.int64), ids=list("abcd")) as writer:
        writer.put(np.arange(2), {"final": out[:2]}, ["", ""], ["h0", "h1"])
        writer.put(np.arange(2, 4), {"final": out[2:]}, ["", ""], ["h2", "h3"])
    assert fs.invalid_rows() == [("c", NON_FINITE)]
    assert fs.finalize() and fs.n_invalid == 1
    assert list(fs.array("digest")[:]) == ["h0", "h1", "h2", "h3"]
    assert list(fs.array("ids")[:]) == list("abcd")


def test_default_workers_use_every_spare_core_only_when_a_gpu_runs_the_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from bob_cache.config import resolve_workers

    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert resolve_workers(None, "cpu") == 8
    assert resolve_workers(None, "cuda") == 15
    assert resolve_workers(3, "cuda") == 3 and resolve_workers(0, "cpu") == 0
    monkeypatch.setattr("os.cpu_count", lambda: 2)
    assert resolve_workers(None, "cpu") == resolve_workers(None, "cuda") == 1
