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
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )
    # Libraries (temporalio, aiokafka, asyncpg) log through the standard library.
    logging.basicConfig(level=max(numeric_level, logging.WARNING), stream=sys.stderr, force=True)
