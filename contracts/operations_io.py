"""The operation workflow's input and result, and the payloads of the events it emits.

Everything here is pure and deterministic: the workflow imports it.
"""

from __future__ import annotations

import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from contracts.operation_contract import OperationPlan
from contracts.topics import TopicName


class OperationStatus(StrEnum):
    RUNNING = "running"
    SUCCESS = "success"
    PARTIAL = "partial"
    FAILED = "failed"
    COMPENSATED = "compensated"
    COMPENSATION_FAILED = "compensation_failed"
    # Compensations ran out of budget: the operation stays open, waiting for an operator to
    # resume them (``resume_compensation``) or to give up (``abandon``).
    COMPENSATION_PAUSED = "compensation_paused"
    # Accepted by the node's workflow, waiting for the operations on the node before it.
    QUEUED = "queued"


class StepStatus(StrEnum):
    PENDING = "pending"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    SKIPPED = "skipped"
    COMPENSATED = "compensated"
    COMPENSATION_FAILED = "compensation_failed"
    # The undo found newer work by another run (or a row that is no longer this run's) and
    # changed nothing: an undo never destroys newer work. Not a failure.
    SUPERSEDED = "superseded"


class OperationInput(BaseModel):
    """What a client starts the operation workflow with: the compiled plan and the request."""

    model_config = ConfigDict(frozen=True)

    plan: OperationPlan
    request: dict[str, Any]
    correlation_id: uuid.UUID


class BackendResult(BaseModel):
    """The outcome of one step, as users see it (errors already sanitized)."""

    backend: str
    status: StepStatus = StepStatus.PENDING
    success: bool = False
    error_code: str | None = None
    error_type: str | None = None
    error: str | None = None
    skip_reason: str | None = None
    # Why the step's undo changed nothing (status superseded): the newer writer's workflow id.
    superseded_reason: str | None = None
    duration_ms: float = 0.0
    attempts: int = 0
    result: dict[str, Any] | None = Field(default=None, exclude=True)


class OperationResult(BaseModel):
    """The outcome of an operation (SPEC §3.3)."""

    operation: str
    workflow_id: str
    status: OperationStatus
    backends: list[BackendResult]
    correlation_id: uuid.UUID
    duration_ms: float
    failed_backends: list[str]
    failed_compensations: list[str] = Field(default_factory=list)
    # Why the operation waits (compensation_paused) or was abandoned, in an operator's words.
    reason: str | None = None
    # Outcome events that could not be queued within their budget (never dropped silently).
    undelivered_events: list[str] = Field(default_factory=list)

    def memo(self) -> dict[str, str]:
        """The per-backend summary kept in the workflow memo (shown in the UI)."""
        return {backend.backend: backend.status.value for backend in self.backends}


REGISTERED_TTL_SECONDS = 300
SUGGESTED_RETRY_DELAY_SECONDS = 30


def event_payload(
    topic: str,
    *,
    request: dict[str, Any],
    result: OperationResult,
    now: datetime,
) -> dict[str, Any]:
    """The payload of ``topic`` for an operation's outcome (PATTERNS TOPIC-10..13)."""
    by_backend = {backend.backend: backend for backend in result.backends}
    consul = by_backend.get("consul")
    postgres = by_backend.get("postgres")
    node_id = request.get("node_id")
    if topic == TopicName.REGISTRY_NODE_REGISTERED:
        service = (consul.result or {}) if consul and consul.success else {}
        return {
            "node_id": node_id,
            "registration_id": result.workflow_id,
            "consul_service_id": service.get("service_id"),
            "postgres_row_id": node_id if postgres and postgres.success else None,
            "registered_at": now.isoformat(),
            "ttl_seconds": REGISTERED_TTL_SECONDS,
        }
    if topic == TopicName.REGISTRY_NODE_REGISTRATION_FAILED:
        # A failed step keeps its error after its (ambiguous) undo ran: look for the error, not
        # the status, so that a compensated failure is still the one reported.
        first_failure = next((b for b in result.backends if b.error is not None), None)
        return {
            "node_id": node_id,
            "error_code": first_failure.error_code if first_failure else None,
            "error_message": first_failure.error if first_failure else None,
            "consul_success": bool(consul and consul.success),
            "postgres_success": bool(postgres and postgres.success),
            "retry_eligible": result.status in (OperationStatus.PARTIAL,),
            "suggested_retry_delay_seconds": SUGGESTED_RETRY_DELAY_SECONDS,
            "status": result.status.value,
        }
    if topic == TopicName.REGISTRY_NODE_DEREGISTERED:
        return {
            "node_id": node_id,
            "reason": request.get("reason", "requested"),
            "consul_deregistered": bool(consul and consul.success),
            "postgres_deregistered": bool(postgres and postgres.success),
            "deregistered_at": now.isoformat(),
        }
    # onex.registry.workflow.{started,completed,failed}.v1
    return {
        "workflow_id": result.workflow_id,
        "operation": result.operation,
        "status": result.status.value,
        "node_id": node_id,
        "failed_backends": result.failed_backends,
        "at": now.isoformat(),
    }
