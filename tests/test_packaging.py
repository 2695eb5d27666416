"""The wheel installs everything under ``bob_cache`` and nothing with a generic top-level name."""

from __future__ import annotations

import ast
import json
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


# --- dependencies: every import of the shipped code is declared where it is needed --------

SHIPPED = ("bob_cache", "pipelines", "stores")
# Modules that may import the packages of an extra (beside the base ones), by extra. Each
# reaches them only after `bob_cache.extras.require(extra, ...)` (the base-install test below).
EXTRA_OF_FILE = {
    "pipelines/serve.py": "serve",
    "pipelines/serve_metrics.py": "serve",
    "pipelines/battle/": "battle",
    "pipelines/cluster.py": "battle",
    "pipelines/extract_cluster.py": "battle",
    "bob_cache/suite.py": "battle",
    "bob_cache/finetune/coco_data.py": "finetune",
    "bob_cache/finetune/coco_eval.py": "finetune",
    "pipelines/report.py": "report",
    "pipelines/report_plots.py": "report",
    "bob_cache/data/corruption_filters.py": "report",  # matplotlib's HSV conversion
    "bob_cache/transfer/plots.py": "report",  # the transferability scatter
}
# Declared, but imported by no shipped module: what uses each.
INDIRECT = {
    "pyarrow": "pandas' parquet engine (the results table)",
    "python-multipart": "fastapi's form parsing (the image uploads of `serve`)",
    "s3fs": "fsspec's s3:// protocol (stores and results)",
}
RUNTIME_EXTRAS = ("serve", "battle", "finetune", "report", "s3")


def _project() -> dict:
    try:
        import tomllib
    except ImportError:  # Python 3.10
        tomllib = pytest.importorskip("tomli")
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _canon(name: str) -> str:
    from packaging.utils import canonicalize_name

    return str(canonicalize_name(name))


def _expanded(requirements: list[str]) -> set[str]:
    """The distributions ``requirements`` name, with those their extras add (``dask[distributed]``
    declares ``distributed``), read from the installed metadata."""
    from importlib import metadata

    from packaging.requirements import Requirement

    names = set()
    for text in requirements:
        req = Requirement(text)
        names.add(_canon(req.name))
        for extra in req.extras:
            for dep in map(Requirement, metadata.requires(req.name) or []):
                marker = dep.marker  # only what the extra adds, not what is always there
                if (
                    marker
                    and marker.evaluate({"extra": extra})
                    and not marker.evaluate({"extra": ""})
                ):
                    names.add(_canon(dep.name))
    return names


def _declared() -> dict[str | None, set[str]]:
    """Base (key None) and each extra's distributions."""
    project = _project()
    declared: dict[str | None, set[str]] = {None: _expanded(project["dependencies"])}
    for extra, requirements in project["optional-dependencies"].items():
        declared[extra] = _expanded(requirements)
    return declared


def _providers() -> dict[str, set[str]]:
    """Top-level module → the installed distributions that ship it."""
    from importlib import metadata

    return {
        module: {_canon(d) for d in dists}
        for module, dists in metadata.packages_distributions().items()
    }


def shipped_imports() -> dict[str, set[str]]:
    """Each third-party top-level module the shipped code imports → the files importing it."""
    files = [REPO / "cli.py"]
    for folder in SHIPPED:
        files += [p for p in (REPO / folder).rglob("*.py") if not p.is_symlink()]
    found: dict[str, set[str]] = {}
    for path in files:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names = [node.module]
            else:
                continue
            for top in {name.split(".")[0] for name in names}:
                if top in sys.stdlib_module_names or top in ("__future__", "bob_cache"):
                    continue
                found.setdefault(top, set()).add(path.relative_to(REPO).as_posix())
    return found


def _extra_of(path: str) -> str | None:
    return next((extra for prefix, extra in EXTRA_OF_FILE.items() if path.startswith(prefix)), None)


def test_every_import_of_the_shipped_code_is_declared_by_base_or_its_module_extra() -> None:
    declared, providers, imports = _declared(), _providers(), shipped_imports()
    assert {"torch", "fastapi", "yaml", "rich", "click"} <= set(imports)  # the scan works
    assert "httpx" not in imports  # the load test is a test helper, not shipped
    problems = []
    for module, paths in sorted(imports.items()):
        dists = providers.get(module)
        if not dists:
            problems.append(f"{module} (imported by {sorted(paths)}) is not installed here")
            continue
        for path in sorted(paths):
            extra = _extra_of(path)
            allowed = declared[None] | (declared[extra] if extra else set())
            if not dists & allowed:
                where = f"the '{extra}' extra" if extra else "the base dependencies"
                problems.append(f"{module} ({'/'.join(sorted(dists))}) imported by {path}: "
                                f"not in {where}")  # fmt: skip
    assert not problems, "undeclared imports:\n" + "\n".join(problems)


def test_every_declared_dependency_is_imported_or_used_through_another() -> None:
    declared, providers = _declared(), _providers()
    imported = set().union(*(providers.get(m, set()) for m in shipped_imports()))
    runtime = set().union(*(declared[e] for e in (None, *RUNTIME_EXTRAS)))
    unused = runtime - imported - set(INDIRECT)
    assert not unused, f"declared but imported nowhere: {sorted(unused)}"
    assert "numcodecs" not in runtime  # zarr's own dependency
    assert set(INDIRECT) <= runtime  # no stale entries


def test_extras_are_the_documented_set_and_all_is_their_union() -> None:
    project = _project()
    extras_ = project["optional-dependencies"]
    assert set(extras_) == {*RUNTIME_EXTRAS, "all", "dev"}  # no `gpu`: one faiss package
    union = {r for e in RUNTIME_EXTRAS for r in extras_[e]}
    assert set(extras_["all"]) == union and len(extras_["all"]) == len(union)
    assert any(r.startswith("faiss-cpu") for r in project["dependencies"])
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    for extra in (*RUNTIME_EXTRAS, "all", "dev"):
        assert f"| `{extra}`" in readme, f"README's Install table lacks the '{extra}' extra"
    makefile = (REPO / "Makefile").read_text(encoding="utf-8")
    assert "install -q -e '.[all]'" in makefile and "install -q -e '.[all,dev]'" in makefile


def test_require_checks_the_modules_of_exactly_the_declared_extras() -> None:
    from bob_cache.extras import EXTRA_MODULES

    declared, providers = _declared(), _providers()
    assert set(EXTRA_MODULES) == set(RUNTIME_EXTRAS)
    for extra, modules in EXTRA_MODULES.items():
        shipping = {m: providers.get(m, set()) for m in modules}
        assert all(dists & declared[extra] for dists in shipping.values()), (extra, shipping)
        covered = set().union(*shipping.values())
        assert declared[extra] <= covered, f"require('{extra}') misses {declared[extra] - covered}"


# --- the base install: `pip install bob-cache` extracts, probes, indexes and queries ------------


def _closure(requirements: list[str]) -> set[str]:
    """The installed distributions that ``requirements`` pull in, recursively."""
    from importlib import metadata

    from packaging.requirements import Requirement

    seen: set[tuple[str, frozenset[str]]] = set()
    todo = [Requirement(r) for r in requirements]
    while todo:
        req = todo.pop()
        key = (_canon(req.name), frozenset(req.extras))
        if key in seen:
            continue
        seen.add(key)
        try:
            requires = metadata.requires(req.name) or []
        except metadata.PackageNotFoundError:
            continue
        for dep in map(Requirement, requires):
            if dep.marker is None or any(
                dep.marker.evaluate({"extra": e}) for e in ("", *req.extras)
            ):
                todo.append(dep)
    return {name for name, _ in seen}


def outside_the_base_install() -> list[str]:
    """Top-level modules of every installed distribution that the base install would not
    bring (the extras, the dev tools and what they pull in)."""
    from importlib import metadata

    base = _closure(_project()["dependencies"]) | {"bob-cache"}
    installed = {_canon(d.metadata["Name"]) for d in metadata.distributions()}
    providers = _providers()
    return sorted(
        module
        for module, dists in providers.items()
        if module.isidentifier() and dists <= installed - base
    )


BASE_RUN = """
import json, sys
for name in {blocked!r}:
    sys.modules[name] = None  # as if not installed: importing it raises ModuleNotFoundError
from typer.testing import CliRunner
from bob_cache.cli import app

store, results = sys.argv[1], sys.argv[2]
tiny = ["--backbone", "test_resnet", "--random-init", "--limit", "20", "--workers", "0", "-q"]
pick = ["--store", store, "--dataset", "digits", "--backbone", "test_resnet"]
runs = {{}}
def run(name, *args):
    result = CliRunner().invoke(app, list(args))
    runs[name] = [result.exit_code, result.output, repr(result.exception)]
for command in ("", "extract", "probe", "index build", "query", "serve", "battle", "report"):
    run("help " + command, *command.split(), "--help")
run("extract", "extract", "--data", "builtin:digits", "--store", store, *tiny)
run("probe", "probe", *pick, "--results", results, "--json")
run("index", "index", "build", *pick)
from bob_cache.stores import open_store
train = [f for f in open_store(store).feature_sets() if f.attrs["split"] == "train"][0]
run("query", "query", *pick, "--id", str(train.array("ids")[0]), "-k", "3", "--json")
run("serve", "serve", *pick)
run("battle", "battle", "suites/demo.yaml", "--store", store)
run("report", "report", results, "--out", results + "-report")
run("extract --local-cluster", "extract", "--data", "builtin:digits", "--store", store,
    *tiny, "--local-cluster", "2")
print(json.dumps({{"runs": runs, "loaded": sorted(m for m in {blocked!r} if sys.modules.get(m))}}))
"""


@pytest.mark.slow
def test_the_base_install_runs_extract_probe_index_query_and_names_each_missing_extra(
    tmp_path: Path,
) -> None:
    blocked = outside_the_base_install()
    assert {"fastapi", "uvicorn", "dask", "distributed", "matplotlib", "pycocotools"} <= set(
        blocked
    )
    assert {"torch", "faiss", "zarr", "sklearn", "typer", "rich"}.isdisjoint(blocked)
    script = BASE_RUN.format(blocked=blocked)
    args = [str(tmp_path / "store"), str(tmp_path / "results")]
    proc = subprocess.run(
        [sys.executable, "-c", script, *args],
        capture_output=True, text=True, timeout=600, cwd=REPO,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout.splitlines()[-1])
    runs = report["runs"]
    assert report["loaded"] == []
    for name in ("extract", "probe", "index", "query", *(n for n in runs if "help" in n)):
        code, output, exception = runs[name]
        assert code == 0, f"{name}: {output} {exception}"
    assert json.loads(runs["query"][1])[0]["rank"] == 1
    expected = {
        "serve": ("The query service", "serve"),
        "battle": ("The battle", "battle"),
        "report": ("The report", "report"),
        "extract --local-cluster": ("Running on a Dask cluster", "battle"),
    }
    for name, (feature, extra) in expected.items():
        code, output, _ = runs[name]
        assert code == 1, f"{name}: {output}"
        assert output.startswith(f"Error: {feature}") and f"needs the '{extra}' extra" in output
        assert output.rstrip().endswith(f"pip install 'bob-cache[{extra}]'."), output
        assert len(output.strip().splitlines()) == 1 and "Traceback" not in output
