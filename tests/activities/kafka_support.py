"""Helpers shared by the Kafka and outbox tests."""

from __future__ import annotations

import uuid
from typing import Any

from contracts.events import EventEnvelope, new_envelope
from workers.settings import OnexSettings

REGISTERED = "onex.registry.node.registered.v1"
DEREGISTERED = "onex.registry.node.deregistered.v1"


def with_kafka(settings: OnexSettings, **changes: Any) -> OnexSettings:
    return settings.model_copy(update={"kafka": settings.kafka.model_copy(update=changes)})


def registered(node_id: uuid.UUID | None = None) -> EventEnvelope:
    return new_envelope(
        REGISTERED,
        {"node_id": str(node_id or uuid.uuid4()), "registration_id": str(uuid.uuid4())},
        correlation_id=uuid.uuid4(),
    )
