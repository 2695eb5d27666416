"""Writing local files and folders so that a kill or a full disk never leaves a half-written one.

A file is written under a temporary name beside its final one and renamed into place
(``os.replace``: readers see the old file or the new one). A folder of several files (a
report) is written into a hidden staging folder inside its destination and its files are
renamed into place, the ones that name the others last. A folder that replaces another (a
``shift --overwrite`` output) is swapped in by two renames, the old copy deleted last.

Between the steps of every multi-step write, :func:`crash_point` is called: tests make it
raise, as a kill would stop the process there, and check that rerunning the same command
finishes the work. It calls :func:`bob_cache.stores.feature_set.crash_point`, so one patch
reaches the store's writes and these alike.
"""

from __future__ import annotations

import errno
import functools
import os
import shutil
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

from bob_cache.errors import StoreFullError

STAGE_PREFIX = ".staging-"
RETIRED_PREFIX = ".retired-"
_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}
F = TypeVar("F", bound=Callable[..., Any])


def crash_point(step: str) -> None:
    """Called between the steps of a multi-step write; tests inject failures here."""
    from bob_cache.stores import feature_set

    feature_set.crash_point(step)


def temporary_name(path: Path) -> Path:
    """A hidden, unique sibling of ``path`` (same folder, so the rename stays on one disk)."""
    return path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")


def remove_temporaries(folder: Path) -> None:
    """Delete the temporary files (:func:`temporary_name`) that killed writes left in
    ``folder``; call it only where no other process is writing."""
    if folder.is_dir():
        for path in folder.glob(".*.tmp-*"):
            if path.is_file():
                path.unlink(missing_ok=True)


def atomic_write(path: Path, write: Callable[[Path], object]) -> None:
    """Call ``write(tmp)`` and rename ``tmp`` to ``path``; on any failure (a full disk) the
    temporary file is removed and ``path`` keeps its previous content, if any."""
    tmp = temporary_name(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: Path, text: str) -> None:
    """``path.write_text(text)`` (UTF-8), all or nothing."""
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def copy_file(source: Path, path: Path) -> None:
    """``shutil.copyfile(source, path)``, all or nothing."""
    atomic_write(path, lambda tmp: shutil.copyfile(source, tmp))


def start_staging(folder: Path) -> Path:
    """A new, empty staging folder inside ``folder`` (created if needed); the staging folders
    that killed writes left there are removed first."""
    folder.mkdir(parents=True, exist_ok=True)
    remove_leftovers(folder, STAGE_PREFIX)
    stage = folder / f"{STAGE_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:8]}"
    stage.mkdir()
    return stage


def commit_staging(stage: Path, folder: Path, *, last: Iterable[str] = ()) -> list[Path]:
    """Rename every file of ``stage`` into ``folder`` (sub-folders merged), the names in
    ``last`` at the end and in their order; then remove ``stage``. Returns the final paths."""
    order = list(last)
    files = sorted(p for p in stage.rglob("*") if p.is_file())
    files.sort(key=lambda p: order.index(p.name) if p.name in order else -1)
    moved = []
    for path in files:
        target = folder / path.relative_to(stage)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
        moved.append(target)
        crash_point(f"commit-{path.name}")
    shutil.rmtree(stage, ignore_errors=True)
    return moved


def remove_leftovers(folder: Path, prefix: str) -> None:
    """Delete the hidden ``prefix*`` entries that killed writes left in ``folder``."""
    if folder.is_dir():
        for path in folder.glob(f"{prefix}*"):
            shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(True)


def replace_folder(new: Path, final: Path) -> None:
    """Make the complete folder ``new`` appear as ``final``, replacing any folder there: the old
    one is first renamed aside and deleted only once ``new`` is in place, so a kill at any step
    leaves ``new`` or ``final`` whole (a rerun renames ``new`` again)."""
    retired = final.with_name(f"{RETIRED_PREFIX}{final.name}-{uuid.uuid4().hex[:8]}")
    if final.exists():
        os.replace(final, retired)
        crash_point("folder-retire")
    os.replace(new, final)
    crash_point("folder-rename")
    shutil.rmtree(retired, ignore_errors=True)


def full_disk_is_reported(what: str, fix: str) -> Callable[[F], F]:
    """Decorate a command's entry point: a full disk (or quota, or file-size limit) while it
    writes becomes a :class:`StoreFullError` that says nothing half-written was kept and
    names ``fix`` (how to finish the work); other errors pass through unchanged."""

    def decorate(function: F) -> F:
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return function(*args, **kwargs)
            except OSError as exc:
                if exc.errno not in _FULL or isinstance(exc, StoreFullError):
                    raise
                raise StoreFullError(
                    f"Ran out of space while writing {what} ({os.strerror(exc.errno or 0)}). "
                    f"No partial file was left under its final name. Free some space (or raise "
                    f"the quota), then {fix}."
                ) from exc

        return wrapper  # type: ignore[return-value]

    return decorate
