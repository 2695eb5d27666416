"""Optional extras: the missing-extra error, and one FAISS package per install."""

from __future__ import annotations

import logging
import sys
from importlib import metadata
from pathlib import Path

import pytest

from bob_cache import extras
from bob_cache.errors import BobCacheError, DeviceError
from bob_cache.extras import (
    FAISS_SWAP,
    FaissInstallError,
    MissingExtraError,
    faiss_fix,
    faiss_gpu_hint,
    import_faiss,
    require,
)
from tests.conftest import blobs, write_feature_sets


def test_a_missing_extra_is_a_user_error_naming_the_extra_and_the_command(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    require("serve", "The query service")  # installed here: nothing raised
    monkeypatch.setitem(sys.modules, "fastapi", None)  # as if not installed
    with pytest.raises(MissingExtraError) as caught:
        require("serve", "The query service")
    assert isinstance(caught.value, BobCacheError) and isinstance(caught.value, ImportError)
    assert str(caught.value) == (
        "The query service needs the 'serve' extra (fastapi not installed): "
        "pip install 'bob-cache[serve]'."
    )


def test_a_submodule_extra_counts_as_missing_when_its_parent_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setitem(extras.EXTRA_MODULES, "report", ("matplotlib.colors",))
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.delitem(sys.modules, "matplotlib.colors", raising=False)
    with pytest.raises(MissingExtraError, match=r"pip install 'bob-cache\[report\]'"):
        require("report", "The report")


def _installed(monkeypatch: pytest.MonkeyPatch, *names: str) -> None:
    """Make importlib.metadata see exactly ``names`` among the FAISS distributions."""
    real = metadata.distribution

    def distribution(name: str) -> metadata.Distribution:
        if name in (extras.FAISS_CPU, *extras.FAISS_GPU):
            if name not in names:
                raise metadata.PackageNotFoundError(name)
            return real("faiss-cpu")  # any object: only its existence is read
        return real(name)

    monkeypatch.setattr(metadata, "distribution", distribution)
    import_faiss.cache_clear()


@pytest.fixture(autouse=True)
def _fresh_faiss_check() -> None:
    import_faiss.cache_clear()
    yield
    import_faiss.cache_clear()


def test_two_faiss_packages_warn_once_with_the_command_that_keeps_one(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _installed(monkeypatch, "faiss-cpu", "faiss-gpu-cu12")
    with caplog.at_level(logging.WARNING, logger="bob_cache.extras"):
        faiss = import_faiss()
        assert import_faiss() is faiss  # checked once per process
    (record,) = caplog.records
    fix = "pip uninstall -y faiss-cpu && pip install --force-reinstall --no-deps faiss-gpu-cu12"
    assert "Both faiss-cpu and faiss-gpu-cu12 are installed" in record.getMessage()
    assert record.getMessage().endswith(f"Keep one: {fix}")
    assert faiss_gpu_hint() == f"keep one FAISS package: {fix}"


def test_one_faiss_package_is_quiet_and_the_gpu_hint_is_the_swap(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    _installed(monkeypatch, "faiss-cpu")
    with caplog.at_level(logging.WARNING, logger="bob_cache.extras"):
        import_faiss()
    assert caplog.records == []
    assert faiss_gpu_hint() == (
        "on a CUDA machine, swap in FAISS's GPU build: "
        "pip uninstall -y faiss-cpu && pip install faiss-gpu-cu12"
    )
    assert FAISS_SWAP in Path(__file__).parents[2].joinpath("README.md").read_text()
    _installed(monkeypatch, "faiss-gpu-cu12")
    assert "faiss-gpu-cu12 is installed" in faiss_gpu_hint()


def test_a_faiss_module_removed_under_its_package_says_what_to_reinstall(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    _installed(monkeypatch, "faiss-gpu-cu12")  # its files went with an uninstalled faiss-cpu
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(FaissInstallError) as caught:
        import_faiss()
    assert isinstance(caught.value, BobCacheError)
    assert str(caught.value).endswith(
        "(faiss-gpu-cu12 installed): pip install --force-reinstall --no-deps faiss-gpu-cu12."
    )
    assert faiss_fix([]) == "pip install --force-reinstall --no-deps faiss-cpu"


def test_index_build_on_the_gpu_without_gpu_faiss_names_the_swap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from bob_cache.pipelines.index import IndexConfig, build_index
    from bob_cache.retrieval import faiss_ops

    write_feature_sets(tmp_path / "store", {"train": blobs(200)})
    monkeypatch.setattr(faiss_ops, "gpu_available", lambda: False)
    _installed(monkeypatch, "faiss-cpu")
    config = IndexConfig(str(tmp_path / "store"), "toy", "model", gpu=True, quiet=True)
    with pytest.raises(DeviceError) as caught:
        build_index(config)
    assert str(caught.value) == (
        "--gpu was requested but faiss sees no GPU. Drop --gpu, or on a CUDA machine, swap in "
        "FAISS's GPU build: pip uninstall -y faiss-cpu && pip install faiss-gpu-cu12."
    )
