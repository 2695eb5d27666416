"""Shared pieces of the command line: consoles, option types, error handling, printing.

Options used by several commands are defined here, once; an option used by one family only
lives in that family's module.
"""

from __future__ import annotations

import functools
import json
import math
import platform
import sys
import tempfile
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any, TypeVar

import click
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from bob_cache.errors import BobCacheError, StoreNotFoundError
from bob_cache.stores.location import remote_failure, remote_failure_message

# Terminals get their own width; logs and pipes get wide, unwrapped tables.
out = Console(width=None if sys.stdout.isatty() else 250)
err = Console(stderr=True, width=None if sys.stderr.isatty() else 250)
F = TypeVar("F", bound=Callable[..., Any])

# Exit codes (documented in cli.py and the README).
EXIT_USER_ERROR = 1
EXIT_BUG = 3
EXIT_INTERRUPTED = 130
INTERRUPTED = "Interrupted."
INTERRUPTED_RESUMABLE = "Interrupted. Committed shards are kept; rerun the same command to resume."

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bar.")]
DeviceOpt = Annotated[str, typer.Option(help="auto, cpu, cuda or cuda:N.")]
StoreOpt = Annotated[
    str, typer.Option(envvar="BOB_CACHE_STORE", help="Feature store directory or fsspec URL.")
]
StoreArg = Annotated[
    str, typer.Argument(help="Store: a directory or an fsspec URL (s3://bucket/prefix).")
]
ResultsOpt = Annotated[
    str | None,
    typer.Option(envvar="BOB_CACHE_RESULTS", help="Results directory (default bob-results)."),
]
SplitFractionsOpt = Annotated[
    str | None,
    typer.Option(
        help="train,val,test fractions for a labelled source without splits (a plain class "
        "folder, a manifest without a split column): split by id hash, stratified by class "
        "(default 0.6,0.2,0.2).",
    ),
]
# How downstream commands pick the feature sets of one extraction.
DatasetOpt = Annotated[str, typer.Option(help="Dataset name as extracted (see `bob-cache ls`).")]
BackboneOpt = Annotated[str, typer.Option(help="Backbone as extracted: its name, label or arch.")]
FeatureOpt = Annotated[
    str | None, typer.Option(help="Feature key (a unique prefix) when several match.")
]

# Exceptions that end a command on purpose (newer typer releases have their own Exit, Abort).
_EXITS = (typer.Exit, typer.Abort, click.exceptions.Exit, click.ClickException, click.Abort)

FEATURE_SET_COLUMNS = (
    "group", "split", "backbone", "layer", "pool", "rows", "dim", "invalid", "complete",
)  # fmt: skip


def handle_errors(fn: F | None = None, *, interrupted: str = INTERRUPTED) -> Any:
    """Decorate a command: user errors exit 1, Ctrl-C exits 130, bugs exit 3.

    A :class:`BobCacheError` prints its message (no traceback). Any other exception is a bug:
    one line on stderr names the crash log that holds the traceback.

    Args:
        fn: the command function (the decorator also works with arguments only).
        interrupted: the message printed on Ctrl-C.
    """
    if fn is None:
        return functools.partial(handle_errors, interrupted=interrupted)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except BobCacheError as exc:
            err.print(f"[bold red]Error:[/] {escape(str(exc))}", highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_USER_ERROR) from None
        except KeyboardInterrupt:
            err.print(interrupted, highlight=False, soft_wrap=True)
            raise typer.Exit(EXIT_INTERRUPTED) from None
        except _EXITS:
            raise  # a command's own exit code, or a usage error
        except Exception as exc:
            remote = remote_failure(exc)
            if remote is not None:  # an object store that stopped answering mid-run
                err.print(remote_failure_message(remote), markup=False, highlight=False,
                          soft_wrap=True)  # fmt: skip
                raise typer.Exit(EXIT_USER_ERROR) from None
            log = write_crash_log()
            summary = " ".join(f"{type(exc).__name__}: {exc}".split())
            err.print(
                f"bob-cache hit a bug: {summary} The traceback was written to {log}; "
                "please report it.",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
            raise typer.Exit(EXIT_BUG) from None

    return wrapper


def write_crash_log() -> Path:
    """Write the traceback being handled (and versions, argv) to a new temporary file."""
    from bob_cache import __version__

    with tempfile.NamedTemporaryFile(
        "w", prefix="bob-cache-crash-", suffix=".log", delete=False, encoding="utf-8"
    ) as log:
        log.write(f"bob-cache {__version__}, Python {platform.python_version()}\n")
        log.write(f"argv: {sys.argv}\n\n{traceback.format_exc()}")
    return Path(log.name)


def require_existing_store(location: str) -> None:
    """Refuse a local store path that is not an existing feature store.

    Commands that open a store for writing (``verify --repair``, ``index build``) would
    otherwise create an empty store at a mistyped path. URLs are left to the opener.

    Raises:
        StoreNotFoundError: the path is not a directory, or holds no Zarr root group.
    """
    from bob_cache.stores.location import is_url

    if is_url(location):
        return
    path = Path(str(location).removeprefix("file://")).expanduser()
    if not path.is_dir():
        raise StoreNotFoundError(
            f"No feature store at '{location}'. Create one with `bob-cache extract --store "
            f"{location} ...`, or check the path."
        )
    if not (path / "zarr.json").is_file():
        raise StoreNotFoundError(
            f"No feature store at '{location}': the directory holds no Zarr v3 root group "
            "(zarr.json). Check the path, or create a store with `bob-cache extract --store ...`."
        )


def print_json(obj: Any) -> None:
    """Print ``obj`` as strict JSON: NaN and infinities (an undefined metric) become null."""
    sys.stdout.write(json.dumps(_finite(obj), indent=2, default=str, allow_nan=False) + "\n")


def _finite(obj: Any) -> Any:
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_finite(v) for v in obj]
    if hasattr(obj, "item") and getattr(obj, "ndim", None) == 0:  # numpy scalars
        return _finite(obj.item())
    return obj


def print_table(
    rows: Sequence[dict[str, Any]], columns: Sequence[str], *, title: str | None = None
) -> None:
    table = Table(title=title, show_edge=False, header_style="bold")
    for col in columns:
        table.add_column(col, overflow="fold")
    for row in rows:
        table.add_row(*("—" if row.get(c) is None else str(row.get(c)) for c in columns))
    out.print(table)
