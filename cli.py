"""The ``bob-cache`` command line: parse options, build a config, call a stage, print.

This module only assembles the app: each command family lives in its own module under
``bob_cache/commands/`` and adds its commands with ``register(app)``. Options shared by
several commands, the error handling and the print helpers are in ``bob_cache.commands.common``.

Every command has ``--help`` with an example and ``--json`` where it prints results. Exit
codes: 0 success, 1 user error (one-paragraph message, no traceback), 2 usage error,
3 a bug in bob-cache (one line on stderr naming the crash log that holds the traceback),
130 interrupted.
"""

from __future__ import annotations

import logging
from enum import Enum
from typing import Annotated

import typer

from bob_cache.commands import (
    battle,
    catalog,
    extract,
    finetune,
    ood,
    probe,
    report,
    retrieval,
    shift,
    store,
    synth,
)

# The command families, in the order `bob-cache --help` lists them. A new family (ood,
# finetune, battle) is one module with a `register(app)` function, added here.
FAMILIES = (extract, probe, catalog, store, retrieval, ood, finetune, battle, report, shift, synth)

app = typer.Typer(
    name="bob-cache",
    help="Battle of the Backbones as a tool: extract backbone features once into a Zarr "
    "store, then evaluate them anywhere.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
    context_settings={"help_option_names": ["-h", "--help"]},
)


class LogLevel(str, Enum):
    """How much of the progress log reaches stderr."""

    WARNING = "WARNING"
    INFO = "INFO"
    DEBUG = "DEBUG"


@app.callback()
def root(
    log_level: Annotated[
        LogLevel,
        typer.Option(
            envvar="BOB_CACHE_LOG_LEVEL",
            case_sensitive=False,
            help="Progress log on stderr: INFO shows each fit of a linear probe's sweep and "
            "its optimizer's progress.",
        ),
    ] = LogLevel.WARNING,
) -> None:
    """Options given before the command apply to every command."""
    logger = logging.getLogger("bob_cache")  # bob-cache's own log; other libraries' stay as is
    for old in [h for h in logger.handlers if getattr(h, "bob_cache_cli", False)]:
        logger.removeHandler(old)  # (an earlier command in the same process)
    handler = _ConsoleHandler()  # the current stderr, above any live view
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    handler.bob_cache_cli = True  # type: ignore[attr-defined]
    logger.addHandler(handler)
    logger.setLevel(log_level.value)


class _ConsoleHandler(logging.Handler):
    """Log records through the commands' stderr console, so that a live view (the battle's)
    keeps below them instead of being torn; the text is as a StreamHandler writes it."""

    def emit(self, record: logging.LogRecord) -> None:
        from bob_cache.commands.common import err

        try:
            err.print(
                self.format(record), markup=False, highlight=False, emoji=False, soft_wrap=True
            )
        except Exception:  # a closed stream at exit: as logging.StreamHandler does
            self.handleError(record)


for family in FAMILIES:
    family.register(app)


def main() -> None:
    """Console-script entry point."""
    app()


if __name__ == "__main__":
    main()
