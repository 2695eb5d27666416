"""Decode once, extract many: ``--backbone A,B,C`` gives each backbone exactly the feature sets
(keys, provenance request, arrays) that separate runs give, resumes per backbone, and refuses
what it cannot share."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from bob_cache.config import ExtractConfig
from bob_cache.errors import SpecError
from bob_cache.pipelines.extract import extract
from bob_cache.stores import open_store
from tests.pipelines.test_many_writers import ARRAYS

# four preprocessings; test_efficientnet and test_vit share a resize (not a normalization)
BACKBONES = ("test_resnet", "test_efficientnet", "resnet18", "test_vit")
OPTIONS = {"data": "builtin:digits", "split": "val", "limit": 40, "random_init": True,
           "workers": 0, "batch_size": 8, "shard_rows": 16, "quiet": True}  # fmt: skip


def run(store: Path, backbone: str, **kwargs: object):
    return extract(ExtractConfig(store=str(store), backbone=backbone, **{**OPTIONS, **kwargs}))


def sets(store: Path) -> dict:
    return {fs.path: fs for fs in open_store(store).feature_sets()}


@pytest.fixture(scope="module")
def separate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("separate") / "store"
    for name in BACKBONES:
        run(store, name)
    return store


def test_four_backbones_from_one_decode_equal_four_runs(separate: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    summaries = run(store, ",".join(BACKBONES))
    assert [s.backbone.split(".")[0] for s in summaries] == list(BACKBONES)
    assert all(s.rows_computed == 40 for s in summaries)
    want, got = sets(separate), sets(store)
    assert sorted(want) == sorted(got) and len(got) == 4  # same paths, so same keys
    pre = {json.dumps(fs.attrs["spec"]["preprocessing"], sort_keys=True) for fs in got.values()}
    assert len(pre) == 4  # size, interpolation and normalization differ between them
    for path, fs in got.items():
        assert fs.attrs["request"] == want[path].attrs["request"]  # as if run alone
        for name in ARRAYS:
            np.testing.assert_array_equal(fs.array(name)[:], want[path].array(name)[:], name)


def test_each_backbone_resumes_only_its_missing_shards(separate: Path, tmp_path: Path) -> None:
    store = tmp_path / "store"
    run(store, ",".join(BACKBONES[:2]))  # the last two are new
    eff = next(fs for fs in open_store(store, mode="a").feature_sets() if "efficientnet" in fs.path)
    eff.uncommit([1])
    summaries = run(store, ",".join(BACKBONES))
    computed = {s.backbone.split(".")[0]: s.rows_computed for s in summaries}
    assert computed == {"test_resnet": 0, "test_efficientnet": 16, "resnet18": 40, "test_vit": 40}
    want = sets(separate)
    for path, fs in sets(store).items():
        np.testing.assert_array_equal(fs.features[:], want[path].features[:])


def test_what_cannot_be_shared_is_refused(tmp_path: Path, cli) -> None:
    with pytest.raises(SpecError, match="names a backbone twice"):
        run(tmp_path / "s", "test_vit,test_vit")
    with pytest.raises(SpecError, match="--decode pil"):
        run(tmp_path / "s", "test_vit,test_resnet", decode="torch")
    out = cli("extract", "--data", "builtin:digits", "--split", "val", "--limit", "16",
              "--backbone", "test_resnet,test_vit", "--random-init", "--workers", "0", "-q",
              "--store", tmp_path / "cli", "--json")  # fmt: skip
    assert out.exit_code == 0, out.output
    assert [s["rows_computed"] for s in json.loads(out.stdout)] == [16, 16]
