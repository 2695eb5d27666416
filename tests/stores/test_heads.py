"""Probe heads beside a feature set, on every backend: round trip, listing, a killed write,
damage, staleness and a feature-key mismatch."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from zarr.storage import MemoryStore

from bob_cache.errors import HeadDamagedError, HeadMismatchError, StaleHeadError
from bob_cache.stores import FeatureSet, FeatureStore, open_store
from bob_cache.stores import feature_set as feature_set_module
from bob_cache.stores.head_store import (
    HeadParams,
    HeadRecord,
    check_head,
    count_heads,
    incomplete_heads,
    list_heads,
    list_store_heads,
    open_set,
    read_head,
    write_head,
)
from tests.conftest import blobs, write_feature_sets

K, D = 3, 8


@pytest.fixture(params=["local", "memory-store", "memory-url"])
def opener(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], FeatureStore]:
    """Opens (for writing) one store holding toy train/test sets of one key."""
    location = {
        "local": tmp_path / "store",
        "memory-store": MemoryStore(),
        "memory-url": f"memory://heads-{uuid.uuid4().hex}",
    }[request.param]
    x, y = blobs(150, classes=K, dim=D)
    write_feature_sets(location, {"train": (x[:100], y[:100]), "test": (x[100:], y[100:])})
    return lambda: open_store(location, mode="a")


def train_set(store: FeatureStore) -> FeatureSet:
    return store.get("toy/train/model.tag/feat00000001")


def params(seed: int = 0) -> HeadParams:
    rng = np.random.default_rng(seed)
    return HeadParams(
        rng.normal(size=(K, D)).astype(np.float32), rng.normal(size=K).astype(np.float32),
        rng.normal(size=D).astype(np.float32), rng.uniform(0.5, 2, size=D).astype(np.float32),
    )  # fmt: skip


def record(fs: FeatureSet, name: str = "abc123", **kw: object) -> HeadRecord:
    fields = dict(
        name=name, method="linear", setting="full", seed=0, C=0.5, classes=["a", "b", "c"],
        n_classes=K, dim=D, dataset="toy", backbone="model.tag", feature_key=fs.key,
        feature_set=fs.path,
        generations={fs.path: {str(s): g for s, g in fs.generations().items()}},
        sets_created={fs.path: fs.attrs.get("created")}, train_rows=100, val_rows=0,
        protocol="test", metrics={"top1": 0.9},
    )  # fmt: skip
    return HeadRecord(**{**fields, **kw})


def test_a_head_round_trips_and_is_listed(opener) -> None:
    fs = train_set(opener())
    p = params()
    write_head(fs, record(fs), p)
    write_head(fs, record(fs, "def456", setting="5-shot"), params(1))
    store = opener()
    fs = train_set(store)
    assert [r.name for r in list_heads(fs)] == ["def456", "abc123"]  # newest first
    assert count_heads(fs) == 2 and incomplete_heads(fs) == []
    got = read_head(fs, list_heads(fs)[1])
    for name in ("weight", "bias", "mean", "scale"):
        assert np.array_equal(getattr(got, name), getattr(p, name))
    x = np.random.default_rng(2).normal(size=(5, D)).astype(np.float32)
    assert np.array_equal(got.scores(x), ((x - p.mean) / p.scale) @ p.weight.T + p.bias)
    rows = list_store_heads(store)
    assert {(r["name"], r["state"]) for r in rows} == {("abc123", "ok"), ("def456", "ok")}
    write_head(fs, record(fs, "abc123", C=2.0), params(3))  # same name: replaced
    (again,) = [r for r in list_heads(train_set(opener())) if r.name == "abc123"]
    assert again.C == 2.0
    assert np.array_equal(read_head(fs, again).weight, params(3).weight)


@pytest.mark.parametrize("at", ["head-weight", "head-bias", "head-mean", "head-scale"])
def test_a_killed_write_leaves_no_head_that_looks_complete(opener, monkeypatch, at) -> None:
    def crash(step: str) -> None:
        if step == at:
            raise KeyboardInterrupt  # a kill after that array, before the record

    monkeypatch.setattr(feature_set_module, "crash_point", crash)
    fs = train_set(opener())
    with pytest.raises(KeyboardInterrupt):
        write_head(fs, record(fs), params())
    fs = train_set(opener())
    assert list_heads(fs) == [] and count_heads(fs) == 0
    assert incomplete_heads(fs) == ["abc123"]
    assert list_store_heads(opener())[0]["state"] == "incomplete"
    monkeypatch.undo()
    write_head(fs, record(fs), params())  # rerunning repairs it
    assert [r.name for r in list_heads(train_set(opener()))] == ["abc123"]


def test_a_damaged_head_is_named_with_the_refit_command(opener) -> None:
    fs = train_set(opener())
    write_head(fs, record(fs, setting="5-shot", seed=2), params())
    del fs.group["heads/abc123/weight"]
    fs = train_set(opener())
    (rec,) = list_heads(fs)
    with pytest.raises(HeadDamagedError) as exc:
        read_head(fs, rec)
    message = str(exc.value)
    assert "Probe head 'abc123'" in message and "'weight' array cannot be read" in message
    assert "bob-cache probe" in message and "--shots 5 --seeds 2" in message
    assert message.rstrip("`.").endswith("--force")


def test_wrong_shapes_are_refused_when_writing(opener) -> None:
    fs = train_set(opener())
    bad = params()
    bad.weight = bad.weight[:, :-1]
    with pytest.raises(HeadDamagedError, match=r"'weight' should be a finite \(3, 8\) array"):
        write_head(fs, record(fs), bad)


def test_stale_and_mismatched_heads_are_refused(opener) -> None:
    store = opener()
    fs = train_set(store)
    rec = record(fs)
    write_head(fs, rec, params())
    test = store.get("toy/test/model.tag/feat00000001")
    check_head(test, rec, open_set=lambda p: open_set(store, p))  # same key, nothing changed
    other = record(fs, feature_key="feat99999999")
    with pytest.raises(HeadMismatchError, match="fitted on feature key feat99999999") as exc:
        check_head(test, other, open_set=lambda p: open_set(store, p))
    assert "--feature feat99999999" in str(exc.value)
    x, y = blobs(150, classes=K, dim=D)
    fs.uncommit([1])  # a repaired shard, extracted again: a new generation
    fs.write_rows(x[:100], labels=y[:100], ids=[f"train/{i:05d}" for i in range(100)], shards=[1])
    with pytest.raises(StaleHeadError, match=r"shards \[1\] of .* recomputed") as exc:
        check_head(test, rec, open_set=lambda p: open_set(store, p))
    assert "bob-cache probe" in str(exc.value) and "--force" in str(exc.value)
    (row,) = list_store_heads(opener())
    assert row["state"].startswith("stale: shards [1]")
