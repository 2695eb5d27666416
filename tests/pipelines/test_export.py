"""`bob-cache export`: a feature set as the embedding files autofaiss and clip-retrieval read,
checked by reading them back with numpy and pyarrow (embedding_reader's layouts)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from bob_cache.errors import SpecError
from bob_cache.pipelines.export import ExportConfig, export
from tests.conftest import blobs, write_feature_sets

N, DIM = 300, 16


@pytest.fixture
def store(tmp_path: Path) -> Path:
    x, y = blobs(N, dim=DIM)
    x[7] = np.nan  # a non-finite row is not exported
    write_feature_sets(
        tmp_path / "store", {"train": (x, y)}, dataset="toy", shard_rows=64,
        unreadable={"train": [3, 200]}, dtype="float16",
    )  # fmt: skip
    return tmp_path / "store"


def _config(store: Path, out: Path, **kw: object) -> ExportConfig:
    return ExportConfig(
        store=str(store), dataset="toy", backbone="model", out=str(out), quiet=True, **kw
    )


def _expected(store: Path) -> tuple[np.ndarray, np.ndarray]:
    from bob_cache.stores import open_store

    fs = open_store(store).feature_sets()[0]
    x = np.asarray(fs.features[:], dtype=np.float32)
    keep = np.asarray(fs.array("valid")[:], bool) & np.isfinite(x).all(axis=1)
    return np.flatnonzero(keep), x


def test_npy_layout_holds_every_usable_row_in_order(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "emb"
    summary = export(_config(store, out, rows_per_file=100))
    rows, x = _expected(store)
    assert summary.rows == len(rows) == N - 3 and summary.action == "written"
    emb = sorted((out / "img_emb").glob("*.npy"))
    meta = sorted((out / "metadata").glob("*.parquet"))
    assert [p.stem.split("_")[-1] for p in emb] == [p.stem.split("_")[-1] for p in meta]
    assert len(emb) == len(summary.files) >= 3  # 64-row shards packed into ≤ 100-row files
    arrays = [np.load(p) for p in emb]
    assert all(a.dtype == np.float16 and len(a) <= 100 for a in arrays)
    tables = [pq.read_table(p).to_pandas() for p in meta]
    assert [len(a) for a in arrays] == [len(t) for t in tables]
    got = np.concatenate(arrays).astype(np.float32)
    table = np.concatenate([t["row"].to_numpy() for t in tables])
    np.testing.assert_array_equal(table, rows)
    np.testing.assert_array_equal(got, x[rows])
    ids = np.concatenate([t["id"].to_numpy() for t in tables])
    assert list(ids[:3]) == ["train/00000", "train/00001", "train/00002"]
    manifest = json.loads((out / "export.json").read_text())
    assert manifest["rows"] == len(rows) and manifest["format"] == "npy"


def test_parquet_layout_has_an_embedding_column(store: Path, tmp_path: Path) -> None:
    out = tmp_path / "pq"
    summary = export(_config(store, out, format="parquet"))
    rows, x = _expected(store)
    table = pq.read_table(sorted((out / "emb").glob("*.parquet"))[0])
    assert summary.dtype == "float32" and table.num_rows == len(rows)
    emb = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    np.testing.assert_allclose(emb, x[rows])
    np.testing.assert_array_equal(table.column("label").to_numpy(), blobs(N, dim=DIM)[1][rows])


def test_a_second_run_is_a_no_op_and_a_killed_run_is_finished(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bob_cache.stores import feature_set

    out = tmp_path / "emb"

    def die(step: str) -> None:
        if step == "export:file-written":
            raise KeyboardInterrupt("killed")

    monkeypatch.setattr(feature_set, "crash_point", die)
    with pytest.raises(KeyboardInterrupt):
        export(_config(store, out, rows_per_file=100))
    assert not (out / "export.json").exists()  # unfinished, and it says so
    monkeypatch.undo()
    first = export(_config(store, out, rows_per_file=100))
    assert first.action == "written" and not list(out.rglob(".*tmp-*"))
    again = export(_config(store, out, rows_per_file=100))
    assert again.action == "up-to-date" and again.rows == first.rows
    other = export(_config(store, out, rows_per_file=1000))  # other options: written again
    assert other.action == "written" and len(list((out / "img_emb").glob("*.npy"))) == 1


def test_bad_options_are_refused(store: Path, tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="--format must be one of npy, parquet"):
        _config(store, tmp_path, format="csv")
    with pytest.raises(SpecError, match="--rows-per-file must be at least 1"):
        _config(store, tmp_path, rows_per_file=0)


def test_cli_exports_and_reports(cli, store: Path, tmp_path: Path) -> None:
    out = tmp_path / "cli-emb"
    args = ("export", "--store", store, "--dataset", "toy", "--backbone", "model", "--out", out)
    result = cli(*args, "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert (
        summary["rows"] == N - 3 and summary["format"] == "npy" and summary["action"] == "written"
    )
    again = cli(*args)
    assert again.exit_code == 0 and "up to date" in again.output
    wrong = cli(*args[:-2], "--out", tmp_path / "x", "--format", "csv")
    assert wrong.exit_code == 1 and "--format must be one of npy, parquet" in wrong.output


def test_an_incomplete_set_is_refused_with_the_fix(store: Path, tmp_path: Path) -> None:
    from bob_cache.errors import StoreError
    from bob_cache.stores import open_store

    open_store(store, mode="a").feature_sets()[0].uncommit([1])
    with pytest.raises(
        StoreError, match=r"incomplete \(1 shard\(s\) missing\).*same `bob-cache extract`"
    ):
        export(_config(store, tmp_path / "out"))
    assert not (tmp_path / "out").exists()  # nothing written
