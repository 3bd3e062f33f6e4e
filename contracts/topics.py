"""The Kafka topic catalog (SPEC §5): twelve topics, their keys, retention and partitions.

Names follow ``onex.<domain>.<entity>.<event>.v<n>``. The key of a topic is fixed by its family
and is a wire contract like the name: node events are keyed by ``node_id``, registry workflow
events by ``workflow_id``, infrastructure signals by ``service_name`` and errors by
``correlation_id``.
"""

from __future__ import annotations

from enum import StrEnum

from pydantic import BaseModel, ConfigDict, Field

PARTITIONS = 3
_HOUR_MS = 3_600_000
_DAY_MS = 24 * _HOUR_MS


class TopicKey(StrEnum):
    """The envelope field whose value is the Kafka message key."""

    NODE_ID = "node_id"
    WORKFLOW_ID = "workflow_id"
    SERVICE_NAME = "service_name"
    CORRELATION_ID = "correlation_id"
    REQUEST_ID = "request_id"


class Topic(BaseModel):
    """One catalog entry."""

    model_config = ConfigDict(frozen=True)

    name: str = Field(pattern=r"^onex\.(node|registry|infra)\.[a-z_]+\.[a-z_]+\.v[0-9]+$")
    key: TopicKey
    retention_ms: int = Field(gt=0)
    partitions: int = PARTITIONS
    description: str


CATALOG: tuple[Topic, ...] = (
    Topic(
        name="onex.node.introspection.published.v1",
        key=TopicKey.NODE_ID,
        retention_ms=_DAY_MS,
        description="A node describes itself (capabilities, endpoints); last write wins.",
    ),
    Topic(
        name="onex.node.heartbeat.published.v1",
        key=TopicKey.NODE_ID,
        retention_ms=_HOUR_MS,
        description="A node is alive, every 30 s; ephemeral.",
    ),
    Topic(
        name="onex.node.shutdown.announced.v1",
        key=TopicKey.NODE_ID,
        retention_ms=_DAY_MS,
        description="A node is going away and says why.",
    ),
    Topic(
        name="onex.registry.introspection.requested.v1",
        key=TopicKey.REQUEST_ID,
        retention_ms=_HOUR_MS,
        description="The registry asks nodes to introspect; best-effort broadcast.",
    ),
    Topic(
        name="onex.registry.node.registered.v1",
        key=TopicKey.NODE_ID,
        retention_ms=7 * _DAY_MS,
        description="A node is in the catalog and the registry database.",
    ),
    Topic(
        name="onex.registry.node.registration_failed.v1",
        key=TopicKey.NODE_ID,
        retention_ms=7 * _DAY_MS,
        description="A registration failed; says which backends succeeded and if a retry helps.",
    ),
    Topic(
        name="onex.registry.node.deregistered.v1",
        key=TopicKey.NODE_ID,
        retention_ms=7 * _DAY_MS,
        description="A node was removed from the catalog and deactivated in the registry.",
    ),
    Topic(
        name="onex.registry.workflow.started.v1",
        key=TopicKey.WORKFLOW_ID,
        retention_ms=7 * _DAY_MS,
        description="An orchestrated operation started.",
    ),
    Topic(
        name="onex.registry.workflow.completed.v1",
        key=TopicKey.WORKFLOW_ID,
        retention_ms=30 * _DAY_MS,
        description="An orchestrated operation completed.",
    ),
    Topic(
        name="onex.registry.workflow.failed.v1",
        key=TopicKey.WORKFLOW_ID,
        retention_ms=30 * _DAY_MS,
        description="An orchestrated operation failed after its retries.",
    ),
    Topic(
        name="onex.infra.circuit_breaker.state_changed.v1",
        key=TopicKey.SERVICE_NAME,
        retention_ms=7 * _DAY_MS,
        description="A circuit breaker changed state.",
    ),
    Topic(
        name="onex.infra.error.detected.v1",
        key=TopicKey.CORRELATION_ID,
        retention_ms=7 * _DAY_MS,
        description="An infrastructure error worth an operator's attention (sanitized).",
    ),
)

TOPICS_BY_NAME: dict[str, Topic] = {topic.name: topic for topic in CATALOG}
