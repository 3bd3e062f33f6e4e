"""Event envelopes: catalog topics only, RFC 3339 timestamps, keys fixed per topic family."""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime

import pytest

from contracts.events import EventEnvelope, new_envelope


def test_an_envelope_serializes_with_an_rfc3339_timestamp_and_its_key() -> None:
    """Node events are keyed by node_id; the JSON carries every envelope field."""
    node_id = uuid.uuid4()
    correlation_id = uuid.uuid4()
    envelope = new_envelope(
        "onex.registry.node.registered.v1",
        {"node_id": str(node_id)},
        correlation_id=correlation_id,
        timestamp=datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC),
    )
    data = json.loads(envelope.model_dump_json())
    assert set(data) == {"event_id", "event_type", "source", "correlation_id", "timestamp",
                         "payload"}  # fmt: skip
    assert data["timestamp"] == "2026-01-02T03:04:05Z"
    assert envelope.key() == str(node_id).encode()


def test_error_events_are_keyed_by_correlation_id() -> None:
    """The error topic's key is the envelope's correlation id."""
    correlation_id = uuid.uuid4()
    envelope = new_envelope("onex.infra.error.detected.v1", {}, correlation_id=correlation_id)
    assert envelope.key() == str(correlation_id).encode()


def test_unknown_topics_and_missing_keys_are_refused() -> None:
    """Only catalog topics; a payload without its topic's key field cannot be published."""
    with pytest.raises(ValueError, match="not in the topic catalog"):
        new_envelope("onex.node.whatever.v9", {}, correlation_id=uuid.uuid4())
    envelope = new_envelope("onex.node.heartbeat.published.v1", {}, correlation_id=uuid.uuid4())
    with pytest.raises(ValueError, match="keyed by node_id"):
        envelope.key()


def test_an_envelope_outside_the_catalog_cannot_be_built_directly() -> None:
    """The catalog check is on the model itself, not only in the factory."""
    with pytest.raises(ValueError, match="not in the topic catalog"):
        EventEnvelope(
            event_id=uuid.uuid4(),
            event_type="orders.created",
            source="test",
            correlation_id=uuid.uuid4(),
            timestamp=datetime.now(UTC),
            payload={},
        )
