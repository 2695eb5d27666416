"""Extraction under many writers and any crash point, and the checks that keep a resumed set
honest (same images, same environment).

Parts run as real processes started at the same instant; crashes are injected in-process
between the store's write steps (``crash_point``), then the same extraction is rerun.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bob_cache.config import ExtractConfig
from bob_cache.errors import DataChangedError, MixedEnvironmentError
from bob_cache.pipelines import resume as resume_module
from bob_cache.pipelines.extract import extract
from bob_cache.stores import feature_set as feature_set_module
from bob_cache.stores import open_store
from bob_cache.stores.feature_set import ROW_ARRAYS

ARRAYS = ("features", *ROW_ARRAYS)
OPTIONS = {
    "backbone": "test_resnet", "random_init": True, "image_size": 32, "workers": 0,
    "batch_size": 8, "shard_rows": 16, "chunk_rows": 8, "quiet": True,
}  # fmt: skip
DIGITS = {"data": "builtin:digits", "split": "val", "limit": 80}  # 5 shards


class Killed(BaseException):
    """Stands for SIGKILL: nothing after it runs, no ``except Exception`` catches it."""


def run(store: Path, **kwargs: object):
    return extract(ExtractConfig(store=str(store), **{**OPTIONS, **DIGITS, **kwargs}))


def the_set(store: Path):
    (fs,) = open_store(store).feature_sets()
    return fs


def assert_same(a: Path, b: Path) -> None:
    fa, fb = the_set(a), the_set(b)
    assert fa.path == fb.path and fa.complete and fb.complete
    for name in ARRAYS:
        np.testing.assert_array_equal(fa.array(name)[:], fb.array(name)[:], err_msg=name)


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("reference") / "store"
    run(store)
    return store


@pytest.mark.parametrize("step", ["clear", "features", "labels", "digest", "error", "commit"])
def test_a_crash_at_any_write_step_then_the_same_command_equals_one_run(
    tmp_path: Path, reference: Path, monkeypatch: pytest.MonkeyPatch, step: str
) -> None:
    seen = {"n": 0}

    def crash(name: str) -> None:
        if name == step:
            seen["n"] += 1
            if seen["n"] == 3:  # the third shard dies mid-write
                raise Killed(step)

    monkeypatch.setattr(feature_set_module, "crash_point", crash)
    with pytest.raises(Killed):
        run(tmp_path / "store")
    monkeypatch.undo()
    kept = len(the_set(tmp_path / "store").committed_shards())
    assert kept == (3 if step == "commit" else 2)
    again = run(tmp_path / "store")
    assert again.shards_skipped == kept
    assert_same(reference, tmp_path / "store")


def _cli(store: Path, *extra: str) -> list[str]:
    args = [
        "extract", "--data", "builtin:digits", "--split", "val", "--limit", "80",
        "--backbone", "test_resnet", "--random-init", "--image-size", "32", "--workers", "0",
        "--batch-size", "8", "--shard-rows", "16", "--chunk-rows", "8", "--quiet",
    ]  # fmt: skip
    return [sys.executable, "-m", "bob_cache.cli", *args, "--store", str(store), *extra]


def test_parts_started_at_the_same_instant_finish_one_set(tmp_path: Path) -> None:
    # The reference runs the same CLI in a process of its own: the same torch thread count as
    # the parts (convolution sums, and so the last bits, can depend on it).
    reference = tmp_path / "reference"
    subprocess.run(_cli(reference), check=True, capture_output=True, timeout=300)
    store = tmp_path / "store"
    gate = tmp_path / "go"
    # Both processes import everything, then wait for the same file to appear.
    wait = (
        f"import pathlib,time\nwhile not pathlib.Path({str(gate)!r}).exists(): time.sleep(0.001)\n"
    )
    script = wait + (
        "import runpy,sys\nsys.argv=sys.argv[1:]\n"
        "runpy.run_module('bob_cache.cli', run_name='__main__')"
    )
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", script, "bob-cache", *_cli(store, "--part", f"{k}/2")[3:]],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for k in range(2)
    ]
    gate.touch()
    results = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err for _, err in results]
    assert_same(reference, store)
    fs = the_set(store)
    assert "--part" not in fs.attrs["command"] and "--limit 80" in fs.attrs["command"]
    before = fs.attrs["created"]
    run(store)  # a rerun finds nothing to do and rewrites nothing
    assert the_set(store).attrs["created"] == before


def test_an_image_replaced_by_one_of_the_same_size_is_caught_on_resume(
    image_folder: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    options = {"data": str(image_folder), "split": "train", "limit": None, "shard_rows": 4,
               "chunk_rows": 2}  # fmt: skip
    seen = {"n": 0}

    def crash(name: str) -> None:
        seen["n"] += name == "commit"
        if seen["n"] == 2:
            raise Killed(name)

    monkeypatch.setattr(feature_set_module, "crash_point", crash)
    with pytest.raises(Killed):
        run(tmp_path / "store", **options)
    monkeypatch.undo()
    fs = the_set(tmp_path / "store")
    assert fs.committed_shards() == [0, 1]
    victim = image_folder / str(fs.array("ids")[1])
    assert victim.suffix == ".jpg"
    size = victim.stat().st_size
    pixels = np.asarray(Image.open(victim)).copy()
    pixels[:8, :8] = 255 - pixels[:8, :8]
    Image.fromarray(pixels).save(victim)
    data = victim.read_bytes()[:size]
    victim.write_bytes(data + b"\0" * (size - len(data)))  # other bytes, the same size
    with pytest.raises(DataChangedError, match=r"1 image\(s\).*changed.*--overwrite"):
        run(tmp_path / "store", **options)
    assert the_set(tmp_path / "store").committed_shards() == [0, 1]  # nothing written
    again = run(tmp_path / "store", **options, overwrite=True)
    assert again.rows_computed == 18


def test_resuming_in_another_environment_needs_allow_mixed_and_is_recorded(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run(tmp_path / "store", part=(0, 2))
    real = resume_module.writer_identity

    def other_torch(device_type: str) -> dict[str, str]:
        return {**real(device_type), "torch": "9.9.9"}

    monkeypatch.setattr(resume_module, "writer_identity", other_torch)
    monkeypatch.setattr("bob_cache.pipelines.extract_single.writer_identity", other_torch)
    with pytest.raises(MixedEnvironmentError, match=r"torch .*9\.9\.9.*--allow-mixed"):
        run(tmp_path / "store")
    assert not the_set(tmp_path / "store").complete
    run(tmp_path / "store", allow_mixed=True)
    info = the_set(tmp_path / "store").info()
    assert info["complete"]
    mixed = {w["torch"]: w["shards"] for w in info["mixed"]}
    assert mixed["9.9.9"] == [1, 3] and sorted(mixed[real("cpu")["torch"]]) == [0, 2, 4]


def test_image_queries_embed_at_the_recorded_precision(tmp_path: Path) -> None:
    from bob_cache.backbones.rebuild import embedder_from_provenance

    run(tmp_path / "store", precision="bf16")
    fs = the_set(tmp_path / "store")
    embedder = embedder_from_provenance(fs.attrs)
    assert embedder.precision == "bf16"
    from bob_cache.data import parse_source

    source = parse_source("builtin:digits")
    images = [source.open_image(s) for s in source.splits["val"][:8]]
    np.testing.assert_allclose(
        embedder.embed(images), fs.features[:8].astype(np.float32), rtol=1e-2, atol=1e-2
    )
    assert json.dumps(fs.attrs["spec"]["precision"]) == '"bf16"'
