"""An S3 server that stops answering mid-run (a real moto server, stopped after the command
has opened the store): every stage ends with the documented message and exit 1, never a
crash log, and the same command succeeds once the server is back."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from tests.conftest import TINY


@pytest.fixture
def s3(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """A moto server of this test's own (stopping it must not break other tests)."""
    import boto3
    import s3fs
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    url = f"http://{host}:{port}"
    for key, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                       "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": url,
                       "AWS_MAX_ATTEMPTS": "1"}.items():  # fmt: skip
        monkeypatch.setenv(key, value)
    boto3.client("s3", endpoint_url=url).create_bucket(Bucket="bob")
    s3fs.S3FileSystem.clear_instance_cache()
    yield {"server": server, "prefix": f"s3://bob/{uuid.uuid4().hex[:8]}"}
    server.stop()
    s3fs.S3FileSystem.clear_instance_cache()


def stop_after(monkeypatch: pytest.MonkeyPatch, module: Any, name: str, server: Any) -> None:
    """Stop ``server`` right after ``module.name`` returns (the store is open by then)."""
    real: Callable[..., Any] = getattr(module, name)

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        out = real(*args, **kwargs)
        server.stop()
        return out

    monkeypatch.setattr(module, name, wrapped)


def said(result: Any) -> str:
    return " ".join(result.output.split())


@pytest.mark.parametrize("stage", ["probe", "index"])
def test_a_server_stopped_mid_run_gives_the_documented_message(
    cli, s3: dict[str, Any], monkeypatch: pytest.MonkeyPatch, stage: str
) -> None:
    import bob_cache.pipelines.index as index_stage
    import bob_cache.pipelines.probe as probe_stage

    store, results = f"{s3['prefix']}/store", f"{s3['prefix']}/results"
    done = cli("extract", "--data", "builtin:digits", "--limit", "30", "--store", store, *TINY)
    assert done.exit_code == 0, done.output
    common = ("--store", store, "--dataset", "digits", "--backbone", "test_resnet")
    if stage == "probe":  # the features are read after the store opened
        stop_after(monkeypatch, probe_stage, "select_feature_sets", s3["server"])
        failed = cli("probe", *common, "--method", "knn", "--k", "3", "--results", results)
    else:
        stop_after(monkeypatch, index_stage, "select_feature_sets", s3["server"])
        failed = cli("index", "build", *common, "--kind", "flat")
    assert failed.exit_code == 1, failed.output  # not 3: not a bug
    assert "The object store stopped answering" in said(failed)
    assert "AWS_ENDPOINT_URL" in said(failed) and "rerun the same command" in said(failed)
    assert "crash" not in said(failed)


def test_results_written_to_a_stopped_server_give_the_documented_message(
    cli, s3: dict[str, Any], monkeypatch: pytest.MonkeyPatch, tmp_path: Any
) -> None:
    import bob_cache.pipelines.probe as probe_stage

    store = tmp_path / "store"  # local features, results on S3
    assert cli("extract", "--data", "builtin:digits", "--limit", "30", "--store", store,
               *TINY).exit_code == 0  # fmt: skip
    stop_after(monkeypatch, probe_stage, "load_probe_data", s3["server"])
    failed = cli("probe", "--store", store, "--dataset", "digits", "--backbone", "test_resnet",
                 "--method", "knn", "--k", "3", "--results", f"{s3['prefix']}/results")  # fmt: skip
    assert failed.exit_code == 1, failed.output
    assert "cannot be reached" in said(failed) or "stopped answering" in said(failed)
