"""One error hierarchy for every backend.

::

    InfraError                      retryable?
    ├── ConfigurationError          no   bad or missing configuration, invalid request
    ├── SecretResolutionError       no   a secret is missing, expired or cannot be decrypted
    ├── InfraConnectionError        yes  unreachable, refused, reset, DNS failure
    ├── InfraTimeoutError           yes  a deadline passed
    ├── InfraAuthenticationError    no   bad credentials, expired token, permission denied
    ├── InfraRateLimitedError       yes  throttled (HTTP 429, quotas)
    ├── InfraUnavailableError       yes  down, in maintenance, or its circuit breaker is open
    ├── InfraDataIntegrityError     no   a constraint or invariant would be violated
    ├── InfraUnexpectedError        no   anything we cannot classify: never retried blindly
    ├── CompensationFailedError     no   one or more saga compensations failed
    └── HandlerLoadError            no   a handler contract or plugin was refused (has a code)

Each error carries an :class:`~contracts.errors.ErrorContext` (transport, operation, logical
target, correlation id); its ``code`` follows from the transport. Messages are generic and safe;
the native exception is chained as ``__cause__`` for logs inside the process and never leaves it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from contracts.errors import ERROR_CODE_BY_TRANSPORT, ErrorCode, ErrorContext


class InfraError(Exception):
    """The root of the hierarchy: a failed infrastructure operation, described safely."""

    retryable: ClassVar[bool] = False
    # Whether this failure says something about the dependency's health (circuit breakers).
    transport_failure: ClassVar[bool] = False

    def __init__(
        self,
        message: str,
        *,
        context: ErrorContext,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.context = context
        self.retry_after = retry_after

    @property
    def code(self) -> ErrorCode:
        return ERROR_CODE_BY_TRANSPORT[self.context.transport]

    @property
    def error_type(self) -> str:
        return type(self).__name__

    def __str__(self) -> str:
        return f"{self.message} [{self.code}; {self.context.operation} on {self.context.target}]"


class ConfigurationError(InfraError):
    """Bad or missing configuration, or a request the backend refuses as invalid."""


class SecretResolutionError(InfraError):
    """A secret could not be resolved; the message never names its path or value."""


class InfraConnectionError(InfraError):
    retryable = True
    transport_failure = True


class InfraTimeoutError(InfraError):
    retryable = True
    transport_failure = True


class InfraAuthenticationError(InfraError):
    """Credentials were refused; retrying the same credentials cannot help."""


class InfraRateLimitedError(InfraError):
    retryable = True


class InfraUnavailableError(InfraError):
    """The dependency is down, or its circuit breaker is open (``retry_after`` says how long)."""

    retryable = True
    transport_failure = True


class InfraDataIntegrityError(InfraError):
    """A write would break a constraint: the same request will fail the same way."""


class InfraUnexpectedError(InfraError):
    """An exception nobody classified. Not retried: unknown failures need a human first."""


class CompensationFailedError(InfraError):
    """Some compensations of a saga failed; ``failed_steps`` names them, in the order tried."""

    def __init__(
        self,
        message: str,
        *,
        context: ErrorContext,
        failed_steps: Sequence[str],
    ) -> None:
        super().__init__(message, context=context)
        self.failed_steps = list(failed_steps)


class HandlerLoadError(InfraError):
    """A handler contract or plugin was refused; ``loader_code`` is stable (HANDLER_LOADER_0xx)."""

    def __init__(self, message: str, *, context: ErrorContext, loader_code: str) -> None:
        super().__init__(message, context=context)
        self.loader_code = loader_code
