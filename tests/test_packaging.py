"""The wheel installs everything under ``bob_cache`` and nothing with a generic top-level name."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from tests.conftest import REPO


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    build = tmp_path_factory.mktemp("build")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(REPO),
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(out),
        ],
        check=True,
        capture_output=True,
        timeout=300,
        cwd=build,
    )
    (path,) = out.glob("bob_cache-*.whl")
    return path


def test_wheel_holds_only_the_bob_cache_package(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names}
    assert top == {"bob_cache", f"{wheel.name.split('-')[0]}-{wheel.name.split('-')[1]}.dist-info"}
    expected = {"bob_cache/cli.py"}
    for folder, installed in (
        ("bob_cache", "bob_cache"),
        ("pipelines", "bob_cache/pipelines"),
        ("stores", "bob_cache/stores"),
    ):
        for source in (REPO / folder).rglob("*.py"):
            expected.add(f"{installed}/{source.relative_to(REPO / folder).as_posix()}")
    missing = sorted(expected - set(names))
    assert not missing, f"modules left out of the wheel: {missing}"
    assert not any(n.startswith("tests/") for n in names)


def test_cli_module_in_the_wheel_is_the_root_cli_and_is_the_entry_point(wheel: Path) -> None:
    archive = zipfile.ZipFile(wheel)
    assert archive.read("bob_cache/cli.py") == (REPO / "cli.py").read_bytes()
    entry_points = next(n for n in archive.namelist() if n.endswith("entry_points.txt"))
    assert "bob-cache = bob_cache.cli:main" in archive.read(entry_points).decode()
