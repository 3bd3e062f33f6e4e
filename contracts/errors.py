"""Error data that crosses process boundaries: transports, codes, and the sanitized context.

The exception classes live in :mod:`activities.resilience.errors`; what travels in a Temporal
failure (``ApplicationError.type`` and ``details``) is described here, so that workflows can name
error types without importing anything that does I/O.
"""

from __future__ import annotations

from enum import StrEnum
from typing import Any
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field


class Transport(StrEnum):
    """What kind of dependency an operation talks to; it decides the error code."""

    DATABASE = "database"
    HTTP = "http"
    GRPC = "grpc"
    KAFKA = "kafka"
    CONSUL = "consul"
    VAULT = "vault"
    VALKEY = "valkey"
    RUNTIME = "runtime"


class ErrorCode(StrEnum):
    DATABASE_CONNECTION_ERROR = "DATABASE_CONNECTION_ERROR"
    NETWORK_ERROR = "NETWORK_ERROR"
    SERVICE_UNAVAILABLE = "SERVICE_UNAVAILABLE"
    RUNTIME_ERROR = "RUNTIME_ERROR"


ERROR_CODE_BY_TRANSPORT: dict[Transport, ErrorCode] = {
    Transport.DATABASE: ErrorCode.DATABASE_CONNECTION_ERROR,
    Transport.HTTP: ErrorCode.NETWORK_ERROR,
    Transport.GRPC: ErrorCode.NETWORK_ERROR,
    Transport.KAFKA: ErrorCode.SERVICE_UNAVAILABLE,
    Transport.CONSUL: ErrorCode.SERVICE_UNAVAILABLE,
    Transport.VAULT: ErrorCode.SERVICE_UNAVAILABLE,
    Transport.VALKEY: ErrorCode.SERVICE_UNAVAILABLE,
    Transport.RUNTIME: ErrorCode.RUNTIME_ERROR,
}

# ``ApplicationError.type`` values Temporal must never retry. Activities already mark these
# failures non-retryable; retry policies list them too, as a second line of defence.
NON_RETRYABLE_ERROR_TYPES: tuple[str, ...] = (
    "ConfigurationError",
    "SecretResolutionError",
    "InfraAuthenticationError",
    "InfraDataIntegrityError",
    "InfraUnexpectedError",
    "CompensationFailedError",
    "HandlerLoadError",
)


class ErrorContext(BaseModel):
    """Where an error happened. Every field is safe to show: ``target`` is a logical name."""

    model_config = ConfigDict(frozen=True)

    transport: Transport
    operation: str
    target: str = Field(description="A logical name such as postgresql-primary, never a DSN")
    correlation_id: UUID | None = None
    extra: dict[str, Any] = Field(default_factory=dict)


class ErrorDetails(BaseModel):
    """What an activity failure carries in ``ApplicationError.details[0]`` (already sanitized)."""

    model_config = ConfigDict(frozen=True)

    error_type: str
    code: ErrorCode
    retryable: bool
    message: str
    context: ErrorContext
    attempt: int | None = None
    next_retry_delay_seconds: float | None = None
