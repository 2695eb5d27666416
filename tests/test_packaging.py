"""The wheel installs everything under ``bob_cache`` and nothing with a generic top-level name."""

from __future__ import annotations

import ast
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
    expected |= {
        f"bob_cache/pipelines/{page.relative_to(REPO / 'pipelines').as_posix()}"
        for page in (REPO / "pipelines" / "static").glob("*.html")
    }
    expected |= {
        f"bob_cache/pipelines/templates/{template.name}"
        for template in (REPO / "pipelines" / "templates").glob("*.j2")
    }
    assert "bob_cache/pipelines/static/search.html" in expected  # the query service's page
    assert "bob_cache/pipelines/templates/report.html.j2" in expected  # the report's template
    missing = sorted(expected - set(names))
    assert not missing, f"modules and data files left out of the wheel: {missing}"
    assert not any(n.startswith("tests/") for n in names)


def test_cli_module_in_the_wheel_is_the_root_cli_and_is_the_entry_point(wheel: Path) -> None:
    archive = zipfile.ZipFile(wheel)
    assert archive.read("bob_cache/cli.py") == (REPO / "cli.py").read_bytes()
    entry_points = next(n for n in archive.namelist() if n.endswith("entry_points.txt"))
    assert "bob-cache = bob_cache.cli:main" in archive.read(entry_points).decode()


# --- the layering: core and stores import no command, no CLI, and no stage at import time ---

FACE = ("bob_cache.cli", "bob_cache.commands")
STAGES = ("bob_cache.pipelines", "pipelines")


def _imported_names(node: ast.AST) -> list[str]:
    if isinstance(node, ast.Import):
        return [alias.name for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.module and not node.level:
        return [node.module, *(f"{node.module}.{alias.name}" for alias in node.names)]
    return []


def _under(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def forbidden_imports(source: str) -> list[str]:
    """Imports of the face anywhere, and of a stage at module import time (not in a def)."""
    found: list[str] = []

    def visit(node: ast.AST, *, in_function: bool) -> None:
        for name in _imported_names(node):
            if _under(name, FACE) or (not in_function and _under(name, STAGES)):
                found.append(f"line {node.lineno}: {name}")
        nested = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        for child in ast.iter_child_nodes(node):
            visit(child, in_function=nested)

    visit(ast.parse(source), in_function=False)
    return found


def test_the_import_check_catches_face_and_stage_imports() -> None:
    assert forbidden_imports("from bob_cache.commands.common import out") != []
    assert forbidden_imports("from bob_cache import cli") != []
    assert forbidden_imports("import bob_cache.cli") != []
    assert forbidden_imports("from bob_cache.pipelines import get_stage") != []
    assert forbidden_imports("if True:\n    import bob_cache.pipelines.extract") != []
    assert forbidden_imports("class A:\n    from bob_cache.pipelines import probe") != []
    assert forbidden_imports("def f():\n    from bob_cache.pipelines import probe") == []
    assert forbidden_imports("def f():\n    from bob_cache.commands import common") != []
    assert forbidden_imports("from bob_cache.stores import open_store") == []


def test_core_and_stores_import_no_command_and_no_stage() -> None:
    core = [
        p
        for p in (REPO / "bob_cache").rglob("*.py")
        if p.relative_to(REPO / "bob_cache").parts[0] not in ("commands", "cli.py")
    ]
    files = [*core, *(REPO / "stores").rglob("*.py")]
    assert len(files) > 30 and REPO / "bob_cache" / "errors.py" in files
    offenders = {
        str(p.relative_to(REPO)): bad
        for p in files
        if (bad := forbidden_imports(p.read_text(encoding="utf-8")))
    }
    assert not offenders, f"core/stores modules import the face or a stage: {offenders}"
