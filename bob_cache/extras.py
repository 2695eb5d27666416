"""Optional dependencies: which extra provides which modules, and one check for a missing one.

``pip install bob-cache`` gives extract, probe, index, query, OOD and retrieval evaluation.
The rest comes with extras (``pip install 'bob-cache[serve]'``); the command or stage that
needs one calls :func:`require` before importing it, so a missing extra is a one-line user
error naming the extra (exit code 1), never an ``ImportError`` traceback.

FAISS is a base dependency, but two packages ship its ``faiss`` module (``faiss-cpu``, and a
GPU build such as ``faiss-gpu-cu12``); :func:`import_faiss` says what to run when both are
installed, since packaging cannot express "one of".
"""

from __future__ import annotations

import functools
import importlib.util
import logging
from importlib import metadata
from types import ModuleType

from bob_cache.errors import BobCacheError

logger = logging.getLogger(__name__)

# extra → the top-level modules it provides (tests/test_packaging.py keeps this table, the
# extras in pyproject.toml and the imports of the shipped code in step).
EXTRA_MODULES: dict[str, tuple[str, ...]] = {
    "serve": ("fastapi", "uvicorn", "python_multipart", "orjson", "prometheus_client"),
    "battle": ("distributed", "dask", "yaml", "pydantic", "threadpoolctl"),
    "finetune": ("pycocotools",),
    "report": ("matplotlib", "jinja2"),
    "s3": ("s3fs",),
}

# Distributions that ship the `faiss` module: the CPU build first, then the GPU builds.
FAISS_CPU = "faiss-cpu"
FAISS_GPU = ("faiss-gpu-cu12", "faiss-gpu-cu11", "faiss-gpu")
FAISS_SWAP = "pip uninstall -y faiss-cpu && pip install faiss-gpu-cu12"


class MissingExtraError(BobCacheError, ImportError):
    """An optional feature whose extra is not installed."""


class FaissInstallError(BobCacheError, ImportError):
    """The ``faiss`` module does not import (no FAISS package, or one broken by another)."""


def install_hint(extra: str) -> str:
    """The command that installs ``extra``."""
    return f"pip install 'bob-cache[{extra}]'"


def missing_modules(extra: str) -> list[str]:
    """The modules of ``extra`` that cannot be imported here (found without importing)."""
    missing = []
    for module in EXTRA_MODULES[extra]:
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a parent package missing, or a None stub
            found = False
        if not found:
            missing.append(module)
    return missing


def require(extra: str, feature: str) -> None:
    """Refuse to go on when a module of ``extra`` is missing.

    Args:
        extra: the extra's name in pyproject.toml (``serve``, ``battle``, ...).
        feature: what needs it, as the message's subject ("The query service").

    Raises:
        MissingExtraError: naming the extra and the command that installs it.
    """
    missing = missing_modules(extra)
    if missing:
        raise MissingExtraError(
            f"{feature} needs the '{extra}' extra ({', '.join(missing)} not installed): "
            f"{install_hint(extra)}."
        )


def installed_faiss_packages() -> list[str]:
    """The installed distributions that ship the ``faiss`` module."""
    found = []
    for name in (FAISS_CPU, *FAISS_GPU):
        try:
            metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        found.append(name)
    return found


def faiss_fix(packages: list[str]) -> str:
    """The command that leaves exactly one FAISS package of ``packages`` installed (the GPU
    build when there is one): uninstalling either of two removes files the other shares, so
    the kept one is reinstalled."""
    keep = next((p for p in packages if p != FAISS_CPU), FAISS_CPU)
    reinstall = f"pip install --force-reinstall --no-deps {keep}"
    others = [p for p in packages if p != keep]
    return f"pip uninstall -y {' '.join(others)} && {reinstall}" if others else reinstall


def faiss_gpu_hint() -> str:
    """What to run for FAISS on the GPU, from what is installed now."""
    packages = installed_faiss_packages()
    if len(packages) > 1:
        return f"keep one FAISS package: {faiss_fix(packages)}"
    if any(p in FAISS_GPU for p in packages):
        return f"{packages[0]} is installed: check that its CUDA 12 runtime loads on this machine"
    return f"on a CUDA machine, swap in FAISS's GPU build: {FAISS_SWAP}"


@functools.cache
def import_faiss() -> ModuleType:
    """The ``faiss`` module, after checking that only one FAISS package is installed.

    Two at once (``faiss-cpu`` and ``faiss-gpu-cu12``) write the same files: the last one
    installed runs, and uninstalling either breaks the other. That is logged once as a
    warning with the command that fixes it, not refused: searches still give the same
    neighbours on the CPU.

    Raises:
        FaissInstallError: ``faiss`` does not import; the message says what to reinstall.
    """
    packages = installed_faiss_packages()
    if len(packages) > 1:
        logger.warning(
            "Both %s are installed; they ship the same `faiss` module, so which one runs depends "
            "on the install order, and uninstalling either breaks the other. Keep one: %s",
            " and ".join(packages),
            faiss_fix(packages),
        )
    try:
        import faiss
    except ModuleNotFoundError as exc:
        if exc.name != "faiss":
            raise
        fix = faiss_fix(packages) if packages else f"pip install {FAISS_CPU}"
        raise FaissInstallError(
            f"The faiss module does not import ({', '.join(packages) or 'no FAISS package'} "
            f"installed): {fix}."
        ) from exc
    return faiss
