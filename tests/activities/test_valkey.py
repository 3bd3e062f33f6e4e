"""The Valkey transport against a real ``valkey-server``: settings, secrets, and faults on the
wire (unreachable, slow, restarting) through the fault proxy, classified as the transport's."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from pydantic import SecretStr, ValidationError
from valkey import exceptions as valkey_errors

from activities.resilience.classify import classify
from activities.settings import ValkeySettings
from activities.valkey import VALKEY_PASSWORD_SECRET, connect_valkey, valkey_context
from contracts.errors import (
    ConfigurationError,
    ErrorCode,
    InfraAuthenticationError,
    InfraConnectionError,
    InfraTimeoutError,
    Transport,
)
from contracts.resilience import default_policy
from tests.fakes.fault_proxy import FaultProxy
from workers.settings import OnexSettings


class _Secrets:
    """A secret store holding one name."""

    def __init__(self, values: dict[str, str]) -> None:
        self.values = values

    async def get_secret(self, name: str, *, required: bool = True) -> Any:
        return self.values.get(name)

    async def refresh(self, name: str) -> None:
        return None


@pytest.fixture
async def proxy(valkey_server: ValkeySettings) -> AsyncIterator[FaultProxy]:
    host, port = valkey_server.host_port
    async with FaultProxy(host, port) as fault_proxy:
        yield fault_proxy


def through(proxy: FaultProxy, settings: ValkeySettings, **update: Any) -> ValkeySettings:
    return settings.model_copy(update={"address": proxy.address, **update})


async def test_valkey_is_opt_in_and_says_which_setting_enables_it() -> None:
    """Without ONEX_VALKEY__ADDRESS the section is disabled and connecting names the variable."""
    settings = OnexSettings().valkey
    assert not settings.enabled, "Valkey must stay off until its address is set (opt-in)"
    with pytest.raises(ConfigurationError, match="ONEX_VALKEY__ADDRESS"):
        await connect_valkey(settings)


def test_an_address_with_a_scheme_or_credentials_is_refused() -> None:
    """The address is host:port only: a URL or userinfo is refused, the password has its own
    setting (or secret)."""
    for bad in ("valkey://cache:6379", "user:pw@cache:6379", "cache"):
        with pytest.raises(ValidationError):
            ValkeySettings(address=bad)


def test_the_transport_defaults_are_the_seed_figures() -> None:
    """VALKEY: breaker 10 failures / 30 s, and errors coded SERVICE_UNAVAILABLE (IDX-1)."""
    breaker = default_policy(Transport.VALKEY).circuit_breaker
    assert (breaker.failure_threshold, breaker.open_seconds) == (10, 30.0)
    error = classify(valkey_errors.ConnectionError("x"), valkey_context("get"))
    assert error.code is ErrorCode.SERVICE_UNAVAILABLE


async def test_commands_round_trip_through_the_real_server(valkey_server: ValkeySettings) -> None:
    """A client built from the settings talks to the server (SET with a TTL, GET, PTTL)."""
    client = await connect_valkey(valkey_server)
    try:
        key = f"onex:test:{uuid.uuid4().hex}"
        assert await client.set(key, "value", px=5000)
        assert await client.get(key) == "value"
        assert 0 < await client.pttl(key) <= 5000
    finally:
        await client.aclose()


async def test_the_password_comes_from_the_secret_store(valkey_server: ValkeySettings) -> None:
    """The secret valkey.password wins over the setting; a wrong one is an auth failure, not a
    connection failure (never retried)."""
    admin = await connect_valkey(valkey_server)
    user = f"onex-{uuid.uuid4().hex[:8]}"
    password = uuid.uuid4().hex
    try:
        await admin.acl_setuser(
            user, enabled=True, passwords=[f"+{password}"], commands=["+ping", "+client|setname"]
        )
        settings = valkey_server.model_copy(
            update={"username": user, "password": SecretStr("not-the-password")}
        )
        good = await connect_valkey(settings, _Secrets({VALKEY_PASSWORD_SECRET: password}))
        try:
            assert await good.ping(), "the secret store's password should be used"
        finally:
            await good.aclose()
        bad = await connect_valkey(settings)
        try:
            with pytest.raises(valkey_errors.AuthenticationError) as raised:
                await bad.ping()
        finally:
            await bad.aclose()
        error = classify(raised.value, valkey_context("ping"))
        assert isinstance(error, InfraAuthenticationError), "a wrong password is auth, not retry"
        assert password not in str(error), "the secret must never reach a message"
        assert "not-the-password" not in str(error), "the setting must never reach a message"
    finally:
        await admin.acl_deluser(user)
        await admin.aclose()


async def test_an_unreachable_server_is_a_retryable_connection_failure(
    valkey_server: ValkeySettings, proxy: FaultProxy
) -> None:
    """With the server cut off, a command fails at once as InfraConnectionError (retryable, a
    transport failure for the breaker)."""
    await proxy.cut()
    client = await connect_valkey(through(proxy, valkey_server))
    try:
        with pytest.raises(valkey_errors.ConnectionError) as raised:
            await client.get("onex:anything")
    finally:
        await client.aclose()
    error = classify(raised.value, valkey_context("get"))
    assert isinstance(error, InfraConnectionError)
    assert error.retryable, "Temporal should retry an unreachable Valkey"
    assert error.transport_failure, "an unreachable Valkey counts against its breaker"


async def test_a_slow_server_is_a_timeout_bounded_by_the_setting(
    valkey_server: ValkeySettings, proxy: FaultProxy
) -> None:
    """Traffic delayed beyond ``timeout`` fails as InfraTimeoutError instead of stalling."""
    client = await connect_valkey(through(proxy, valkey_server, timeout=0.3))
    try:
        assert await client.ping()
        proxy.set_delay(2.0)
        with pytest.raises(valkey_errors.TimeoutError) as raised:
            await client.get("onex:anything")
    finally:
        proxy.set_delay(0.0)
        await client.aclose()
    assert isinstance(classify(raised.value, valkey_context("get")), InfraTimeoutError)


async def test_a_restarting_server_fails_one_command_then_the_client_reconnects(
    valkey_server: ValkeySettings, proxy: FaultProxy
) -> None:
    """A connection reset mid-session fails the command in flight (a connection failure), and
    the next command after the server is back succeeds on a new connection."""
    client = await connect_valkey(through(proxy, valkey_server))
    key = f"onex:test:{uuid.uuid4().hex}"
    try:
        assert await client.set(key, "before")
        await proxy.cut()
        with pytest.raises(valkey_errors.ConnectionError) as raised:
            await client.get(key)
        assert isinstance(classify(raised.value, valkey_context("get")), InfraConnectionError)
        proxy.restore()
        assert await client.get(key) == "before", "the client should reconnect once it is back"
    finally:
        await client.aclose()
