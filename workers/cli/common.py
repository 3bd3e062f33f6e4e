"""What every ``onex`` command shares: consoles, settings, the Temporal client, and how a
command ends.

A command's work runs through :func:`run` (or :func:`run_async`), which turns whatever it raised
into the documented exit code (:mod:`workers.cli.exit_codes`) and a one-line message, and makes
sure nothing of the work outlives the command. That matters for Temporal: the SDK's clients and
runtimes own Rust threads that call back into Python, and one still alive when the interpreter
finalizes can abort the process (``Fatal Python error: PyGILState_Release``, exit 134) after the
command has printed its result. The Temporal client has no ``close()``: a connection ends when
its last reference goes. So the work's exception is never re-raised (its traceback's frames hold
the client, often in reference cycles), and the garbage collector runs before the exit.
"""

from __future__ import annotations

import asyncio
import gc
import sys
import traceback
from collections.abc import AsyncIterator, Callable, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Generic, NoReturn, TypeVar

import structlog
import typer
from rich.console import Console
from temporalio.client import Client
from temporalio.runtime import Runtime, TelemetryConfig

from activities.resilience.sanitize import sanitize_exception, sanitize_text
from contracts.errors import InfraConnectionError
from workers.cli.exit_codes import ExitCode, describe, exit_code_for
from workers.logging import LibraryLogs, configure_logging, show_library_logs
from workers.settings import OnexSettings, SettingsError, load_settings

EPILOG = (
    "Settings come from ONEX_<SECTION>__<KEY> environment variables (or a .env file), "
    "e.g. ONEX_POSTGRES__PORT=5433. Exit codes: 0 ok, 2 bad input, 3 partial or compensation "
    "paused, 4 failed/compensated, 5 not found, 6 service unavailable."
)

# Off a terminal (CI, pipes), rich would wrap tables at 80 columns: ids are longer than that.
err_console = Console(stderr=True, width=None if sys.stderr.isatty() else 200)
console = Console(width=None if sys.stdout.isatty() else 200)

T = TypeVar("T")

logger = structlog.get_logger("onex.cli")


def fail(code: ExitCode, message: str) -> NoReturn:
    # What the libraries logged on the way (held back until now) explains the failure.
    show_library_logs()
    err_console.print(
        f"error: {message}", style="red", markup=False, highlight=False, soft_wrap=True
    )
    raise typer.Exit(code)


def settings_or_exit(*, library_logs: LibraryLogs = "on_failure") -> OnexSettings:
    """The settings, with logging configured by them; exit 2 naming what is invalid.

    A command shows the libraries' log records only when it fails (they explain why); a
    service (the worker) shows them as they come.
    """
    try:
        settings = load_settings()
    except SettingsError as exc:
        fail(ExitCode.BAD_INPUT, str(exc))
    configure_logging(settings.worker.log_level, libraries=library_logs)
    return settings


JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


def relative(path: str) -> str:
    """A path relative to the working directory when it is under it (shorter in a table)."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


@dataclass(frozen=True)
class _Done(Generic[T]):
    value: T


@dataclass(frozen=True)
class _Failed:
    code: int
    message: str | None  # None: the work already said why (it raised typer.Exit)


def _attempt(work: Callable[[], T], failing: str) -> _Done[T] | _Failed:
    """Run ``work``; describe a failure as plain data, so that no exception leaves here."""
    try:
        return _Done(work())
    except typer.Exit as exit_:
        return _Failed(exit_.exit_code, None)
    except (Exception, KeyboardInterrupt) as error:
        code = exit_code_for(error)
        if code is ExitCode.UNEXPECTED:
            logger.debug(
                "unexpected_error",
                traceback=sanitize_text(
                    "".join(traceback.format_exception(error)), max_length=20_000
                ),
            )
        message = describe(error)
        return _Failed(code, f"{failing}: {message}" if failing else message)


def run(work: Callable[[], T], *, failing: str = "") -> T:
    """``work()``, or exit with the code and message of what it raised (prefixed by ``failing``).

    Nothing that ``work`` created is left when this returns or exits: the garbage collector
    reclaims the cycles (tracebacks and frames, asyncio tasks) that would otherwise keep a
    Temporal client, and the Rust threads behind it, alive until the interpreter finalizes.
    """
    outcome = _attempt(work, failing)
    gc.collect()
    if isinstance(outcome, _Failed):
        if outcome.message is None:
            raise typer.Exit(outcome.code)
        fail(ExitCode(outcome.code), outcome.message)
    return outcome.value


def run_async(body: Callable[[], Coroutine[Any, Any, T]], *, failing: str = "") -> T:
    """:func:`run` for asynchronous work: ``body()`` on an event loop of its own.

    Give a function returning the coroutine, not the coroutine: then the coroutine is created,
    run and dropped inside :func:`run`, and collected with the rest. The work must return plain
    data (a result model, strings), never a client or a workflow handle, which would keep the
    SDK alive after the loop.
    """
    return run(lambda: asyncio.run(body()), failing=failing)


@asynccontextmanager
async def temporal_client(settings: OnexSettings) -> AsyncIterator[Client]:
    """A Temporal client on a runtime of its own, for one command.

    Its own runtime, rather than the SDK's process-wide default, so that when :func:`run`
    collects the client, the runtime and its threads go too: nothing of the SDK is left for
    the interpreter to finalize.
    """
    from workers.client import connect

    runtime = Runtime(telemetry=TelemetryConfig())
    try:
        client = await connect(settings, runtime=runtime)
    except RuntimeError as exc:  # the SDK's "Failed client connect"
        raise InfraConnectionError(
            f"cannot reach Temporal at {settings.temporal.target}: {sanitize_exception(exc)} "
            "(is `onex dev up` running?)"
        ) from exc
    del runtime  # the client holds it, and takes it along when it goes
    yield client
