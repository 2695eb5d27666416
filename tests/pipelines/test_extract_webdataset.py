"""Extraction from WebDataset shards: the stored set equals one from the same JPEGs as files;
``--part`` and a run killed mid-way give the single run's arrays; S3 shards through loader
worker processes."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from bob_cache.config import ExtractConfig
from bob_cache.pipelines.extract import extract
from bob_cache.stores import feature_set as feature_set_module
from tests.bob_cache.test_source_webdataset import direct_read, jpeg, laion_sample, write_shard
from tests.conftest import TINY
from tests.pipelines.test_many_writers import assert_same, the_set

OPTIONS = {
    "backbone": "test_resnet", "random_init": True, "image_size": 32, "workers": 0,
    "batch_size": 4, "shard_rows": 4, "chunk_rows": 2, "quiet": True,
}  # fmt: skip
N_SHARDS, PER_SHARD = 3, 6
BROKEN = "000010002"  # a truncated JPEG member


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, no ``except Exception`` catches it."""


def write_tars(root: Path) -> Path:
    for s in range(N_SHARDS):
        samples = [laion_sample(s, i) for i in range(PER_SHARD)]
        for key, members in samples:
            if key == BROKEN:
                members["jpg"] = jpeg(7)[:300]
        write_shard(root / f"{s:05d}.tar", samples)
    return root


@pytest.fixture(scope="module")
def tars(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tars(tmp_path_factory.mktemp("wds") / "shards")


def spec(tars: Path) -> str:
    return f"{tars}/{{00000..{N_SHARDS - 1:05d}}}.tar?split=train"


def run(data: str, store: Path, **kwargs: object) -> object:
    return extract(ExtractConfig(store=str(store), data=data, **{**OPTIONS, **kwargs}))


@pytest.fixture(scope="module")
def reference(tars: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("reference") / "store"
    run(spec(tars), store)
    return store


def test_the_cli_stores_the_shards_rows_like_the_same_files(
    cli, tars: Path, tmp_path: Path
) -> None:
    done = cli("extract", "--data", spec(tars), "--store", tmp_path / "wds", "--json", *TINY)
    assert done.exit_code == 0, done.output
    assert json.loads(done.stdout)["rows"] == N_SHARDS * PER_SHARD
    expected = direct_read(sorted(tars.glob("*.tar")))
    fs = the_set(tmp_path / "wds")
    assert fs.path.startswith("shards/train/") and fs.complete
    assert list(fs.array("ids")[:]) == [e["key"] for e in expected]
    assert list(fs.array("labels")[:]) == [int(e["cls"]) for e in expected]
    assert fs.attrs["dataset"]["class_names"] == ["0", "1", "2"]
    assert fs.attrs["dataset"]["kind"] == "webdataset"
    rows = zip(fs.array("ids")[:], fs.array("valid")[:], fs.array("error")[:], strict=True)
    invalid = {str(i): str(e) for i, v, e in rows if not v}
    assert list(invalid) == [BROKEN] and "Truncated" in invalid[BROKEN]
    # the same JPEGs as files, listed in tar order by a manifest: the same features row by row
    files = tmp_path / "files"
    files.mkdir()
    with open(tmp_path / "files.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "split", "id"])
        for e in expected:
            (files / f"{e['key']}.jpg").write_bytes(e["jpg"])
            writer.writerow([f"files/{e['key']}.jpg", e["cls"].decode(), "train", e["key"]])
    done = cli("extract", "--data", tmp_path / "files.csv", "--store", tmp_path / "csv", *TINY)
    assert done.exit_code == 0, done.output
    from_files = the_set(tmp_path / "csv")
    for name in ("features", "labels", "ids", "digest", "valid"):
        np.testing.assert_array_equal(fs.array(name)[:], from_files.array(name)[:], err_msg=name)


def test_parts_together_equal_one_run(
    tars: Path, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bob_cache.data import parse_source, webdataset

    read: list[tuple[str, int]] = []
    real = webdataset.read_range

    def spy(url: str, offset: int, size: int) -> bytes:
        read.append((url, offset))
        return real(url, offset, size)

    monkeypatch.setattr(webdataset, "read_range", spy)
    first = run(spec(tars), tmp_path / "store", part=(0, 2))
    assert first.shards_computed == 3 and not the_set(tmp_path / "store").complete
    rows = parse_source(spec(tars)).splits["train"]
    mine = [r for r in range(len(rows)) if (r // OPTIONS["shard_rows"]) % 2 == 0]
    assert sorted(read) == sorted(rows[r].location[:2] for r in mine)  # its members, no others
    monkeypatch.undo()
    run(spec(tars), tmp_path / "store", part=(1, 2))
    assert_same(reference, tmp_path / "store")


def test_a_run_killed_mid_way_resumes_to_the_single_run(
    tars: Path, reference: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen = {"n": 0}

    def crash(step: str) -> None:
        seen["n"] += step == "commit"
        if seen["n"] == 3:
            raise Killed(step)

    monkeypatch.setattr(feature_set_module, "crash_point", crash)
    with pytest.raises(Killed):
        run(spec(tars), tmp_path / "store")
    monkeypatch.undo()
    assert the_set(tmp_path / "store").committed_shards() == [0, 1, 2]  # killed after the 3rd
    again = run(spec(tars), tmp_path / "store")  # re-reads committed rows' digests first
    assert again.shards_skipped == 3 and again.rows_computed == N_SHARDS * PER_SHARD - 12
    assert_same(reference, tmp_path / "store")


def test_s3_shards_through_loader_workers_equal_local_shards(
    tars: Path, reference: Path, s3_env: str, tmp_path: Path
) -> None:
    import s3fs

    fs = s3fs.S3FileSystem()
    for path in sorted(tars.glob("*.tar")):
        fs.put_file(str(path), f"{s3_env}/shards/{path.name}")
    remote = f"{s3_env}/shards/{{00000..{N_SHARDS - 1:05d}}}.tar?split=train"
    run(remote, tmp_path / "store", workers=2)  # forked readers make their own S3 sessions
    assert_same(reference, tmp_path / "store")
