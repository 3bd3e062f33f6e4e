"""What nodes say about themselves on Kafka, and what the orchestrator keeps about the fleet.

Nodes publish three kinds of event, each in an envelope (:class:`InboundEnvelope`, the
orchestrator's :class:`~contracts.events.EventEnvelope` except that the correlation id may be
missing: the Kafka header, or a new one, stands in):

* ``onex.node.introspection.published.v1``: the payload is a :class:`~contracts.registry.
  RegisterNodeRequest`'s fields plus ``schema_version``; the ingress registers the node;
* ``onex.node.shutdown.announced.v1``: :class:`ShutdownPayload`; the ingress deregisters it;
* ``onex.node.heartbeat.published.v1``: :class:`HeartbeatPayload`; the heartbeat consumer
  records ``last_seen`` (the envelope's timestamp) and the reported state.

A message that does not parse, has another ``schema_version``, or fails validation (an unknown
node type, a missing node id, a credential in its metadata, too many bytes) is refused with a
:class:`Refusal`, whose reason names fields and rules, never values. Nothing here does I/O.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from datetime import datetime
from enum import StrEnum
from typing import Any, Generic, Literal, TypeVar

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError

from contracts.registry import DeregisterNodeRequest, NodeType, RegisterNodeRequest

SCHEMA_VERSION = 1
"""The payload version this orchestrator reads, on every node topic."""
MAX_HEARTBEAT_BYTES = 10 * 1024
"""A heartbeat over this many bytes is refused (they are expected under 1 KB)."""
MAX_INTROSPECTION_BYTES = 64 * 1024
"""An introspection or shutdown message over this many bytes is refused."""


class Refusal(ValueError):
    """A consumed message that cannot be used; ``reason`` is safe to log and dead-letter."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class _Contract(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class InboundEnvelope(_Contract):
    """An event as a node sends it (the correlation id is optional, unlike ours)."""

    event_id: uuid.UUID
    event_type: str = Field(min_length=1, max_length=200)
    source: str = Field(min_length=1, max_length=200)
    correlation_id: uuid.UUID | None = None
    timestamp: AwareDatetime
    payload: dict[str, Any]


class ShutdownPayload(_Contract):
    schema_version: Literal[1]
    node_id: uuid.UUID
    node_type: NodeType
    reason: str = Field(default="shutdown", max_length=200)


class HeartbeatPayload(_Contract):
    schema_version: Literal[1]
    node_id: uuid.UUID
    state: str = Field(default="ready", pattern=r"^[a-z][a-z_]{0,31}$")
    active_operations: int = Field(default=0, ge=0, le=1_000_000)


def problems(error: ValidationError) -> str:
    """``field: message`` per problem, without the input (which may hold a secret)."""
    return "; ".join(
        f"{'.'.join(str(part) for part in problem['loc']) or 'message'}: {problem['msg']}"
        for problem in error.errors(include_url=False, include_input=False)
    )


def parse_envelope(raw: bytes | None, *, max_bytes: int) -> InboundEnvelope:
    """The envelope of a consumed message, or a :class:`Refusal` saying why not."""
    if raw is None or not raw:
        raise Refusal("empty message")
    if len(raw) > max_bytes:
        raise Refusal(f"message is {len(raw)} bytes, over the limit of {max_bytes}")
    try:
        return InboundEnvelope.model_validate_json(raw)
    except ValidationError as error:
        raise Refusal(f"not an event envelope: {problems(error)}") from None


def _payload(envelope: InboundEnvelope) -> dict[str, Any]:
    payload = dict(envelope.payload)
    version = payload.pop("schema_version", None)
    if version != SCHEMA_VERSION:
        shown = "missing" if version is None else repr(version)[:20]
        raise Refusal(f"schema_version {shown} is not supported (this orchestrator reads 1)")
    return payload


def registration(envelope: InboundEnvelope, correlation_id: uuid.UUID) -> RegisterNodeRequest:
    """The register request an introspection event asks for, or a :class:`Refusal`."""
    payload = _payload(envelope)
    try:
        return RegisterNodeRequest.model_validate({**payload, "correlation_id": correlation_id})
    except ValidationError as error:
        raise Refusal(f"invalid introspection: {problems(error)}") from None


def deregistration(envelope: InboundEnvelope, correlation_id: uuid.UUID) -> DeregisterNodeRequest:
    """The deregister request a shutdown event asks for, or a :class:`Refusal`."""
    try:
        shutdown = ShutdownPayload.model_validate(envelope.payload)
    except ValidationError as error:
        _payload(envelope)  # a wrong version says so rather than listing field problems
        raise Refusal(f"invalid shutdown: {problems(error)}") from None
    return DeregisterNodeRequest(
        node_id=shutdown.node_id,
        node_type=shutdown.node_type,
        reason=shutdown.reason,
        correlation_id=correlation_id,
    )


def heartbeat(envelope: InboundEnvelope) -> HeartbeatPayload:
    """The heartbeat an event carries, or a :class:`Refusal`."""
    _payload(envelope)
    try:
        return HeartbeatPayload.model_validate(envelope.payload)
    except ValidationError as error:
        raise Refusal(f"invalid heartbeat: {problems(error)}") from None


class Liveness(StrEnum):
    """What the sweep concluded from a node's heartbeats (``unknown``: it never sent one)."""

    UNKNOWN = "unknown"
    HEALTHY = "healthy"
    UNHEALTHY = "unhealthy"


class FleetState(StrEnum):
    """How ``onex nodes list`` shows a node: inactive, else unhealthy when silent, else active."""

    ACTIVE = "active"
    UNHEALTHY = "unhealthy"
    INACTIVE = "inactive"


class NodeView(_Contract):
    """One node as ``onex nodes list/get`` show it: the registry row and its liveness."""

    node_id: uuid.UUID
    node_type: NodeType
    node_version: str
    service_name: str
    address: str
    port: int
    endpoints: dict[str, str]
    state: FleetState
    liveness: Liveness
    last_seen: datetime | None
    reported_state: str | None
    heartbeat_interval_seconds: float | None = Field(
        description="Between the node's last two heartbeats"
    )
    updated_at: datetime
    open_operation: str | None = Field(
        default=None, description="The workflow id of the operation running on the node, if any"
    )


class LivenessSweepInput(_Contract):
    """One sweep: the silence that makes a node unhealthy, and the jitter that is counted."""

    window_seconds: float = Field(default=90.0, gt=0)
    expected_interval_seconds: float = Field(default=30.0, gt=0)
    jitter_seconds: float = Field(default=15.0, gt=0)
    deregister_after_seconds: float | None = Field(
        default=None,
        gt=0,
        description="The silence policy: after this long, deregister the node (None: never)",
    )


class LivenessSweepResult(_Contract):
    """What a sweep changed: nodes newly marked unhealthy or healthy again, and counts."""

    lost: list[uuid.UUID]
    restored: list[uuid.UUID]
    tracked: int = Field(description="Active nodes that have sent a heartbeat")
    unhealthy: int = Field(description="Of them, those marked unhealthy after this sweep")
    jittery: int = Field(description="Of them, those whose last interval was off by > jitter")
    deregistering: list[uuid.UUID] = Field(
        default_factory=list, description="Nodes whose deregistration the silence policy asked"
    )


T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class Cached(Generic[T]):
    """A registry answer, and where it came from (the read-through cache of
    ``activities/cache.py``); ``stale`` when the database could not be asked."""

    value: T
    stale: bool
    source: Literal["cache", "database"]
    age_seconds: float = 0.0
