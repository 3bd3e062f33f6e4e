"""structlog, configured once by the entry point, and the libraries' logs routed through it.

JSON lines when standard error is not a terminal (a worker under a supervisor, CI), a readable
console renderer when it is. Context variables are merged first, so whatever an activity binds
(correlation id, workflow id, attempt) is on every line it logs.

The libraries (aiokafka, asyncpg, aiohttp, hvac, temporalio, asyncio, Python warnings) log
through the standard library. Every record made in the process is sanitized once, as it is made
(a record factory, installed by :func:`configure_logging`): its message, with its arguments
merged, goes through :func:`~activities.resilience.sanitize.sanitize_text`, and an exception
becomes one sanitized ``Type: message`` line instead of its traceback. So whatever handler sees
the record (the one installed here, one an embedder or a test runner adds to the root) sees it
safe. A filter would not do: a filter on the root logger never sees the records its children
propagate, and one on a handler covers that handler only. The records, from WARNING up, are
rendered by the same renderer as structlog's lines. Where they go depends on who runs:

* ``libraries="live"`` (the worker, a service): on standard error as they happen;
* ``libraries="on_failure"`` (a command, the demo): held back, and shown by
  :func:`show_library_logs` only when the command fails, where they explain why. A client
  library retrying while a server starts (aiokafka's ``Unable connect to ...`` while the
  embedded broker boots) is noise when the command then succeeds.
"""

from __future__ import annotations

import collections
import logging
import sys
from collections.abc import Callable
from typing import Any, Literal

import structlog

from activities.resilience.sanitize import sanitize_exception, sanitize_text

Level = Literal["debug", "info", "warning", "error"]
LibraryLogs = Literal["live", "on_failure"]

# The last records a failing command shows: the ones nearest the failure explain it.
HELD_RECORDS = 50


def _stderr_logger(*_args: object) -> structlog.PrintLogger:
    return structlog.PrintLogger(sys.stderr)


def sanitize_record(record: logging.LogRecord) -> logging.LogRecord:
    """Make ``record`` safe for any handler, in place: the message (arguments merged) sanitized
    and the arguments dropped; an exception replaced by its sanitized one-line summary, which
    a formatter shows where it would have shown the traceback (``exc_text``)."""
    try:
        message = record.getMessage()
    except Exception:  # arguments that do not fit the format: the format alone
        message = str(record.msg)
    record.msg, record.args = sanitize_text(message), ()
    exc_info = record.exc_info
    if exc_info:
        error = exc_info[1] if isinstance(exc_info, tuple) else None
        record.exc_info = None
        record.exc_text = None if error is None else sanitize_exception(error)
    return record


_plain_record_factory: Callable[..., logging.LogRecord] | None = None


def _install_record_factory() -> None:
    """Sanitize every record as it is made, whoever logs it (once per process)."""
    global _plain_record_factory
    if _plain_record_factory is not None:
        return
    plain = _plain_record_factory = logging.getLogRecordFactory()

    def sanitized_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        return sanitize_record(plain(*args, **kwargs))

    logging.setLogRecordFactory(sanitized_record)


def _error_line(_logger: Any, _method: str, event_dict: structlog.types.EventDict) -> Any:
    """A library's exception, already summarized by :func:`sanitize_record`, as ``error``."""
    summary = getattr(event_dict.get("_record"), "exc_text", None)
    if summary:
        event_dict["error"] = summary
    return event_dict


class _StderrHandler(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time (a test runner may replace it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
        except Exception:
            self.handleError(record)


class _HeldRecords(logging.Handler):
    """Keeps the last records until :meth:`show` writes them through ``target``, or exit."""

    def __init__(self, target: logging.Handler) -> None:
        super().__init__()
        self.target = target
        self.records: collections.deque[logging.LogRecord] = collections.deque(maxlen=HELD_RECORDS)

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def show(self) -> None:
        while self.records:
            self.target.handle(self.records.popleft())


def _library_formatter(renderer: structlog.types.Processor) -> logging.Formatter:
    """Renders a standard-library record (sanitized when it was made: :func:`sanitize_record`)."""
    return structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.stdlib.add_logger_name,
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            _error_line,  # a library's traceback was summarized when the record was made
        ],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )


def render_library_record(record: logging.LogRecord) -> str:
    """The JSON line a library's record becomes on standard error (for tests and checks).

    ``record`` is sanitized first, as the record factory would have done when it was made.
    """
    return _library_formatter(structlog.processors.JSONRenderer()).format(sanitize_record(record))


# The handler this module put on the root logger, replaced (and only it) by each configuration:
# others (a test runner's capture) stay.
_installed: logging.Handler | None = None


def configure_logging(
    level: Level = "info", *, json: bool | None = None, libraries: LibraryLogs = "live"
) -> None:
    """Configure structlog, and route the standard library's records through it.

    ``json=None`` picks JSON unless standard error is a terminal. Libraries log from WARNING up
    (from ``level`` when it is higher); ``libraries`` says whether live or on failure only.
    From the first call on, every standard-library record is sanitized as it is made.
    """
    global _installed
    _install_record_factory()
    use_json = not sys.stderr.isatty() if json is None else json
    numeric_level = logging.getLevelNamesMapping()[level.upper()]
    shared: list[structlog.types.Processor] = [
        structlog.contextvars.merge_contextvars,
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.StackInfoRenderer(),
    ]
    renderer: structlog.types.Processor
    if use_json:
        shared.append(structlog.processors.dict_tracebacks)
        renderer = structlog.processors.JSONRenderer()
    else:
        renderer = structlog.dev.ConsoleRenderer()
    structlog.configure(
        processors=[*shared, renderer],
        wrapper_class=structlog.make_filtering_bound_logger(numeric_level),
        # Resolved at each logger's creation, not now: whoever replaces sys.stderr later
        # (a test runner, a daemonizing supervisor) gets the output.
        logger_factory=_stderr_logger,
        cache_logger_on_first_use=False,
    )

    stream = _StderrHandler()
    stream.setFormatter(_library_formatter(renderer))
    root = logging.getLogger()
    if _installed is not None:
        root.removeHandler(_installed)
    _installed = _HeldRecords(stream) if libraries == "on_failure" else stream
    root.addHandler(_installed)
    root.setLevel(max(numeric_level, logging.WARNING))
    logging.captureWarnings(True)  # a library's warning is a log record like the others


def show_library_logs() -> None:
    """Write the library records held back so far (a failing command calls this)."""
    if isinstance(_installed, _HeldRecords):
        _installed.show()
