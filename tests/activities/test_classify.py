"""classify(): real native exceptions become the right InfraError, chained, with a safe message."""

from __future__ import annotations

import asyncio
import errno
import socket
import ssl
from datetime import UTC, datetime, timedelta
from email.utils import format_datetime

import aiohttp
import pytest
import requests
from aiohttp.client_reqrep import ConnectionKey
from aiokafka import errors as kafka_errors
from asyncpg import exceptions as pg_errors
from consul import base as consul_errors
from hvac import exceptions as vault_errors
from multidict import CIMultiDict, CIMultiDictProxy
from requests import exceptions as requests_errors
from valkey import exceptions as valkey_errors
from yarl import URL

import activities.resilience.classify as classify_module
from activities.resilience.classify import (
    CLASSIFICATION_RULES,
    classify,
    find_rule,
    is_retryable,
)
from contracts.errors import (
    ERROR_CODE_BY_TRANSPORT,
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

SECRET = "password=hunter2-secret"

# The behaviour the orchestrator relies on, stated here rather than read back from the classes.
RETRYABLE = {InfraConnectionError, InfraTimeoutError, InfraRateLimitedError, InfraUnavailableError}
TRANSPORT_FAILURE = {InfraConnectionError, InfraTimeoutError, InfraUnavailableError}

TARGETS = {
    Transport.DATABASE: "postgresql-primary",
    Transport.KAFKA: "kafka-topic-onex.events",
    Transport.CONSUL: "consul-agent",
    Transport.VAULT: "vault-primary",
    Transport.VALKEY: "valkey",
    Transport.HTTP: "http-api",
    Transport.RUNTIME: "saga",
}


def context_for(transport: Transport) -> ErrorContext:
    return ErrorContext(transport=transport, operation="do_work", target=TARGETS[transport])


def request_info() -> aiohttp.RequestInfo:
    headers = CIMultiDictProxy(CIMultiDict({"Authorization": f"Bearer {SECRET}"}))
    url = URL(f"https://api.example.test/v1/items?{SECRET}")
    return aiohttp.RequestInfo(url=url, method="GET", headers=headers)


def response_error(
    status: int,
    headers: dict[str, str] | None = None,
    cls: type[aiohttp.ClientResponseError] = aiohttp.ClientResponseError,
) -> aiohttp.ClientResponseError:
    multi = CIMultiDictProxy(CIMultiDict(headers)) if headers is not None else None
    return cls(request_info(), (), status=status, message=SECRET, headers=multi)


def http_error(status: int | None, headers: dict[str, str] | None = None) -> requests.HTTPError:
    if status is None:
        return requests_errors.HTTPError(SECRET)
    response = requests.Response()
    response.status_code = status
    response.url = f"https://vault.example.test/v1/secret?{SECRET}"
    response.headers.update(headers or {})
    return requests_errors.HTTPError(SECRET, response=response)


def connection_key() -> ConnectionKey:
    return ConnectionKey(
        host="api.example.test",
        port=443,
        is_ssl=True,
        ssl=True,
        proxy=None,
        proxy_auth=None,
        proxy_headers_hash=None,
    )


class LibraryOSError(OSError):
    """An OSError subclass as some libraries define: Python does not remap its errno."""


DB, KAFKA, CONSUL, VAULT, VALKEY, HTTP, RUNTIME = (
    Transport.DATABASE,
    Transport.KAFKA,
    Transport.CONSUL,
    Transport.VAULT,
    Transport.VALKEY,
    Transport.HTTP,
    Transport.RUNTIME,
)

CASES = [
    # asyncpg ------------------------------------------------------------------------------
    pytest.param(
        pg_errors.InvalidPasswordError(f'password authentication failed for "onex" {SECRET}'),
        DB,
        InfraAuthenticationError,
        id="asyncpg-invalid-password",
    ),
    pytest.param(
        pg_errors.InvalidAuthorizationSpecificationError(f'role "onex" does not exist {SECRET}'),
        DB,
        InfraAuthenticationError,
        id="asyncpg-invalid-authorization",
    ),
    pytest.param(
        pg_errors.InsufficientPrivilegeError(f"permission denied for table runs {SECRET}"),
        DB,
        InfraAuthenticationError,
        id="asyncpg-insufficient-privilege",
    ),
    pytest.param(
        pg_errors.QueryCanceledError(f"canceling statement due to statement timeout {SECRET}"),
        DB,
        InfraTimeoutError,
        id="asyncpg-query-canceled",
    ),
    pytest.param(
        pg_errors.IdleInTransactionSessionTimeoutError(SECRET),
        DB,
        InfraTimeoutError,
        id="asyncpg-idle-in-transaction-timeout",
    ),
    pytest.param(
        pg_errors.UniqueViolationError(f"duplicate key value violates unique {SECRET}"),
        DB,
        InfraDataIntegrityError,
        id="asyncpg-unique-violation",
    ),
    pytest.param(
        pg_errors.ForeignKeyViolationError(SECRET),
        DB,
        InfraDataIntegrityError,
        id="asyncpg-foreign-key-violation",
    ),
    pytest.param(
        pg_errors.NotNullViolationError(SECRET),
        DB,
        InfraDataIntegrityError,
        id="asyncpg-not-null-violation",
    ),
    pytest.param(
        pg_errors.CheckViolationError(SECRET),
        DB,
        InfraDataIntegrityError,
        id="asyncpg-check-violation",
    ),
    pytest.param(
        pg_errors.TransactionIntegrityConstraintViolationError(SECRET),
        DB,
        InfraDataIntegrityError,
        id="asyncpg-deferred-constraint-at-commit",
    ),
    pytest.param(
        pg_errors.TooManyConnectionsError(f"sorry, too many clients already {SECRET}"),
        DB,
        InfraUnavailableError,
        id="asyncpg-too-many-connections",
    ),
    pytest.param(
        pg_errors.CannotConnectNowError(f"the database system is starting up {SECRET}"),
        DB,
        InfraUnavailableError,
        id="asyncpg-cannot-connect-now",
    ),
    pytest.param(
        pg_errors.AdminShutdownError(SECRET),
        DB,
        InfraUnavailableError,
        id="asyncpg-admin-shutdown",
    ),
    pytest.param(
        pg_errors.TargetServerAttributeNotMatched(SECRET),
        DB,
        InfraUnavailableError,
        id="asyncpg-no-primary-among-hosts",
    ),
    pytest.param(
        pg_errors.ConnectionDoesNotExistError(f"connection was closed {SECRET}"),
        DB,
        InfraConnectionError,
        id="asyncpg-connection-does-not-exist",
    ),
    pytest.param(
        pg_errors.ConnectionFailureError(SECRET),
        DB,
        InfraConnectionError,
        id="asyncpg-connection-failure",
    ),
    pytest.param(
        pg_errors.InterfaceError("cannot perform operation: connection is closed"),
        DB,
        InfraConnectionError,
        id="asyncpg-interface-connection-closed",
    ),
    pytest.param(
        pg_errors.InterfaceError("pool is closing"),
        DB,
        InfraConnectionError,
        id="asyncpg-interface-pool-closing",
    ),
    pytest.param(
        pg_errors.SerializationError(f"could not serialize access {SECRET}"),
        DB,
        InfraConnectionError,
        id="asyncpg-serialization-failure",
    ),
    pytest.param(
        pg_errors.DeadlockDetectedError(SECRET),
        DB,
        InfraConnectionError,
        id="asyncpg-deadlock",
    ),
    pytest.param(
        pg_errors.LockNotAvailableError(f"could not obtain lock {SECRET}"),
        DB,
        InfraConnectionError,
        id="asyncpg-lock-not-available",
    ),
    pytest.param(
        pg_errors.UndefinedTableError(f'relation "runs" does not exist {SECRET}'),
        DB,
        ConfigurationError,
        id="asyncpg-undefined-table",
    ),
    pytest.param(
        pg_errors.PostgresSyntaxError(f'syntax error at or near "SELEC" {SECRET}'),
        DB,
        ConfigurationError,
        id="asyncpg-syntax-error",
    ),
    pytest.param(
        pg_errors.InvalidTextRepresentationError(f"invalid input syntax {SECRET}"),
        DB,
        ConfigurationError,
        id="asyncpg-data-error",
    ),
    pytest.param(
        pg_errors.InvalidCatalogNameError(f'database "onex" does not exist {SECRET}'),
        DB,
        ConfigurationError,
        id="asyncpg-database-missing",
    ),
    pytest.param(
        pg_errors.ClientConfigurationError(SECRET),
        DB,
        ConfigurationError,
        id="asyncpg-client-configuration",
    ),
    pytest.param(
        pg_errors.DiskFullError(SECRET),
        DB,
        InfraUnexpectedError,
        id="asyncpg-other-postgres-error",
    ),
    pytest.param(
        pg_errors.InterfaceError(f"cannot perform operation: another operation {SECRET}"),
        DB,
        InfraUnexpectedError,
        id="asyncpg-interface-misuse",
    ),
    # aiokafka -----------------------------------------------------------------------------
    pytest.param(
        kafka_errors.KafkaConnectionError(f"Unable to bootstrap from {SECRET}"),
        KAFKA,
        InfraConnectionError,
        id="kafka-connection-error",
    ),
    pytest.param(
        kafka_errors.NoBrokersAvailable(SECRET),
        KAFKA,
        InfraConnectionError,
        id="kafka-no-brokers-available",
    ),
    pytest.param(
        kafka_errors.LeaderNotAvailableError(SECRET),
        KAFKA,
        InfraConnectionError,
        id="kafka-leader-election",
    ),
    pytest.param(
        kafka_errors.KafkaTimeoutError(SECRET),
        KAFKA,
        InfraTimeoutError,
        id="kafka-timeout",
    ),
    pytest.param(
        kafka_errors.RequestTimedOutError(SECRET),
        KAFKA,
        InfraTimeoutError,
        id="kafka-request-timed-out",
    ),
    pytest.param(
        kafka_errors.TopicAuthorizationFailedError(SECRET),
        KAFKA,
        InfraAuthenticationError,
        id="kafka-topic-authorization-failed",
    ),
    pytest.param(
        kafka_errors.SaslAuthenticationFailed(SECRET),
        KAFKA,
        InfraAuthenticationError,
        id="kafka-sasl-authentication-failed",
    ),
    pytest.param(
        kafka_errors.IllegalSaslStateError(SECRET),
        KAFKA,
        InfraAuthenticationError,
        id="kafka-illegal-sasl-state",
    ),
    pytest.param(
        kafka_errors.QuotaViolationError(SECRET),
        KAFKA,
        InfraRateLimitedError,
        id="kafka-quota-violation",
    ),
    pytest.param(
        kafka_errors.UnknownTopicOrPartitionError(SECRET),
        KAFKA,
        ConfigurationError,
        id="kafka-unknown-topic",
    ),
    pytest.param(
        kafka_errors.RecordTooLargeError(SECRET),
        KAFKA,
        ConfigurationError,
        id="kafka-record-too-large",
    ),
    pytest.param(
        kafka_errors.IllegalOperation(SECRET),
        KAFKA,
        ConfigurationError,
        id="kafka-illegal-operation",
    ),
    pytest.param(
        kafka_errors.NotEnoughReplicasError(SECRET),
        KAFKA,
        InfraUnavailableError,
        id="kafka-other-retriable",
    ),
    pytest.param(
        kafka_errors.CorruptRecordException(SECRET),
        KAFKA,
        InfraUnexpectedError,
        id="kafka-other-non-retriable",
    ),
    # python-consul2 -----------------------------------------------------------------------
    pytest.param(
        consul_errors.ACLPermissionDenied(f"Permission denied {SECRET}"),
        CONSUL,
        InfraAuthenticationError,
        id="consul-acl-permission-denied",
    ),
    pytest.param(
        consul_errors.ACLDisabled(SECRET),
        CONSUL,
        InfraAuthenticationError,
        id="consul-401",
    ),
    pytest.param(consul_errors.Timeout(), CONSUL, InfraTimeoutError, id="consul-timeout"),
    pytest.param(
        consul_errors.ClientError(f"429 {SECRET}"),
        CONSUL,
        InfraRateLimitedError,
        id="consul-429",
    ),
    pytest.param(
        consul_errors.BadRequest(f"400 {SECRET}"),
        CONSUL,
        ConfigurationError,
        id="consul-bad-request",
    ),
    pytest.param(
        consul_errors.NotFound(SECRET),
        CONSUL,
        ConfigurationError,
        id="consul-not-found",
    ),
    pytest.param(
        consul_errors.ClientError(f"409 {SECRET}"),
        CONSUL,
        ConfigurationError,
        id="consul-other-4xx",
    ),
    pytest.param(
        consul_errors.ConsulException(f"500 {SECRET}"),
        CONSUL,
        InfraUnavailableError,
        id="consul-500",
    ),
    pytest.param(
        consul_errors.ConsulException(f"CONSUL_HTTP_ADDR ({SECRET}) invalid"),
        CONSUL,
        InfraUnexpectedError,
        id="consul-other",
    ),
    # hvac ---------------------------------------------------------------------------------
    pytest.param(
        vault_errors.Unauthorized(SECRET, url=f"https://vault/v1/auth?{SECRET}"),
        VAULT,
        InfraAuthenticationError,
        id="vault-unauthorized",
    ),
    pytest.param(
        vault_errors.Forbidden(errors=["permission denied", SECRET]),
        VAULT,
        InfraAuthenticationError,
        id="vault-forbidden",
    ),
    pytest.param(
        vault_errors.InvalidPath(SECRET, url="https://vault/v1/secret/data/db/password"),
        VAULT,
        SecretResolutionError,
        id="vault-invalid-path",
    ),
    pytest.param(
        vault_errors.RateLimitExceeded(SECRET),
        VAULT,
        InfraRateLimitedError,
        id="vault-rate-limited",
    ),
    pytest.param(
        vault_errors.VaultDown(f"Vault is sealed {SECRET}"),
        VAULT,
        InfraUnavailableError,
        id="vault-sealed",
    ),
    pytest.param(
        vault_errors.InternalServerError(SECRET),
        VAULT,
        InfraUnavailableError,
        id="vault-500",
    ),
    pytest.param(
        vault_errors.BadGateway(SECRET),
        VAULT,
        InfraUnavailableError,
        id="vault-502",
    ),
    pytest.param(
        vault_errors.VaultNotInitialized(SECRET),
        VAULT,
        InfraUnavailableError,
        id="vault-not-initialized",
    ),
    # valkey -------------------------------------------------------------------------------
    pytest.param(
        valkey_errors.AuthenticationError(f"{SECRET} on valkey://:pw@cache:6379"),
        VALKEY,
        InfraAuthenticationError,
        id="valkey-auth",
    ),
    pytest.param(
        valkey_errors.AuthorizationError(f"{SECRET} on valkey://:pw@cache:6379"),
        VALKEY,
        InfraAuthenticationError,
        id="valkey-authorization",
    ),
    pytest.param(
        valkey_errors.NoPermissionError(f"{SECRET} on valkey://:pw@cache:6379"),
        VALKEY,
        InfraAuthenticationError,
        id="valkey-noperm",
    ),
    pytest.param(
        valkey_errors.AuthenticationWrongNumberOfArgsError(f"{SECRET} on valkey://:pw@cache:6379"),
        VALKEY,
        InfraAuthenticationError,
        id="valkey-auth-args",
    ),
    pytest.param(
        valkey_errors.BusyLoadingError(f"{SECRET} on valkey://:pw@cache:6379"),
        VALKEY,
        InfraUnavailableError,
        id="valkey-loading",
    ),
    pytest.param(
        valkey_errors.MaxConnectionsError(f"{SECRET} on valkey://:pw@cache:6379"),
        VALKEY,
        InfraUnavailableError,
        id="valkey-max-connections",
    ),
    pytest.param(
        valkey_errors.TryAgainError(f"{SECRET} on valkey://:pw@cache:6379"),  # type: ignore[no-untyped-call]
        VALKEY,
        InfraUnavailableError,
        id="valkey-tryagain",
    ),
    pytest.param(
        valkey_errors.MasterDownError(f"{SECRET} on valkey://:pw@cache:6379"),  # type: ignore[no-untyped-call]
        VALKEY,
        InfraUnavailableError,
        id="valkey-masterdown",
    ),
    pytest.param(
        valkey_errors.ReadOnlyError(f"{SECRET} on valkey://:pw@cache:6379"),
        VALKEY,
        InfraUnavailableError,
        id="valkey-readonly",
    ),
    pytest.param(
        valkey_errors.OutOfMemoryError(f"{SECRET} on valkey://:pw@cache:6379"),
        VALKEY,
        InfraUnavailableError,
        id="valkey-oom",
    ),
    pytest.param(
        valkey_errors.TimeoutError(f"{SECRET} on valkey://:pw@cache:6379"),
        VALKEY,
        InfraTimeoutError,
        id="valkey-timeout",
    ),
    pytest.param(
        valkey_errors.ConnectionError(f"{SECRET} on valkey://:pw@cache:6379"),
        VALKEY,
        InfraConnectionError,
        id="valkey-connection",
    ),
    pytest.param(
        valkey_errors.DataError(f"{SECRET} on valkey://:pw@cache:6379"),
        VALKEY,
        ConfigurationError,
        id="valkey-data",
    ),
    pytest.param(
        valkey_errors.ResponseError(f"{SECRET} on valkey://:pw@cache:6379"),
        VALKEY,
        ConfigurationError,
        id="valkey-wrongtype",
    ),
    pytest.param(
        valkey_errors.PubSubError(f"{SECRET} on valkey://:pw@cache:6379"),
        VALKEY,
        InfraUnexpectedError,
        id="valkey-other",
    ),
    pytest.param(
        vault_errors.InvalidRequest(SECRET),
        VAULT,
        ConfigurationError,
        id="vault-invalid-request",
    ),
    pytest.param(
        vault_errors.ParamValidationError(SECRET),
        VAULT,
        ConfigurationError,
        id="vault-param-validation",
    ),
    pytest.param(
        vault_errors.VaultError.from_status(418, SECRET),
        VAULT,
        InfraUnexpectedError,
        id="vault-other",
    ),
    # aiohttp ------------------------------------------------------------------------------
    pytest.param(
        aiohttp.ClientConnectorCertificateError(
            connection_key(), ssl.SSLCertVerificationError(1, SECRET)
        ),
        HTTP,
        ConfigurationError,
        id="aiohttp-certificate-error",
    ),
    pytest.param(
        aiohttp.ServerFingerprintMismatch(b"expected", b"got", "api.example.test", 443),
        HTTP,
        ConfigurationError,
        id="aiohttp-fingerprint-mismatch",
    ),
    pytest.param(
        aiohttp.ServerTimeoutError(f"Timeout on reading data from socket {SECRET}"),
        HTTP,
        InfraTimeoutError,
        id="aiohttp-server-timeout",
    ),
    pytest.param(
        aiohttp.ConnectionTimeoutError(SECRET),
        HTTP,
        InfraTimeoutError,
        id="aiohttp-connect-timeout",
    ),
    pytest.param(
        aiohttp.ClientConnectorError(
            connection_key(), ConnectionRefusedError(errno.ECONNREFUSED, SECRET)
        ),
        HTTP,
        InfraConnectionError,
        id="aiohttp-connector-refused",
    ),
    pytest.param(
        aiohttp.ClientConnectorDNSError(connection_key(), socket.gaierror(-2, SECRET)),
        HTTP,
        InfraConnectionError,
        id="aiohttp-dns-failure",
    ),
    pytest.param(
        aiohttp.ClientOSError(errno.ECONNRESET, SECRET),
        HTTP,
        InfraConnectionError,
        id="aiohttp-client-os-error",
    ),
    pytest.param(
        aiohttp.ServerDisconnectedError(SECRET),
        HTTP,
        InfraConnectionError,
        id="aiohttp-server-disconnected",
    ),
    pytest.param(
        aiohttp.ClientPayloadError(f"Response payload is not completed {SECRET}"),
        HTTP,
        InfraConnectionError,
        id="aiohttp-payload-cut-short",
    ),
    pytest.param(
        aiohttp.InvalidURL(f"http://onex:{SECRET}@[bad"),
        HTTP,
        ConfigurationError,
        id="aiohttp-invalid-url",
    ),
    pytest.param(
        response_error(302, cls=aiohttp.TooManyRedirects),
        HTTP,
        ConfigurationError,
        id="aiohttp-too-many-redirects",
    ),
    pytest.param(response_error(401), HTTP, InfraAuthenticationError, id="aiohttp-401"),
    pytest.param(response_error(403), HTTP, InfraAuthenticationError, id="aiohttp-403"),
    pytest.param(response_error(408), HTTP, InfraTimeoutError, id="aiohttp-408"),
    pytest.param(response_error(429), HTTP, InfraRateLimitedError, id="aiohttp-429"),
    pytest.param(response_error(500), HTTP, InfraUnavailableError, id="aiohttp-500"),
    pytest.param(response_error(502), HTTP, InfraUnavailableError, id="aiohttp-502"),
    pytest.param(response_error(503), HTTP, InfraUnavailableError, id="aiohttp-503"),
    pytest.param(response_error(504), HTTP, InfraUnavailableError, id="aiohttp-504"),
    pytest.param(response_error(400), HTTP, ConfigurationError, id="aiohttp-400"),
    pytest.param(response_error(404), HTTP, ConfigurationError, id="aiohttp-404"),
    pytest.param(response_error(422), HTTP, ConfigurationError, id="aiohttp-422"),
    pytest.param(response_error(501), HTTP, InfraUnexpectedError, id="aiohttp-501"),
    pytest.param(
        response_error(200, cls=aiohttp.ContentTypeError),
        HTTP,
        InfraUnexpectedError,
        id="aiohttp-content-type",
    ),
    pytest.param(aiohttp.ClientError(SECRET), HTTP, InfraUnexpectedError, id="aiohttp-other"),
    # requests -----------------------------------------------------------------------------
    pytest.param(
        requests_errors.ConnectTimeout(SECRET),
        HTTP,
        InfraTimeoutError,
        id="requests-connect-timeout",
    ),
    pytest.param(
        requests_errors.ReadTimeout(SECRET),
        HTTP,
        InfraTimeoutError,
        id="requests-read-timeout",
    ),
    pytest.param(
        requests_errors.ConnectionError(f"Max retries exceeded {SECRET}"),
        HTTP,
        InfraConnectionError,
        id="requests-connection-error",
    ),
    pytest.param(
        requests_errors.SSLError(SECRET),
        HTTP,
        InfraConnectionError,
        id="requests-ssl-error",
    ),
    pytest.param(
        requests_errors.ChunkedEncodingError(SECRET),
        HTTP,
        InfraConnectionError,
        id="requests-chunked-encoding",
    ),
    pytest.param(
        requests_errors.MissingSchema(f"Invalid URL 'vault:{SECRET}'"),
        HTTP,
        ConfigurationError,
        id="requests-missing-schema",
    ),
    pytest.param(
        requests_errors.InvalidURL(SECRET),
        HTTP,
        ConfigurationError,
        id="requests-invalid-url",
    ),
    pytest.param(
        requests_errors.RetryError(SECRET),
        HTTP,
        InfraUnavailableError,
        id="requests-retries-exhausted",
    ),
    pytest.param(http_error(403), HTTP, InfraAuthenticationError, id="requests-http-403"),
    pytest.param(http_error(408), HTTP, InfraTimeoutError, id="requests-http-408"),
    pytest.param(http_error(429), HTTP, InfraRateLimitedError, id="requests-http-429"),
    pytest.param(http_error(503), HTTP, InfraUnavailableError, id="requests-http-503"),
    pytest.param(http_error(404), HTTP, ConfigurationError, id="requests-http-404"),
    pytest.param(
        http_error(None),
        HTTP,
        InfraUnexpectedError,
        id="requests-http-error-without-response",
    ),
    pytest.param(
        requests_errors.RequestException(SECRET),
        HTTP,
        InfraUnexpectedError,
        id="requests-other",
    ),
    # builtins -----------------------------------------------------------------------------
    pytest.param(
        ssl.SSLCertVerificationError(1, SECRET),
        HTTP,
        ConfigurationError,
        id="builtin-certificate-verify-failed",
    ),
    pytest.param(TimeoutError(SECRET), RUNTIME, InfraTimeoutError, id="builtin-timeout"),
    pytest.param(
        ConnectionRefusedError(errno.ECONNREFUSED, SECRET),
        DB,
        InfraConnectionError,
        id="builtin-connection-refused",
    ),
    pytest.param(
        ConnectionResetError(errno.ECONNRESET, SECRET),
        DB,
        InfraConnectionError,
        id="builtin-connection-reset",
    ),
    pytest.param(
        ConnectionAbortedError(errno.ECONNABORTED, SECRET),
        DB,
        InfraConnectionError,
        id="builtin-connection-aborted",
    ),
    pytest.param(
        BrokenPipeError(errno.EPIPE, SECRET),
        KAFKA,
        InfraConnectionError,
        id="builtin-broken-pipe",
    ),
    pytest.param(
        socket.gaierror(socket.EAI_NONAME, SECRET),
        DB,
        InfraConnectionError,
        id="builtin-dns-failure",
    ),
    pytest.param(
        LibraryOSError(errno.ETIMEDOUT, SECRET),
        DB,
        InfraTimeoutError,
        id="builtin-errno-etimedout",
    ),
    pytest.param(
        OSError(errno.EHOSTUNREACH, SECRET),
        DB,
        InfraConnectionError,
        id="builtin-errno-host-unreachable",
    ),
    pytest.param(
        OSError(errno.ENETUNREACH, SECRET),
        DB,
        InfraConnectionError,
        id="builtin-errno-network-unreachable",
    ),
    pytest.param(
        FileNotFoundError(errno.ENOENT, SECRET),
        RUNTIME,
        ConfigurationError,
        id="builtin-file-not-found",
    ),
    pytest.param(
        PermissionError(errno.EACCES, SECRET),
        RUNTIME,
        ConfigurationError,
        id="builtin-permission-denied",
    ),
    pytest.param(
        IsADirectoryError(errno.EISDIR, SECRET),
        RUNTIME,
        ConfigurationError,
        id="builtin-is-a-directory",
    ),
    pytest.param(
        OSError(errno.EMFILE, SECRET),
        RUNTIME,
        InfraConnectionError,
        id="builtin-other-oserror",
    ),
    pytest.param(ValueError(SECRET), RUNTIME, InfraUnexpectedError, id="builtin-value-error"),
    pytest.param(KeyError(SECRET), RUNTIME, InfraUnexpectedError, id="builtin-key-error"),
    pytest.param(
        RuntimeError(SECRET),
        RUNTIME,
        InfraUnexpectedError,
        id="builtin-runtime-error",
    ),
    pytest.param(
        asyncio.CancelledError(SECRET),
        RUNTIME,
        InfraUnexpectedError,
        id="builtin-cancelled",
    ),
]


@pytest.mark.parametrize(("native", "transport", "expected"), CASES)
def test_native_exception_maps_to_its_class_and_flags(
    native: BaseException, transport: Transport, expected: type[InfraError]
) -> None:
    """Each native exception lands on its class; retryable and breaker flags follow RETRY-7."""
    result = classify(native, context_for(transport))
    assert type(result) is expected
    assert result.retryable is (expected in RETRYABLE)
    assert result.transport_failure is (expected in TRANSPORT_FAILURE)
    assert is_retryable(native) is (expected in RETRYABLE)


@pytest.mark.parametrize(("native", "transport", "expected"), CASES)
def test_result_chains_the_native_exception_and_keeps_the_context(
    native: BaseException, transport: Transport, expected: type[InfraError]
) -> None:
    """The native exception is the cause; context and code come from the caller's transport."""
    context = context_for(transport)
    result = classify(native, context)
    assert result is not native
    assert result.__cause__ is native
    assert result.__suppress_context__
    assert result.context is context
    assert result.code == ERROR_CODE_BY_TRANSPORT[transport]
    assert result.error_type == expected.__name__


@pytest.mark.parametrize(("native", "transport", "expected"), CASES)
def test_message_is_generic_and_never_leaks_native_text(
    native: BaseException, transport: Transport, expected: type[InfraError]
) -> None:
    """The message names operation, target and native class, never the native text or URL."""
    result = classify(native, context_for(transport))
    for shown in (str(result), result.message, repr(result), *map(str, result.args)):
        assert SECRET not in shown
        assert "hunter2" not in shown
    assert result.message.startswith(f"do_work on {TARGETS[transport]} failed: ")
    assert f"({type(native).__name__}" in result.message


def test_every_rule_is_exercised_by_a_case() -> None:
    """Each row of the table is the first match for at least one case above."""
    hit: set[int] = set()
    for case in CASES:
        native = case.values[0]
        assert isinstance(native, BaseException)
        rule = find_rule(native)
        if rule is not None:  # None: the default, InfraUnexpectedError
            hit.add(next(i for i, row in enumerate(CLASSIFICATION_RULES) if row is rule))
    missing = [CLASSIFICATION_RULES[i] for i in range(len(CLASSIFICATION_RULES)) if i not in hit]
    assert not missing


def test_no_class_row_is_shadowed_by_an_earlier_base_class() -> None:
    """Most specific first: no listed class sits below a row that already catches its base."""
    seen: list[type[BaseException]] = []
    for matcher, _ in CLASSIFICATION_RULES:
        if isinstance(matcher, type):
            listed: tuple[type[BaseException], ...] = (matcher,)
        elif isinstance(matcher, tuple):
            listed = matcher
        else:
            continue  # a When predicate narrows its types on purpose
        for cls in listed:
            shadowing = [base for base in seen if issubclass(cls, base)]
            assert not shadowing, f"{cls.__name__} is unreachable behind {shadowing}"
        seen.extend(listed)


def test_an_infra_error_passes_through_unchanged() -> None:
    """An InfraError is already classified: the same object, its own context, comes back."""
    original_context = context_for(Transport.KAFKA)
    error = InfraTimeoutError("publish timed out", context=original_context, retry_after=2.0)
    result = classify(error, context_for(Transport.DATABASE))
    assert result is error
    assert result.context is original_context
    assert result.retry_after == 2.0
    assert result.__cause__ is None


def test_message_has_the_documented_shape() -> None:
    """Operation, logical target, failure kind and native class name, nothing else."""
    context = ErrorContext(
        transport=Transport.DATABASE, operation="execute_query", target="postgresql-primary"
    )
    result = classify(pg_errors.InvalidPasswordError(SECRET), context)
    assert result.message == (
        "execute_query on postgresql-primary failed: authentication refused (InvalidPasswordError)"
    )
    assert str(result) == (
        f"{result.message} [DATABASE_CONNECTION_ERROR; execute_query on postgresql-primary]"
    )


@pytest.mark.parametrize(
    ("native", "status"),
    [
        pytest.param(response_error(503), 503, id="aiohttp"),
        pytest.param(http_error(429), 429, id="requests"),
        pytest.param(consul_errors.ClientError(f"429 {SECRET}"), 429, id="consul-client-error"),
        pytest.param(consul_errors.ConsulException(f"502 {SECRET}"), 502, id="consul-5xx"),
    ],
)
def test_http_status_code_is_shown(native: BaseException, status: int) -> None:
    """A status code is safe to show, and it is the first thing an operator wants to see."""
    result = classify(native, context_for(Transport.HTTP))
    assert f"HTTP {status})" in result.message


def test_body_digits_are_not_taken_for_a_status() -> None:
    """Consul ACL and 404 errors carry only the response body: leading digits there mean nothing."""
    result = classify(consul_errors.NotFound("404 and more"), context_for(Transport.CONSUL))
    assert "HTTP" not in result.message


# Retry-After dates are measured against a pinned clock: the test must not depend on how long
# passes between collection and execution, or on how fast the machine is.
PINNED_NOW = datetime(2026, 1, 15, 12, 0, 0, tzinfo=UTC)


def http_date_in(seconds: float) -> str:
    return format_datetime(PINNED_NOW + timedelta(seconds=seconds), usegmt=True)


@pytest.mark.parametrize(
    ("native", "expected"),
    [
        pytest.param(response_error(429, {"Retry-After": "7"}), 7.0, id="aiohttp-429-secs"),
        pytest.param(
            response_error(503, {"retry-after": http_date_in(30)}), 30.0, id="aiohttp-503-http-date"
        ),
        pytest.param(http_error(429, {"Retry-After": "2.5"}), 2.5, id="requests-429-secs"),
        pytest.param(
            http_error(503, {"Retry-After": http_date_in(-60)}),
            0.0,
            id="requests-503-date-in-the-past",
        ),
    ],
)
def test_retry_after_is_taken_from_the_response(
    native: BaseException, expected: float, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rate-limited and unavailable responses carry the server's Retry-After, in seconds."""
    monkeypatch.setattr(classify_module, "_utcnow", lambda: PINNED_NOW)
    result = classify(native, context_for(Transport.HTTP))
    assert result.retry_after == expected


@pytest.mark.parametrize(
    "native",
    [
        pytest.param(response_error(429), id="no-headers"),
        pytest.param(response_error(429, {"Retry-After": "soon"}), id="unparseable"),
        pytest.param(response_error(503, {"Retry-After": "nan"}), id="not-finite"),
        pytest.param(response_error(400, {"Retry-After": "5"}), id="not-rate-limited"),
        pytest.param(vault_errors.RateLimitExceeded(SECRET), id="no-response-at-all"),
    ],
)
def test_retry_after_is_none_without_a_usable_header(native: BaseException) -> None:
    """No header, a bad value, or a class that is not retried later leaves retry_after unset."""
    assert classify(native, context_for(Transport.HTTP)).retry_after is None


def test_is_retryable_uses_a_runtime_context() -> None:
    """is_retryable needs no context from the caller and agrees with classify()."""
    assert is_retryable(ConnectionRefusedError(errno.ECONNREFUSED, SECRET))
    assert not is_retryable(vault_errors.Forbidden(SECRET))
    assert not is_retryable(pg_errors.UniqueViolationError(SECRET)), "C-6: integrity is final"
    passthrough = InfraRateLimitedError("throttled", context=context_for(Transport.HTTP))
    assert is_retryable(passthrough)
