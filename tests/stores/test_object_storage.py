"""Every artifact on an S3-compatible server (moto on loopback, through the environment as a
user would configure it): feature sets, a FAISS index, probe heads, OOD detector state, the
results table and the battle's metadata file; and one clear message when the endpoint or the
credentials are wrong."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bob_cache.errors import StoreError
from bob_cache.stores.results import ResultsTable
from tests.conftest import TINY


def test_results_table_round_trip_and_concurrent_appends(s3_env: str) -> None:
    table = ResultsTable.open(f"{s3_env}/results")
    assert table.read().empty and table.files("*") == []
    row = {c: None for c in ("run_id", "stage", "dataset", "split", "backbone", "feature_key",
                             "method", "setting", "metric", "seed", "versions", "time",
                             "train_rows", "val_rows", "protocol")}  # fmt: skip
    for i in range(3):  # three writers, three objects: none rewrites another's
        table.append([{**row, "value": float(i), "config_hash": f"h{i}", "versions": {}}])
    assert sorted(table.read()["value"]) == [0.0, 1.0, 2.0]
    assert table.config_hashes() == {"h0", "h1", "h2"}
    assert len(table.files("part-*.parquet")) == 3
    table.write_bytes("backbones-x.json", b'{"a": 1}')
    assert json.loads(table.read_bytes("backbones-x.json")) == {"a": 1}


def test_a_wrong_endpoint_gives_one_message_with_the_fix(s3_env: str) -> None:
    options = {"endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": "s",
               "config_kwargs": {"retries": {"max_attempts": 1}, "connect_timeout": 2}}  # fmt: skip
    table = ResultsTable.open(f"{s3_env}/results", storage_options=options)
    with pytest.raises(StoreError, match="cannot be reached.*AWS_ENDPOINT_URL"):
        table.write_bytes("x.json", b"{}")
    with pytest.raises(StoreError, match="cannot be reached"):
        table.read()


@pytest.mark.slow
def test_every_artifact_lives_on_s3_through_the_cli(cli, s3_env: str, tmp_path: Path) -> None:
    store, results = f"{s3_env}/store", f"{s3_env}/results"
    ok = cli("extract", "--data", "builtin:digits", "--limit", "60", "--store", store, *TINY)
    assert ok.exit_code == 0, ok.output
    shifted = cli("shift", "--data", "builtin:digits", "--out", tmp_path / "shifted",
                  "--corruption", "gaussian_noise", "--severity", "5", "--split", "test",
                  "--limit", "60", "--json")  # fmt: skip
    copy = json.loads(shifted.stdout)["outputs"][0]["data"]
    assert cli("extract", "--data", copy, "--name", "noisy", "--store", store, *TINY).exit_code == 0
    common = ("--store", store, "--dataset", "digits", "--backbone", "test_resnet")
    probed = cli("probe", *common, "--method", "linear", "--results", results, "--json")
    assert probed.exit_code == 0, probed.output
    assert json.loads(probed.stdout)["heads"]  # the head was stored on S3
    assert cli("index", "build", *common).exit_code == 0
    found = cli("query", *common, "--id", "digits/00002", "-k", "3", "--json")
    assert found.exit_code == 0, found.output
    ood = cli("ood", "--store", store, "--backbone", "test_resnet", "--id", "digits",
              "--detect", "noisy", "--detector", "knn,mahalanobis", "--knn-k", "5",
              "--results", results, "--json")  # fmt: skip
    assert ood.exit_code == 0, ood.output
    assert {d["state"] for d in json.loads(ood.stdout)["detection"]} == {"fitted"}
    again = cli("ood", "--store", store, "--backbone", "test_resnet", "--id", "digits",
                "--detect", "noisy", "--detector", "knn,mahalanobis", "--knn-k", "5",
                "--results", results, "--json")  # fmt: skip
    assert {d["state"] for d in json.loads(again.stdout)["detection"]} == {"stored"}
    frame = ResultsTable.open(results).read()
    assert {"probe", "ood"} <= set(frame.stage)
    listed = cli("ls", store, "--heads", "--json")
    assert listed.exit_code == 0 and "digits/train" in listed.stdout


def test_a_store_at_an_unreachable_endpoint_exits_1_with_the_fix(
    cli, s3_env: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    done = cli("ls", f"{s3_env}/store")
    assert done.exit_code == 1
    text = " ".join(done.output.split())
    assert "cannot be reached" in text and "AWS_ENDPOINT_URL" in text
