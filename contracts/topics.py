"""The Kafka topic catalog (SPEC §5): fifteen topics, their keys, retention and partitions.

Names follow ``onex.<domain>.<entity>.<event>.v<n>``. The key of a topic is fixed by its family
and is a wire contract like the name: node events are keyed by ``node_id``, registry workflow
events by ``workflow_id``, infrastructure signals by ``service_name``, errors by
``correlation_id``, and dead letters by the key of the message they carry (its value is that
message, raw, with the reason in the ``dlq_reason`` header).
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
    ORIGINAL_KEY = "original_key"  # a dead letter keeps the key of the message it carries


class TopicName(StrEnum):
    """Every topic of the catalog, by name: code names topics through this, never a literal."""

    NODE_INTROSPECTION_PUBLISHED = "onex.node.introspection.published.v1"
    NODE_HEARTBEAT_PUBLISHED = "onex.node.heartbeat.published.v1"
    NODE_SHUTDOWN_ANNOUNCED = "onex.node.shutdown.announced.v1"
    REGISTRY_INTROSPECTION_REQUESTED = "onex.registry.introspection.requested.v1"
    REGISTRY_NODE_REGISTERED = "onex.registry.node.registered.v1"
    REGISTRY_NODE_REGISTRATION_FAILED = "onex.registry.node.registration_failed.v1"
    REGISTRY_NODE_DEREGISTERED = "onex.registry.node.deregistered.v1"
    REGISTRY_NODE_LIVENESS_LOST = "onex.registry.node.liveness_lost.v1"
    REGISTRY_NODE_LIVENESS_RESTORED = "onex.registry.node.liveness_restored.v1"
    REGISTRY_WORKFLOW_STARTED = "onex.registry.workflow.started.v1"
    REGISTRY_WORKFLOW_COMPLETED = "onex.registry.workflow.completed.v1"
    REGISTRY_WORKFLOW_FAILED = "onex.registry.workflow.failed.v1"
    INFRA_CIRCUIT_BREAKER_STATE_CHANGED = "onex.infra.circuit_breaker.state_changed.v1"
    INFRA_ERROR_DETECTED = "onex.infra.error.detected.v1"
    INFRA_MESSAGE_DEAD_LETTERED = "onex.infra.message.dead_lettered.v1"


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
        name=TopicName.NODE_INTROSPECTION_PUBLISHED,
        key=TopicKey.NODE_ID,
        retention_ms=_DAY_MS,
        description="A node describes itself (capabilities, endpoints); last write wins.",
    ),
    Topic(
        name=TopicName.NODE_HEARTBEAT_PUBLISHED,
        key=TopicKey.NODE_ID,
        retention_ms=_HOUR_MS,
        description="A node is alive, every 30 s; ephemeral.",
    ),
    Topic(
        name=TopicName.NODE_SHUTDOWN_ANNOUNCED,
        key=TopicKey.NODE_ID,
        retention_ms=_DAY_MS,
        description="A node is going away and says why.",
    ),
    Topic(
        name=TopicName.REGISTRY_INTROSPECTION_REQUESTED,
        key=TopicKey.REQUEST_ID,
        retention_ms=_HOUR_MS,
        description="The registry asks nodes to introspect; best-effort broadcast.",
    ),
    Topic(
        name=TopicName.REGISTRY_NODE_REGISTERED,
        key=TopicKey.NODE_ID,
        retention_ms=7 * _DAY_MS,
        description="A node is in the catalog and the registry database.",
    ),
    Topic(
        name=TopicName.REGISTRY_NODE_REGISTRATION_FAILED,
        key=TopicKey.NODE_ID,
        retention_ms=7 * _DAY_MS,
        description="A registration failed; says which backends succeeded and if a retry helps.",
    ),
    Topic(
        name=TopicName.REGISTRY_NODE_DEREGISTERED,
        key=TopicKey.NODE_ID,
        retention_ms=7 * _DAY_MS,
        description="A node was removed from the catalog and deactivated in the registry.",
    ),
    Topic(
        name=TopicName.REGISTRY_NODE_LIVENESS_LOST,
        key=TopicKey.NODE_ID,
        retention_ms=7 * _DAY_MS,
        description="A node sent no heartbeat for longer than the liveness window (90 s).",
    ),
    Topic(
        name=TopicName.REGISTRY_NODE_LIVENESS_RESTORED,
        key=TopicKey.NODE_ID,
        retention_ms=7 * _DAY_MS,
        description="A node marked unhealthy for its silence is heartbeating again.",
    ),
    Topic(
        name=TopicName.REGISTRY_WORKFLOW_STARTED,
        key=TopicKey.WORKFLOW_ID,
        retention_ms=7 * _DAY_MS,
        description="An orchestrated operation started.",
    ),
    Topic(
        name=TopicName.REGISTRY_WORKFLOW_COMPLETED,
        key=TopicKey.WORKFLOW_ID,
        retention_ms=30 * _DAY_MS,
        description="An orchestrated operation completed.",
    ),
    Topic(
        name=TopicName.REGISTRY_WORKFLOW_FAILED,
        key=TopicKey.WORKFLOW_ID,
        retention_ms=30 * _DAY_MS,
        description="An orchestrated operation failed after its retries.",
    ),
    Topic(
        name=TopicName.INFRA_CIRCUIT_BREAKER_STATE_CHANGED,
        key=TopicKey.SERVICE_NAME,
        retention_ms=7 * _DAY_MS,
        description=(
            "A circuit breaker changed state (service_name, previous_state, new_state, "
            "failure_count, reset_timeout_seconds; reason when an operator forced it)."
        ),
    ),
    Topic(
        name=TopicName.INFRA_ERROR_DETECTED,
        key=TopicKey.CORRELATION_ID,
        retention_ms=7 * _DAY_MS,
        description="An infrastructure error worth an operator's attention (sanitized).",
    ),
    Topic(
        name=TopicName.INFRA_MESSAGE_DEAD_LETTERED,
        key=TopicKey.ORIGINAL_KEY,
        retention_ms=7 * _DAY_MS,
        description="A consumed message refused as invalid: the raw message, the reason in its "
        "headers (dlq_reason, dlq_topic, dlq_partition, dlq_offset).",
    ),
)

TOPICS_BY_NAME: dict[str, Topic] = {topic.name: topic for topic in CATALOG}
