"""The Valkey transport: one asyncio client per process, built from :class:`ValkeySettings`.

Valkey is a helper, never a source of truth (the database is): the fleet's circuit breakers
share their state through it (:mod:`activities.resilience.fleet`) and registry reads are cached
in it (:mod:`activities.cache`). Both degrade gracefully when it is away, so every command is
bounded by ``timeout`` (connect and socket): a slow Valkey costs a call that long at most.

The password is the secret :data:`VALKEY_PASSWORD_SECRET` from the secret store, else the
``password`` setting. Failures are classified by the ``valkey`` rows of
:mod:`activities.resilience.classify` (transport ``valkey``: ``SERVICE_UNAVAILABLE``, breaker
10 failures / 30 s).
"""

from __future__ import annotations

import ssl
from typing import Final

from valkey.asyncio import Valkey

from activities.base import SecretSource, secret_or_setting
from activities.settings import ValkeySettings
from contracts.errors import ConfigurationError, ErrorContext, Transport

__all__ = ["VALKEY_PASSWORD_SECRET", "VALKEY_TARGET", "connect_valkey", "valkey_context"]

VALKEY_PASSWORD_SECRET: Final = "valkey.password"  # noqa: S105 - a name, not a value
VALKEY_TARGET: Final = "valkey"
"""The logical name of the dependency in errors and logs (never its address)."""


def valkey_context(operation: str) -> ErrorContext:
    return ErrorContext(transport=Transport.VALKEY, operation=operation, target=VALKEY_TARGET)


async def connect_valkey(
    settings: ValkeySettings, secrets: SecretSource | None = None, *, client_name: str = "onex"
) -> Valkey:
    """A client for ``settings`` (no I/O yet: it connects on its first command).

    Raises :class:`ConfigurationError` when Valkey is not configured (``ONEX_VALKEY__ADDRESS``).
    """
    if not settings.enabled:
        raise ConfigurationError(
            "Valkey is not configured: set ONEX_VALKEY__ADDRESS to its host:port",
            context=valkey_context("connect"),
        )
    host, port = settings.host_port
    password = await secret_or_setting(secrets, VALKEY_PASSWORD_SECRET, settings.password)
    tls: dict[str, object] = {}
    if settings.tls:
        tls = {
            "ssl": True,
            "ssl_cert_reqs": ssl.CERT_REQUIRED,
            "ssl_ca_certs": None if settings.tls_ca_file is None else str(settings.tls_ca_file),
            "ssl_check_hostname": True,
        }
    return Valkey(
        host=host,
        port=port,
        db=settings.database,
        username=settings.username,
        password=None if password is None else password.get_secret_value(),
        socket_timeout=settings.timeout,
        socket_connect_timeout=settings.timeout,
        # A dropped connection is noticed by the next command, which fails fast and is retried
        # by its caller's own policy: no hidden retry loop inside the client (RETRY-1).
        retry_on_timeout=False,
        health_check_interval=0,
        client_name=client_name,
        decode_responses=True,
        **tls,  # type: ignore[arg-type]
    )
