"""What produced a feature set: library versions and timestamps."""

from __future__ import annotations

import platform
from datetime import datetime, timezone
from importlib import metadata

_LIBRARIES = ("bob-cache", "torch", "torchvision", "timm", "zarr", "numpy", "pillow")


def library_versions(libraries: tuple[str, ...] = _LIBRARIES) -> dict[str, str]:
    """Versions of ``libraries`` (default: those that can change extracted numbers), plus
    Python's."""
    versions = {"python": platform.python_version()}
    for name in libraries:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def utc_now() -> str:
    """Current UTC time as an ISO-8601 string with seconds precision."""
    return datetime.now(timezone.utc).isoformat(timespec="seconds")
