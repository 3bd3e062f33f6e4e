"""Correlation ids: minted at the edge, accepted in standard forms, carried in Kafka headers."""

from __future__ import annotations

import uuid

import pytest
import structlog

from activities.resilience.correlation import (
    correlation_from_kafka_headers,
    correlation_scope,
    current_correlation_id,
    ensure_correlation_id,
    kafka_headers,
)


def test_minted_when_absent_and_kept_when_given() -> None:
    """No id means a new UUID; a UUID or its canonical or hex text is kept as that UUID."""
    given = uuid.uuid4()
    assert ensure_correlation_id(given) is given
    assert ensure_correlation_id(str(given)) == given
    assert ensure_correlation_id(given.hex) == given
    minted = ensure_correlation_id(None)
    assert isinstance(minted, uuid.UUID)
    assert minted != ensure_correlation_id("")


def test_a_malformed_id_says_what_is_expected() -> None:
    """Garbage is refused with an example of the expected form."""
    with pytest.raises(ValueError, match="must be a UUID such as"):
        ensure_correlation_id("not-a-uuid")


def test_scope_binds_the_id_and_the_log_context_then_restores() -> None:
    """Inside a scope the id is current and on every log line; outside it is gone again."""
    correlation_id = uuid.uuid4()
    assert current_correlation_id() is None
    with correlation_scope(correlation_id, workflow_id="wf-1"):
        assert current_correlation_id() == correlation_id
        context = structlog.contextvars.get_contextvars()
        assert context["correlation_id"] == str(correlation_id)
        assert context["workflow_id"] == "wf-1"
    assert current_correlation_id() is None
    assert "correlation_id" not in structlog.contextvars.get_contextvars()


def test_kafka_headers_round_trip() -> None:
    """The id goes into a Kafka header and comes back out; junk headers give None."""
    correlation_id = uuid.uuid4()
    headers = [("other", b"x"), *kafka_headers(correlation_id)]
    assert correlation_from_kafka_headers(headers) == correlation_id
    assert correlation_from_kafka_headers([("correlation_id", b"\xff")]) is None
    assert correlation_from_kafka_headers(None) is None
