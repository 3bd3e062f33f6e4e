"""structlog, configured once by the entry point.

JSON lines when standard error is not a terminal (a worker under a supervisor, CI), a readable
console renderer when it is. Context variables are merged first, so whatever an activity binds
(correlation id, workflow id, attempt) is on every line it logs.
"""

from __future__ import annotations

import logging
import sys
from typing import Literal

import structlog

Level = Literal["debug", "info", "warning", "error"]


def _stderr_logger(*_args: object) -> structlog.PrintLogger:
    return structlog.PrintLogger(sys.stderr)


def configure_logging(level: Level = "info", *, json: bool | None = None) -> None:
    """Configure structlog and the standard library root logger.

    ``json=None`` picks JSON unless standard error is a terminal.
    """
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
    # Libraries (temporalio, aiokafka, asyncpg) log through the standard library.
    logging.basicConfig(level=max(numeric_level, logging.WARNING), stream=sys.stderr, force=True)
