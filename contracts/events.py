"""The envelope every Kafka event travels in (SPEC §5).

``event_id`` lets consumers deduplicate (delivery is at least once); ``correlation_id`` ties the
event to the request that caused it; ``timestamp`` is RFC 3339 in UTC. Payload schemas are
versioned with their topic (the ``.v<n>`` suffix), independently of the envelope.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_serializer, field_validator

from contracts.topics import TOPICS_BY_NAME, Topic


class EventEnvelope(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    event_id: uuid.UUID
    event_type: str = Field(description="The topic name the event belongs to")
    source: str = Field(min_length=1, description="Who emitted it, e.g. onex-orchestrator")
    correlation_id: uuid.UUID
    timestamp: datetime
    payload: dict[str, Any]

    @field_validator("event_type")
    @classmethod
    def _in_the_catalog(cls, event_type: str) -> str:
        if event_type not in TOPICS_BY_NAME:
            raise ValueError(f"{event_type!r} is not in the topic catalog (contracts/topics.py)")
        return event_type

    @field_serializer("timestamp")
    def _rfc3339(self, value: datetime) -> str:
        return value.astimezone(UTC).isoformat().replace("+00:00", "Z")

    @property
    def topic(self) -> Topic:
        return TOPICS_BY_NAME[self.event_type]

    def key(self) -> bytes:
        """The Kafka message key: the value of the topic's key field (SPEC §5, fixed per family)."""
        field = self.topic.key.value
        value = self.correlation_id if field == "correlation_id" else self.payload.get(field)
        if value is None:
            raise ValueError(f"{self.event_type} events are keyed by {field}; the payload has none")
        return str(value).encode()


def new_envelope(
    event_type: str,
    payload: dict[str, Any],
    *,
    correlation_id: uuid.UUID,
    source: str = "onex-orchestrator",
    event_id: uuid.UUID | None = None,
    timestamp: datetime | None = None,
) -> EventEnvelope:
    """An envelope for a catalog topic. Workflows pass ``event_id`` and ``timestamp`` from
    ``workflow.uuid4()`` and ``workflow.now()`` so that replays produce the same event."""
    return EventEnvelope(
        event_id=event_id or uuid.uuid4(),
        event_type=event_type,
        source=source,
        correlation_id=correlation_id,
        timestamp=timestamp or datetime.now(UTC),
        payload=payload,
    )
