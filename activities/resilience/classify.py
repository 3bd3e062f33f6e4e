"""Native exceptions to the error hierarchy: an ordered table, first match wins (RETRY-5..7).

:func:`classify` turns whatever a client library raised into an
:class:`~contracts.errors.InfraError` with a generic, safe message; the native
exception is chained as ``__cause__`` and its text is never copied (it may hold a DSN, a token
or a query parameter). Only the native class name and, for HTTP, the status code are shown.

The table, :data:`CLASSIFICATION_RULES`, is data: most specific rows first, library rows before
builtin rows (``aiohttp.ClientConnectorError`` and every ``requests`` error are OSErrors,
aiohttp's ``ServerTimeoutError`` is a ``TimeoutError``). In brief, result first::

    asyncpg
      auth         InvalidPassword, InvalidAuthorizationSpecification, InsufficientPrivilege
      timeout      QueryCanceled (statement_timeout), IdleSessionTimeout,
                   IdleInTransactionSessionTimeout
      integrity    IntegrityConstraintViolation (unique, FK, not null, check, exclusion),
                   TransactionIntegrityConstraintViolation
      unavailable  TooManyConnections, CannotConnectNow, AdminShutdown, CrashShutdown,
                   TargetServerAttributeNotMatched
      connection   PostgresConnectionError (08xxx), InterfaceError "connection/pool closed",
                   TransactionRollback (serialization, deadlock), LockNotAvailable (RETRY-5)
      config       SyntaxOrAccessError (42xxx), DataError (22xxx), InvalidCatalogName,
                   InvalidSchemaName, ClientConfigurationError
      unexpected   any other PostgresError, InterfaceError, InternalClientError
    aiokafka
      connection   KafkaConnectionError, NoBrokersAvailable, BrokerNotAvailable,
                   LeaderNotAvailable, NotLeaderForPartition (RETRY-5)
      timeout      KafkaTimeoutError, RequestTimedOut
      auth         Topic/Group/Cluster/TransactionalId/DelegationToken authorization failed,
                   SaslAuthenticationFailed, AuthenticationFailed, IllegalSaslState,
                   DelegationTokenExpired
      rate limited QuotaViolation
      config       UnknownTopicOrPartition, InvalidTopic, RecordTooLarge, MessageSizeTooLarge,
                   Invalid* settings, UnsupportedSaslMechanism, IllegalOperation, ...
      unavailable  any other KafkaError whose ``retriable`` is true
      unexpected   any other KafkaError
    consul (python-consul2)
      auth         ACLPermissionDenied (403), ACLDisabled (401)
      timeout      Timeout
      rate limited ClientError 429
      config       BadRequest, NotFound, any other ClientError (4xx)
      unavailable  ConsulException 5xx
      unexpected   any other ConsulException
    hvac
      auth         Unauthorized, Forbidden
      secret       InvalidPath (404)
      rate limited RateLimitExceeded
      unavailable  InternalServerError, VaultDown, BadGateway, VaultNotInitialized
      config       InvalidRequest, ParamValidationError, UnsupportedOperation
      unexpected   any other VaultError
    valkey (valkey-py)
      auth         AuthenticationError, AuthorizationError, NoPermissionError (NOPERM)
      unavailable  BusyLoadingError (loading its data), MaxConnectionsError, TryAgainError,
                   ClusterDownError, ReadOnlyError (a replica), OutOfMemoryError
      timeout      TimeoutError
      connection   ConnectionError
      config       DataError, any other ResponseError (WRONGTYPE, unknown command, ...)
      unexpected   any other ValkeyError
    aiohttp
      config       ClientConnectorCertificateError, ServerFingerprintMismatch, InvalidURL,
                   NonHttpUrlClientError, TooManyRedirects
      timeout      ServerTimeoutError (connect and socket read timeouts)
      connection   ClientConnectorError (DNS, SSL, proxy), ClientOSError, ServerDisconnected,
                   any other ClientConnectionError, ClientPayloadError
    requests
      timeout      ConnectTimeout, ReadTimeout, Timeout
      connection   ConnectionError (SSL, proxy), ChunkedEncodingError
      config       InvalidURL, MissingSchema, InvalidSchema, InvalidHeader, URLRequired,
                   TooManyRedirects
      unavailable  RetryError (urllib3 gave up on retryable statuses)
    aiohttp.ClientResponseError and requests.HTTPError, by status
      auth 401/403, timeout 408, rate limited 429, unavailable 500/502/503/504,
      config other 4xx; any other status or aiohttp/requests error is unexpected
    builtins
      config       ssl.SSLCertVerificationError
      timeout      TimeoutError (= asyncio.TimeoutError, socket.timeout), errno ETIMEDOUT
      connection   ConnectionError (refused, reset, aborted, broken pipe), socket.gaierror,
                   errno ECONNREFUSED/ECONNRESET/EHOSTUNREACH/ENETUNREACH/...
      config       FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError
      connection   any other OSError
    anything else (ValueError, KeyError, RuntimeError, CancelledError, ...): unexpected

Retryable results (RETRY-7): connection, timeout, rate limited, unavailable. Auth, config,
secret, integrity (C-6) and unexpected are never retried. For rate-limited and unavailable HTTP
responses, ``retry_after`` carries the server's ``Retry-After`` (seconds or an HTTP date).
"""

from __future__ import annotations

import errno
import math
import re
import socket
import ssl
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from email.utils import parsedate_to_datetime
from typing import Any, TypeAlias

import aiohttp
from aiokafka import errors as kafka_errors
from asyncpg import exceptions as pg_errors
from consul import base as consul_errors
from hvac import exceptions as vault_errors
from requests import exceptions as requests_errors
from valkey import exceptions as valkey_errors

from contracts.errors import (
    ConfigurationError,
    ErrorContext,
    InfraAuthenticationError,
    InfraConnectionError,
    InfraDataIntegrityError,
    InfraError,
    InfraRateLimitedError,
    InfraTimeoutError,
    InfraUnavailableError,
    InfraUnexpectedError,
    SecretResolutionError,
    Transport,
)

__all__ = [
    "CLASSIFICATION_RULES",
    "ExceptionMatcher",
    "Rule",
    "When",
    "classify",
    "find_rule",
    "is_retryable",
]

ExceptionTypes: TypeAlias = type[BaseException] | tuple[type[BaseException], ...]


@dataclass(frozen=True)
class When:
    """A predicate row: the exception is one of ``types`` and ``test`` holds for it."""

    types: ExceptionTypes
    test: Callable[[BaseException], bool]
    description: str

    def __call__(self, exc: BaseException) -> bool:
        return isinstance(exc, self.types) and self.test(exc)


ExceptionMatcher: TypeAlias = ExceptionTypes | Callable[[BaseException], bool]
Rule: TypeAlias = tuple[ExceptionMatcher, type[InfraError]]


# ---------------------------------------------------------------------------------------------
# Safe facts about a native exception: a status code, a header value, an errno. Never its text.


def _http_status(exc: BaseException) -> int | None:
    """The HTTP status an aiohttp or requests response error carries, if any."""
    if isinstance(exc, aiohttp.ClientResponseError):
        status = exc.status
        return status if isinstance(status, int) and status > 0 else None
    if isinstance(exc, requests_errors.HTTPError) and exc.response is not None:
        status = exc.response.status_code
        return status if isinstance(status, int) and status > 0 else None
    return None


_CONSUL_STATUS = re.compile(r"^\s*(\d{3})\b")


def _consul_status(exc: BaseException) -> int | None:
    """python-consul2 formats 400, other 4xx and 5xx errors as ``"<code> <body>"``."""
    # ACLDisabled, ACLPermissionDenied and NotFound carry the bare body: digits there mean nothing.
    formatted = isinstance(exc, consul_errors.ClientError | consul_errors.BadRequest) or (
        type(exc) is consul_errors.ConsulException
    )
    if not formatted or not exc.args:
        return None
    first = exc.args[0]
    match = _CONSUL_STATUS.match(first) if isinstance(first, str) else None
    return int(match.group(1)) if match else None


def _status_code(exc: BaseException) -> int | None:
    return _http_status(exc) or _consul_status(exc)


def _http_status_in(codes: Collection[int]) -> Callable[[BaseException], bool]:
    return lambda exc: _http_status(exc) in codes


def _http_status_between(low: int, high: int) -> Callable[[BaseException], bool]:
    def test(exc: BaseException) -> bool:
        status = _http_status(exc)
        return status is not None and low <= status <= high

    return test


def _consul_status_between(low: int, high: int) -> Callable[[BaseException], bool]:
    def test(exc: BaseException) -> bool:
        status = _consul_status(exc)
        return status is not None and low <= status <= high

    return test


def _errno_in(codes: Collection[int]) -> Callable[[BaseException], bool]:
    return lambda exc: getattr(exc, "errno", None) in codes


_CLOSED_WORDS = ("is closed", "is closing", "connection was closed")


def _asyncpg_closed(exc: BaseException) -> bool:
    """asyncpg says "connection is closed" / "pool is closing" through a plain InterfaceError."""
    text = exc.args[0] if exc.args else ""
    return isinstance(text, str) and any(word in text.lower() for word in _CLOSED_WORDS)


def _kafka_retriable(exc: BaseException) -> bool:
    return bool(getattr(exc, "retriable", False))


def _utcnow() -> datetime:
    """The clock an HTTP-date ``Retry-After`` is measured against (tests pin it)."""
    return datetime.now(UTC)


def _retry_after(exc: BaseException) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or HTTP date); None if absent/bad."""
    headers: Any = None
    if isinstance(exc, aiohttp.ClientResponseError):
        headers = exc.headers
    elif isinstance(exc, requests_errors.HTTPError) and exc.response is not None:
        headers = exc.response.headers
    if headers is None:
        return None
    raw = headers.get("Retry-After")
    if not isinstance(raw, str) or not raw.strip():
        return None
    value = raw.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = parsedate_to_datetime(value)
        except (TypeError, ValueError, IndexError):
            return None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        seconds = (when - _utcnow()).total_seconds()
    if not math.isfinite(seconds):
        return None
    return max(0.0, seconds)


# ---------------------------------------------------------------------------------------------
# The table. First match wins: keep subclasses above their bases, libraries above builtins.

_ASYNCPG_RULES: tuple[Rule, ...] = (
    (
        (
            pg_errors.InvalidPasswordError,
            pg_errors.InvalidAuthorizationSpecificationError,
            pg_errors.InsufficientPrivilegeError,  # a SyntaxOrAccessError: must precede it
        ),
        InfraAuthenticationError,
    ),
    (
        (
            pg_errors.QueryCanceledError,  # statement_timeout (or pg_cancel_backend)
            pg_errors.IdleInTransactionSessionTimeoutError,
            pg_errors.IdleSessionTimeoutError,
        ),
        InfraTimeoutError,
    ),
    (
        (
            # 40002 is a TransactionRollbackError, but the same commit fails the same way.
            pg_errors.TransactionIntegrityConstraintViolationError,
            pg_errors.IntegrityConstraintViolationError,
        ),
        InfraDataIntegrityError,
    ),
    (
        (
            pg_errors.TooManyConnectionsError,
            pg_errors.CannotConnectNowError,
            pg_errors.AdminShutdownError,
            pg_errors.CrashShutdownError,
            pg_errors.TargetServerAttributeNotMatched,  # no primary (yet) among the hosts
        ),
        InfraUnavailableError,
    ),
    (pg_errors.PostgresConnectionError, InfraConnectionError),
    (
        When(pg_errors.InterfaceError, _asyncpg_closed, "InterfaceError: connection closed"),
        InfraConnectionError,
    ),
    (
        # Lock contention is retryable (RETRY-5): serialization failure, deadlock, lock_timeout.
        (pg_errors.TransactionRollbackError, pg_errors.LockNotAvailableError),
        InfraConnectionError,
    ),
    (
        (
            pg_errors.SyntaxOrAccessError,  # undefined table/column, syntax errors
            pg_errors.DataError,  # invalid input for a query argument
            pg_errors.InvalidCatalogNameError,  # the database does not exist
            pg_errors.InvalidSchemaNameError,
            pg_errors.ClientConfigurationError,
        ),
        ConfigurationError,
    ),
    (
        (pg_errors.PostgresError, pg_errors.InterfaceError, pg_errors.InternalClientError),
        InfraUnexpectedError,
    ),
)

_KAFKA_RULES: tuple[Rule, ...] = (
    (
        (
            kafka_errors.KafkaConnectionError,
            # Broker not available or leader election: Connection (RETRY-5).
            kafka_errors.NoBrokersAvailable,
            kafka_errors.BrokerNotAvailableError,
            kafka_errors.LeaderNotAvailableError,
            kafka_errors.NotLeaderForPartitionError,
        ),
        InfraConnectionError,
    ),
    ((kafka_errors.KafkaTimeoutError, kafka_errors.RequestTimedOutError), InfraTimeoutError),
    (
        (
            kafka_errors.TopicAuthorizationFailedError,
            kafka_errors.GroupAuthorizationFailedError,
            kafka_errors.ClusterAuthorizationFailedError,
            kafka_errors.TransactionalIdAuthorizationFailed,
            kafka_errors.DelegationTokenAuthorizationFailed,
            kafka_errors.DelegationTokenExpired,
            kafka_errors.SaslAuthenticationFailed,
            kafka_errors.AuthenticationFailedError,
            kafka_errors.IllegalSaslStateError,
        ),
        InfraAuthenticationError,
    ),
    (kafka_errors.QuotaViolationError, InfraRateLimitedError),
    (
        (
            # Retriable for the client (topic metadata still propagating), but our topics come
            # from the catalog: a topic unknown to the broker is a configuration problem.
            kafka_errors.UnknownTopicOrPartitionError,
            kafka_errors.InvalidTopicError,
            kafka_errors.RecordTooLargeError,
            kafka_errors.MessageSizeTooLargeError,
            kafka_errors.RecordListTooLargeError,
            kafka_errors.InvalidRequiredAcksError,
            kafka_errors.InvalidConfigurationError,
            kafka_errors.KafkaConfigurationError,
            kafka_errors.InvalidPartitionsError,
            kafka_errors.InvalidReplicationFactorError,
            kafka_errors.InvalidReplicationAssignmentError,
            kafka_errors.InvalidGroupIdError,
            kafka_errors.InvalidSessionTimeoutError,
            kafka_errors.InvalidRequestError,
            kafka_errors.PolicyViolationError,
            kafka_errors.UnsupportedVersionError,
            kafka_errors.UnsupportedCodecError,
            kafka_errors.UnsupportedSaslMechanismError,
            kafka_errors.AuthenticationMethodNotSupported,
            kafka_errors.SecurityDisabled,
            kafka_errors.IncompatibleBrokerVersion,
            kafka_errors.IllegalArgumentError,
            kafka_errors.IllegalOperation,  # not a KafkaError: e.g. commit without a group_id
        ),
        ConfigurationError,
    ),
    (
        When(kafka_errors.KafkaError, _kafka_retriable, "KafkaError with retriable=True"),
        InfraUnavailableError,
    ),
    (kafka_errors.KafkaError, InfraUnexpectedError),
)

_CONSUL_RULES: tuple[Rule, ...] = (
    ((consul_errors.ACLPermissionDenied, consul_errors.ACLDisabled), InfraAuthenticationError),
    (consul_errors.Timeout, InfraTimeoutError),
    (
        When(consul_errors.ClientError, _consul_status_between(429, 429), "ClientError 429"),
        InfraRateLimitedError,
    ),
    (
        (consul_errors.BadRequest, consul_errors.NotFound, consul_errors.ClientError),
        ConfigurationError,
    ),
    (
        When(consul_errors.ConsulException, _consul_status_between(500, 599), "5xx"),
        InfraUnavailableError,
    ),
    (consul_errors.ConsulException, InfraUnexpectedError),
)

_VAULT_RULES: tuple[Rule, ...] = (
    ((vault_errors.Unauthorized, vault_errors.Forbidden), InfraAuthenticationError),
    (vault_errors.InvalidPath, SecretResolutionError),
    (vault_errors.RateLimitExceeded, InfraRateLimitedError),
    (
        (
            vault_errors.InternalServerError,
            vault_errors.VaultDown,  # 503: sealed or in maintenance
            vault_errors.BadGateway,
            vault_errors.VaultNotInitialized,
        ),
        InfraUnavailableError,
    ),
    (
        (
            vault_errors.InvalidRequest,
            vault_errors.ParamValidationError,
            vault_errors.UnsupportedOperation,
        ),
        ConfigurationError,
    ),
    (vault_errors.VaultError, InfraUnexpectedError),
)

_VALKEY_RULES: tuple[Rule, ...] = (
    (
        # Subclasses of valkey's ConnectionError: these rows go first.
        (
            valkey_errors.AuthenticationError,
            valkey_errors.AuthorizationError,
            valkey_errors.NoPermissionError,
            valkey_errors.AuthenticationWrongNumberOfArgsError,
        ),
        InfraAuthenticationError,
    ),
    (
        (
            valkey_errors.BusyLoadingError,
            valkey_errors.MaxConnectionsError,
            valkey_errors.TryAgainError,
            valkey_errors.ClusterDownError,
            valkey_errors.ReadOnlyError,
            valkey_errors.OutOfMemoryError,
        ),
        InfraUnavailableError,
    ),
    (valkey_errors.TimeoutError, InfraTimeoutError),
    (valkey_errors.ConnectionError, InfraConnectionError),
    ((valkey_errors.DataError, valkey_errors.ResponseError), ConfigurationError),
    (valkey_errors.ValkeyError, InfraUnexpectedError),
)

_HTTP_RESPONSE_TYPES = (aiohttp.ClientResponseError, requests_errors.HTTPError)

_AIOHTTP_RULES: tuple[Rule, ...] = (
    (
        # A certificate that does not verify will not verify next time either.
        (aiohttp.ClientConnectorCertificateError, aiohttp.ServerFingerprintMismatch),
        ConfigurationError,
    ),
    (aiohttp.ServerTimeoutError, InfraTimeoutError),
    (
        (
            aiohttp.ClientConnectorError,
            aiohttp.ClientOSError,
            aiohttp.ServerDisconnectedError,
            aiohttp.ClientConnectionError,
            aiohttp.ClientPayloadError,  # the body was cut short: the connection dropped
        ),
        InfraConnectionError,
    ),
    (
        (aiohttp.InvalidURL, aiohttp.NonHttpUrlClientError, aiohttp.TooManyRedirects),
        ConfigurationError,
    ),
)

_REQUESTS_RULES: tuple[Rule, ...] = (
    (
        # ConnectTimeout is also a ConnectionError: the timeout row goes first.
        (requests_errors.ConnectTimeout, requests_errors.Timeout),
        InfraTimeoutError,
    ),
    (
        (requests_errors.ConnectionError, requests_errors.ChunkedEncodingError),
        InfraConnectionError,
    ),
    (
        (
            requests_errors.InvalidURL,
            requests_errors.MissingSchema,
            requests_errors.InvalidSchema,
            requests_errors.InvalidHeader,
            requests_errors.URLRequired,
            requests_errors.TooManyRedirects,
        ),
        ConfigurationError,
    ),
    (requests_errors.RetryError, InfraUnavailableError),
)

# Shared by aiohttp.ClientResponseError and requests.HTTPError (hvac and consul have their own).
_HTTP_STATUS_RULES: tuple[Rule, ...] = (
    (When(_HTTP_RESPONSE_TYPES, _http_status_in({401, 403}), "401/403"), InfraAuthenticationError),
    (When(_HTTP_RESPONSE_TYPES, _http_status_in({408}), "408"), InfraTimeoutError),
    (When(_HTTP_RESPONSE_TYPES, _http_status_in({429}), "429"), InfraRateLimitedError),
    (
        When(_HTTP_RESPONSE_TYPES, _http_status_in({500, 502, 503, 504}), "500/502/503/504"),
        InfraUnavailableError,
    ),
    (
        When(_HTTP_RESPONSE_TYPES, _http_status_between(400, 499), "other 4xx"),
        ConfigurationError,
    ),
    ((aiohttp.ClientError, requests_errors.RequestException), InfraUnexpectedError),
)

_CONNECTION_ERRNOS = frozenset(
    {
        errno.ECONNREFUSED,
        errno.ECONNRESET,
        errno.ECONNABORTED,
        errno.EHOSTUNREACH,
        errno.EHOSTDOWN,
        errno.ENETUNREACH,
        errno.ENETDOWN,
        errno.EPIPE,
    }
)

_BUILTIN_RULES: tuple[Rule, ...] = (
    (ssl.SSLCertVerificationError, ConfigurationError),
    (TimeoutError, InfraTimeoutError),  # also asyncio.TimeoutError and socket.timeout
    ((ConnectionError, socket.gaierror, socket.herror), InfraConnectionError),
    (When(OSError, _errno_in({errno.ETIMEDOUT}), "errno ETIMEDOUT"), InfraTimeoutError),
    (When(OSError, _errno_in(_CONNECTION_ERRNOS), "connection errno"), InfraConnectionError),
    (
        (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError),
        ConfigurationError,
    ),
    (OSError, InfraConnectionError),
)

CLASSIFICATION_RULES: tuple[Rule, ...] = (
    *_ASYNCPG_RULES,
    *_KAFKA_RULES,
    *_CONSUL_RULES,
    *_VAULT_RULES,
    *_VALKEY_RULES,
    *_AIOHTTP_RULES,
    *_REQUESTS_RULES,
    *_HTTP_STATUS_RULES,
    *_BUILTIN_RULES,
)
"""Ordered (matcher, InfraError subclass) rows; anything unmatched is InfraUnexpectedError."""


_PHRASES: dict[type[InfraError], str] = {
    ConfigurationError: "invalid request or configuration",
    SecretResolutionError: "secret not found",
    InfraConnectionError: "connection failed",
    InfraTimeoutError: "timed out",
    InfraAuthenticationError: "authentication refused",
    InfraRateLimitedError: "rate limited",
    InfraUnavailableError: "unavailable",
    InfraDataIntegrityError: "data integrity violation",
    InfraUnexpectedError: "unexpected error",
}

_RUNTIME_CONTEXT = ErrorContext(
    transport=Transport.RUNTIME, operation="is_retryable", target="classifier"
)


def _matches(matcher: ExceptionMatcher, exc: BaseException) -> bool:
    if isinstance(matcher, type | tuple):
        return isinstance(exc, matcher)
    return matcher(exc)


def find_rule(exc: BaseException) -> Rule | None:
    """The first row of :data:`CLASSIFICATION_RULES` that matches ``exc``, or None."""
    for rule in CLASSIFICATION_RULES:
        if _matches(rule[0], exc):
            return rule
    return None


def classify(exc: BaseException, context: ErrorContext) -> InfraError:
    """``exc`` as an :class:`InfraError` with a safe message, chained to ``exc``.

    An :class:`InfraError` is returned as it is. Anything else becomes a new instance of the
    class the table assigns (:class:`InfraUnexpectedError` when no row matches) with ``context``;
    its message names the operation, the logical target, the failure kind, the native class and,
    for HTTP, the status code. The native text is never copied.
    """
    if isinstance(exc, InfraError):
        return exc
    rule = find_rule(exc)
    error_class = rule[1] if rule is not None else InfraUnexpectedError
    detail = type(exc).__name__
    status = _status_code(exc)
    if status is not None:
        detail = f"{detail}, HTTP {status}"
    phrase = _PHRASES.get(error_class, "unexpected error")
    message = f"{context.operation} on {context.target} failed: {phrase} ({detail})"
    retry_after = (
        _retry_after(exc)
        if issubclass(error_class, InfraRateLimitedError | InfraUnavailableError)
        else None
    )
    error = error_class(message, context=context, retry_after=retry_after)
    error.__cause__ = exc
    return error


def is_retryable(exc: BaseException) -> bool:
    """Whether the orchestrator may retry after ``exc`` (RETRY-7): ``classify(exc).retryable``."""
    return classify(exc, _RUNTIME_CONTEXT).retryable
