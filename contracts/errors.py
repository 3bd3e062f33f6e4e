"""Errors: the one exception tree, and the data that crosses process boundaries.

Every exception this project raises on purpose is an :class:`InfraError`. Grouping bases say
what a caller can do about it, in the httpx style: ``except InfraTransientError`` catches every
failure worth retrying, ``except InfraPermanentError`` every one that needs a change first.

::

    InfraError                          the root: a message safe to show, and an ErrorContext
    ├── InfraTransientError             retried (Temporal, with the boundary's backoff)
    │   ├── InfraConnectionError        unreachable, refused, reset, DNS failure
    │   ├── InfraTimeoutError           a deadline passed
    │   ├── InfraRateLimitedError       throttled (HTTP 429, quotas)
    │   └── InfraUnavailableError       down, in maintenance
    │       ├── CircuitOpenError        its circuit breaker is open (activities.resilience.breaker)
    │       └── DemoEventsMissing       the demo's events did not reach Kafka (workers.demo)
    └── InfraPermanentError             never retried: something must change first
        ├── ConfigurationError          bad or missing configuration, an invalid request
        │   ├── SettingsError           an ONEX_* setting is invalid (workers.settings)
        │   ├── PlanError               an operation contract does not fit its handlers
        │   └── BreakerNotFound         no breaker of that name (activities.resilience.fleet)
        ├── SecretResolutionError       a secret is missing, expired or cannot be decrypted
        ├── InfraAuthenticationError    bad credentials, expired token, permission denied
        ├── InfraDataIntegrityError     a constraint or invariant would be violated
        ├── InfraUnexpectedError        anything nobody classified: never retried blindly
        ├── CompensationFailedError     one or more saga compensations failed
        ├── HandlerLoadError            a contract or plugin was refused (has a loader code)
        ├── OperationError              the client helpers (workers.client)
        │   ├── OperationNotFound       no operation workflow with that id
        │   └── OperationFinished       it has ended, so it cannot be retried
        ├── WorkerStartError            a handler could not start (workers.host)
        └── StackError                  the embedded stack (workers.devstack)
            ├── BinaryNotFoundError     a server binary is not installed
            ├── PortInUseError          a port is taken by a process the stack did not start
            └── ServiceStartError       a server did not become healthy, or exited

An activity failure reaches the workflow as ``ApplicationError(type=<class name>)``; the class
names that Temporal must never retry are derived from this tree (:data:`NON_RETRYABLE_ERROR_TYPES`).
Each error carries an :class:`ErrorContext` (transport, operation, logical target, correlation
id), and its ``code`` follows from the transport. Messages are generic and safe; the native
exception is chained as ``__cause__`` for logs inside the process and never leaves it.

This module imports nothing that does I/O, so workflows may name these types.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from enum import StrEnum
from typing import Any, ClassVar
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


class InfraError(Exception):
    """The root of the hierarchy: a failure described safely, with where it happened."""

    retryable: ClassVar[bool] = False
    # Whether this failure says something about the dependency's health (circuit breakers).
    transport_failure: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        context: ErrorContext | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.context = context or ErrorContext(
            transport=Transport.RUNTIME, operation=type(self).__name__, target="onex"
        )
        self.retry_after = retry_after

    @property
    def code(self) -> ErrorCode:
        return ERROR_CODE_BY_TRANSPORT[self.context.transport]

    @property
    def error_type(self) -> str:
        return type(self).__name__

    def __str__(self) -> str:
        if self.context.transport is Transport.RUNTIME:
            return self.message
        return f"{self.message} [{self.code}; {self.context.operation} on {self.context.target}]"


class InfraTransientError(InfraError):
    """The dependency may answer differently later: Temporal retries these."""

    retryable = True


class InfraPermanentError(InfraError):
    """Retrying the same call cannot help: configuration, credentials or the request must change."""


class InfraConnectionError(InfraTransientError):
    transport_failure = True


class InfraTimeoutError(InfraTransientError):
    transport_failure = True


class InfraRateLimitedError(InfraTransientError):
    """Throttled: the dependency is healthy, so breakers do not count it."""


class InfraUnavailableError(InfraTransientError):
    """The dependency is down, or its circuit breaker is open (``retry_after`` says how long)."""

    transport_failure = True


class ConfigurationError(InfraPermanentError):
    """Bad or missing configuration, or a request the backend refuses as invalid."""


class SecretResolutionError(InfraPermanentError):
    """A secret could not be resolved; the message never names its path or value."""


class InfraAuthenticationError(InfraPermanentError):
    """Credentials were refused; retrying the same credentials cannot help."""

    @classmethod
    def at(
        cls, target: str, remedy: str, *, context: ErrorContext | None = None
    ) -> InfraAuthenticationError:
        """``authentication failed at <target>: <remedy>``: where, and what the user can do.

        ``remedy`` names settings and logical secrets, never a value or a path.
        """
        return cls(f"authentication failed at {target}: {remedy}", context=context)


class InfraDataIntegrityError(InfraPermanentError):
    """A write would break a constraint: the same request will fail the same way."""


class InfraUnexpectedError(InfraPermanentError):
    """An exception nobody classified. Not retried: unknown failures need a human first."""


class CompensationFailedError(InfraPermanentError):
    """Some compensations of a saga failed; ``failed_steps`` names them, in the order tried.

    A workflow cannot raise it (workflows fail with ``ApplicationError``): it fails with
    ``ApplicationError(type=CompensationFailedError.__name__)``, and the client reads that type.
    """

    def __init__(
        self,
        message: str,
        *,
        context: ErrorContext | None = None,
        failed_steps: Sequence[str] = (),
    ) -> None:
        super().__init__(message, context=context)
        self.failed_steps = list(failed_steps)


class HandlerLoadError(InfraPermanentError):
    """A handler contract or plugin was refused; ``loader_code`` is stable (HANDLER_LOADER_0xx)."""

    def __init__(
        self, message: str, *, context: ErrorContext | None = None, loader_code: str
    ) -> None:
        super().__init__(message, context=context)
        self.loader_code = loader_code


class OperationError(InfraPermanentError):
    """The client helpers could not do what was asked of an operation."""


def _permanent_types(root: type[InfraError]) -> Iterator[type[InfraError]]:
    for subclass in root.__subclasses__():
        # Only this module's classes: the tuple must not depend on what else was imported.
        if subclass.__module__ == __name__ and not subclass.retryable:
            yield subclass
        yield from _permanent_types(subclass)


# ``ApplicationError.type`` values Temporal must never retry. Activities already mark these
# failures non-retryable; retry policies list them too, as a second line of defence.
NON_RETRYABLE_ERROR_TYPES: tuple[str, ...] = tuple(
    sorted({cls.__name__ for cls in _permanent_types(InfraError)})
)
