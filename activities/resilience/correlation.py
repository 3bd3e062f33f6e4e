"""The correlation id of the current request (SPEC §4.6).

One UUID per request, minted at the entry point when the caller has none, kept as a ``UUID``
inside the process. It travels in workflow input, in Temporal headers (see
:mod:`workers.interceptors`), in the structlog context of every activity log line, and in Kafka
message headers and envelopes.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

import structlog

KAFKA_HEADER = "correlation_id"

_current: ContextVar[uuid.UUID | None] = ContextVar("onex_correlation_id", default=None)


def ensure_correlation_id(value: uuid.UUID | str | None = None) -> uuid.UUID:
    """The given id as a UUID, or a new one when there is none.

    Accepts canonical 36-character UUIDs and their 32-character hex form; anything else is a
    ``ValueError`` that says what is expected.
    """
    if value is None or value == "":
        return uuid.uuid4()
    if isinstance(value, uuid.UUID):
        return value
    try:
        return uuid.UUID(value.strip())
    except ValueError:
        raise ValueError(
            "correlation_id must be a UUID such as 3f1c2d9e-8b7a-4c1e-9f0a-2b3c4d5e6f70"
        ) from None


def current_correlation_id() -> uuid.UUID | None:
    """The correlation id bound to this task, if any."""
    return _current.get()


@contextmanager
def correlation_scope(correlation_id: uuid.UUID, **log_context: Any) -> Iterator[uuid.UUID]:
    """Bind the id (and extra log context) for the duration of a block, then restore."""
    token = _current.set(correlation_id)
    with structlog.contextvars.bound_contextvars(correlation_id=str(correlation_id), **log_context):
        try:
            yield correlation_id
        finally:
            _current.reset(token)


def kafka_headers(correlation_id: uuid.UUID) -> list[tuple[str, bytes]]:
    """Kafka message headers carrying the id (aiokafka's ``headers=`` form)."""
    return [(KAFKA_HEADER, str(correlation_id).encode())]


def correlation_from_kafka_headers(
    headers: Iterable[tuple[str, bytes]] | None,
) -> uuid.UUID | None:
    """The id from Kafka headers, or None when absent or malformed."""
    for key, value in headers or ():
        if key == KAFKA_HEADER:
            try:
                return uuid.UUID(value.decode())
            except (ValueError, UnicodeDecodeError):
                return None
    return None
