"""What every ``onex`` command shares: exit codes, consoles, settings and failure."""

from __future__ import annotations

import sys
from enum import IntEnum
from pathlib import Path
from typing import Annotated, NoReturn, TypeVar

import typer
from rich.console import Console

from workers.logging import configure_logging
from workers.settings import OnexSettings, SettingsError, load_settings


class ExitCode(IntEnum):
    OK = 0
    BAD_INPUT = 2
    PARTIAL = 3
    FAILED = 4
    NOT_FOUND = 5
    UNAVAILABLE = 6


EPILOG = (
    "Settings come from ONEX_<SECTION>__<KEY> environment variables (or a .env file), "
    "e.g. ONEX_POSTGRES__PORT=5433. Exit codes: 0 ok, 2 bad input, 3 partial, "
    "4 failed/compensated, 5 not found, 6 service unavailable."
)

# Off a terminal (CI, pipes), rich would wrap tables at 80 columns: ids are longer than that.
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)
console = Console(width=None if sys.stdout.isatty() else 200)

T = TypeVar("T")


def fail(code: ExitCode, message: str) -> NoReturn:
    err_console.print(
        f"error: {message}", style="red", markup=False, highlight=False, soft_wrap=True
    )
    raise typer.Exit(code)


def settings_or_exit() -> OnexSettings:
    try:
        settings = load_settings()
    except SettingsError as exc:
        fail(ExitCode.BAD_INPUT, str(exc))
    configure_logging(settings.worker.log_level)
    return settings


JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def relative(path: str) -> str:
    """A path relative to the working directory when it is under it (shorter in a table)."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path
