"""The secret resolver and the Vault client, against the fake Vault driven by the real hvac client.

Sources: environment variables (monkeypatched), files (``tmp_path`` as secrets_dir) and KV v2 in
the fake. Cache lifetimes run on an injected clock; token lifetimes are the fake's real ones (a
few seconds), and waiting on them polls a condition with a deadline, never a sleep.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import structlog
from hvac import exceptions as vault_errors
from pydantic import SecretStr
from requests import exceptions as requests_errors
from temporalio import activity
from temporalio.api.enums.v1 import EventType
from temporalio.exceptions import ApplicationError
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.base import HandlerConfig, HandlerResources
from activities.postgres import PASSWORD_SECRET, POOL_FACTORY_CLIENT, PostgresHandler
from activities.resilience.boundary import ActivityBoundary
from activities.resilience.breaker import BreakerRegistry, BreakerState
from activities.resilience.classify import classify
from activities.resilience.sanitize import sanitize_text
from activities.settings import PostgresSettings, SecretsSettings, VaultSettings
from activities.vault import SecretResolver, VaultClient, build_secret_resolver
from contracts.errors import (
    ConfigurationError,
    ErrorContext,
    InfraAuthenticationError,
    InfraConnectionError,
    InfraTimeoutError,
    InfraUnavailableError,
    SecretResolutionError,
    Transport,
)
from contracts.registry import RegisterNodeRequest
from contracts.resilience import default_policy
from tests.fakes import planted
from tests.fakes.vault_server import FakeVaultServer
from tests.sample_workflows import RunActivity, RunActivityWorkflow
from tests.support import free_port, wait_until
from workers.settings import OnexSettings

ROOT = planted.VAULT_TOKEN
ROLE_ID = "role-onex-worker"
SECRET_ID = planted.APPROLE_SECRET_ID
DB_PATH = "database/postgres"
DB_PASSWORD = "pg-password-v1-Zq8!"
DB_PASSWORD_ROTATED = "pg-password-v2-Lm3?"
VAULT_SOURCE = f"vault:{DB_PATH}#password"

# -- fixtures and helpers ---------------------------------------------------------------------


class FakeClock:
    """The resolver's monotonic clock, moved by hand."""

    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def vault() -> AsyncIterator[FakeVaultServer]:
    """A fake Vault holding the database credentials, tokens valid for 10 minutes."""
    async with FakeVaultServer(root_token=ROOT, token_ttl=600) as server:
        server.put_secret(DB_PATH, {"username": "onex", "password": DB_PASSWORD})
        yield server


@pytest.fixture
def clients() -> Iterator[Callable[..., VaultClient]]:
    """Makes Vault clients (``VaultClient(VaultSettings(**fields), **options)``), closed after."""
    made: list[VaultClient] = []

    def make(*, breakers: BreakerRegistry | None = None, **fields: Any) -> VaultClient:
        client = VaultClient(VaultSettings(**fields), breakers=breakers)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def token_client(
    clients: Callable[..., VaultClient], vault: FakeVaultServer, **fields: Any
) -> VaultClient:
    return clients(address=vault.url, token=SecretStr(ROOT), **fields)


def approle_client(
    clients: Callable[..., VaultClient], vault: FakeVaultServer, **fields: Any
) -> VaultClient:
    vault.add_approle(ROLE_ID, SECRET_ID)
    return clients(address=vault.url, role_id=ROLE_ID, secret_id=SecretStr(SECRET_ID), **fields)


def resolver_for(
    sources: dict[str, str],
    *,
    vault: VaultClient | None = None,
    clock: FakeClock | None = None,
    **secrets: Any,
) -> SecretResolver:
    settings = SecretsSettings(sources=sources, **secrets)
    if clock is None:
        return SecretResolver(settings, vault=vault)
    return SecretResolver(settings, vault=vault, clock=clock)


def value(secret: SecretStr | None) -> str:
    assert secret is not None, "expected a value, got None"
    return secret.get_secret_value()


def approle_logins(vault: FakeVaultServer) -> int:
    return sum(1 for request in vault.requests if request.path == "/v1/auth/approle/login")


def issued_token(vault: FakeVaultServer) -> str:
    """The one AppRole token the fake has handed out so far (tokens look like ``hvs.…``)."""
    (token,) = {served for served in vault.served_secret_values() if served.startswith("hvs.")}
    return token


async def run_until(stop: asyncio.Event, task: asyncio.Task[None]) -> None:
    stop.set()
    await asyncio.wait_for(task, 10)


# -- sources ----------------------------------------------------------------------------------


async def test_env_source_and_convention_fallback(monkeypatch: pytest.MonkeyPatch) -> None:
    """A mapped ``env:VAR`` reads that variable; an unmapped name falls back to
    ONEX_SECRET_<NAME> when env_fallback is on, and is missing when it is off."""
    monkeypatch.setenv("TEST_KAFKA_SASL", "sasl-secret-value")
    monkeypatch.setenv("ONEX_SECRET_CONSUL_TOKEN", "consul-acl-token-1")
    resolver = resolver_for({"kafka.sasl.password": "env:TEST_KAFKA_SASL"})

    assert value(await resolver.get_secret("kafka.sasl.password")) == "sasl-secret-value"
    assert value(await resolver.get_secret("consul.token")) == "consul-acl-token-1"
    assert await resolver.get_secret("llm.openai.api_key", required=False) is None
    with pytest.raises(SecretResolutionError, match=r"llm\.openai\.api_key"):
        await resolver.get_secret("llm.openai.api_key")

    strict = resolver_for({}, env_fallback=False)
    assert await strict.get_secret("consul.token", required=False) is None
    with pytest.raises(SecretResolutionError, match="no source is configured"):
        await strict.get_secret("consul.token")


async def test_file_source_relative_and_absolute(tmp_path: Path) -> None:
    """A relative file is read under secrets_dir, an absolute one where it is; one trailing
    newline is stripped (only one); an empty or missing file is missing, and since the name is
    mapped, that is an error even for a caller that does not require it."""
    secrets_dir = tmp_path / "secrets"
    (secrets_dir / "db").mkdir(parents=True)
    (secrets_dir / "db" / "password").write_text("file-password\n\n")
    absolute = tmp_path / "elsewhere" / "token"
    absolute.parent.mkdir()
    absolute.write_text("absolute-token\r\n")
    (secrets_dir / "empty").write_text("\n")
    resolver = resolver_for(
        {
            "database.postgres.password": "file:db/password",
            "consul.token": f"file:{absolute}",
            "auth.jwt.secret": "file:empty",
            "storage.s3.secret": "file:missing",
        },
        secrets_dir=secrets_dir,
    )

    assert value(await resolver.get_secret("database.postgres.password")) == "file-password\n"
    assert value(await resolver.get_secret("consul.token")) == "absolute-token"
    with pytest.raises(SecretResolutionError, match="from its file source: the file is empty"):
        await resolver.get_secret("auth.jwt.secret", required=False)
    with pytest.raises(SecretResolutionError, match="missing or unreadable") as missing:
        await resolver.get_secret("storage.s3.secret")
    assert str(tmp_path) not in str(missing.value)


async def test_vault_source_field_and_first_value(
    vault: FakeVaultServer, clients: Callable[..., VaultClient]
) -> None:
    """``vault:path#field`` reads that field; without a field, the secret's first value."""
    with pytest.raises(ConfigurationError, match="invalid source"):
        resolver_for({"database.postgres.username": "vault:/"})
    resolver = resolver_for(
        {
            "database.postgres.password": VAULT_SOURCE,
            "database.postgres.username": f"vault:{DB_PATH}",
        },
        vault=token_client(clients, vault),
    )

    assert value(await resolver.get_secret("database.postgres.password")) == DB_PASSWORD
    assert value(await resolver.get_secret("database.postgres.username")) == "onex"
    assert vault.reads[DB_PATH] == 2


# -- cache ------------------------------------------------------------------------------------


async def test_ttl_expiry_refresh_and_stats(
    vault: FakeVaultServer,
    clients: Callable[..., VaultClient],
    clock: FakeClock,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Vault values live 5 minutes, env values 24 hours (expired ones are evicted when next
    read); refresh drops one name and is counted; stats add up."""
    monkeypatch.setenv("ONEX_SECRET_KAFKA_SASL_PASSWORD", "env-sasl-1")
    resolver = resolver_for(
        {"database.postgres.password": VAULT_SOURCE},
        vault=token_client(clients, vault),
        clock=clock,
    )
    db, kafka = "database.postgres.password", "kafka.sasl.password"

    assert value(await resolver.get_secret(db)) == DB_PASSWORD  # miss
    assert value(await resolver.get_secret(kafka)) == "env-sasl-1"  # miss
    vault.rotate_secret(DB_PATH, "password", DB_PASSWORD_ROTATED)
    monkeypatch.setenv("ONEX_SECRET_KAFKA_SASL_PASSWORD", "env-sasl-2")
    clock.now += 299
    assert value(await resolver.get_secret(db)) == DB_PASSWORD  # hit: cached, still stale
    assert value(await resolver.get_secret(kafka)) == "env-sasl-1"  # hit
    assert vault.reads[DB_PATH] == 1

    clock.now += 2  # 301 s: the Vault entry expired, the env one did not
    assert value(await resolver.get_secret(db)) == DB_PASSWORD_ROTATED  # evicted, miss
    assert value(await resolver.get_secret(kafka)) == "env-sasl-1"  # hit
    assert vault.reads[DB_PATH] == 2

    await resolver.refresh(kafka)
    assert value(await resolver.get_secret(kafka)) == "env-sasl-2"  # miss after the refresh
    assert await resolver.refresh_all() == 2
    assert resolver.stats().total_entries == 0

    assert value(await resolver.get_secret(kafka)) == "env-sasl-2"  # miss
    monkeypatch.setenv("ONEX_SECRET_KAFKA_SASL_PASSWORD", "env-sasl-3")
    clock.now += 86_399
    assert value(await resolver.get_secret(kafka)) == "env-sasl-2"  # hit
    clock.now += 2
    assert value(await resolver.get_secret(kafka)) == "env-sasl-3"  # evicted after 24 h, miss

    assert resolver.stats().model_dump() == {
        "total_entries": 1,
        "hits": 4,
        "misses": 6,
        "hit_rate": 0.4,
        "refreshes": 2,
        "expired_evictions": 2,
    }


async def test_concurrent_callers_fetch_once(
    vault: FakeVaultServer, clients: Callable[..., VaultClient]
) -> None:
    """Ten callers missing the cache at once make one Vault read; the others wait for it."""
    resolver = resolver_for(
        {"database.postgres.password": VAULT_SOURCE}, vault=token_client(clients, vault)
    )
    vault.set_latency(0.3)

    values = await asyncio.gather(
        *(resolver.get_secret("database.postgres.password") for _ in range(10))
    )

    assert {value(secret) for secret in values} == {DB_PASSWORD}
    assert vault.reads[DB_PATH] == 1
    stats = resolver.stats()
    assert (stats.misses, stats.hits, stats.total_entries) == (1, 9, 1)


async def test_source_info_is_masked(
    vault: FakeVaultServer,
    clients: Callable[..., VaultClient],
    clock: FakeClock,
    tmp_path: Path,
) -> None:
    """Source info shows the kind and a masked location (the variable name, the secrets dir,
    the first Vault segment), whether it is cached and until when; never a path or value."""
    resolver = resolver_for(
        {
            "kafka.sasl.password": "env:KAFKA_SASL_PASSWORD",
            "consul.token": "file:consul/acl-token",
            "database.postgres.password": VAULT_SOURCE,
        },
        vault=token_client(clients, vault),
        clock=clock,
        secrets_dir=tmp_path,
    )

    env = resolver.get_source_info("kafka.sasl.password")
    file = resolver.get_source_info("consul.token")
    db = resolver.get_source_info("database.postgres.password")
    fallback = resolver.get_source_info("auth.jwt.secret")
    assert env is not None
    assert env.masked_path == "env:KAFKA_SASL_PASSWORD"
    assert file is not None
    assert file.masked_path == f"file:{tmp_path.as_posix()}/***"
    assert db is not None
    assert (db.source_type, db.masked_path) == (
        "vault",
        "vault:database/***/***",
    )
    assert fallback is not None
    assert fallback.masked_path == "env:ONEX_SECRET_AUTH_JWT_SECRET"
    assert (db.is_cached, db.expires_at) == (False, None)
    assert resolver.list_configured_secrets() == sorted(
        ["kafka.sasl.password", "consul.token", "database.postgres.password"]
    )

    await resolver.get_secret("database.postgres.password")
    cached = resolver.get_source_info("database.postgres.password")
    assert cached is not None
    assert (cached.is_cached, cached.expires_at) == (True, clock.now + 300)
    shown = " ".join(info.model_dump_json() for info in (env, file, db, cached) if info is not None)
    for hidden in ("acl-token", DB_PATH, "#password", DB_PASSWORD):
        assert hidden not in shown, f"source info shows {hidden!r}"
    assert resolver_for({}, env_fallback=False).get_source_info("auth.jwt.secret") is None


async def test_path_traversal_is_blocked(tmp_path: Path) -> None:
    """A relative file path leaving secrets_dir (``..``, or a symlink pointing out) is refused
    with SecretResolutionError (required or not: the names are mapped), naming neither path;
    a symlink loop too."""
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    outside = tmp_path / "outside-secret.txt"
    outside.write_text("must-not-be-read")
    (secrets_dir / "escape").symlink_to(outside)
    (secrets_dir / "loop").symlink_to(secrets_dir / "loop")
    resolver = resolver_for(
        {
            "auth.dotdot.secret": "file:../outside-secret.txt",
            "auth.symlink.secret": "file:escape",
            "auth.loop.secret": "file:loop",
        },
        secrets_dir=secrets_dir,
    )

    with structlog.testing.capture_logs() as logs:
        for name in ("auth.dotdot.secret", "auth.symlink.secret", "auth.loop.secret"):
            with pytest.raises(SecretResolutionError, match=rf"{name} is not available from its"):
                await resolver.get_secret(name, required=False)
    with pytest.raises(SecretResolutionError, match="outside the secrets directory") as refused:
        await resolver.get_secret("auth.dotdot.secret")

    message = str(refused.value)
    assert "auth.dotdot.secret" in message
    for hidden in ("outside-secret", str(tmp_path), "must-not-be-read"):
        assert hidden not in message
        assert all(hidden not in str(entry) for entry in logs)
    assert refused.value.context.extra == {"secret": "auth.dotdot.secret"}
    assert (refused.value.context.operation, refused.value.context.target) == (
        "get_secret",
        "secret_resolver",
    )


@pytest.mark.parametrize(
    "name",
    [
        "Database.Postgres.Password",
        "database",
        "database-postgres.password",
        "database..password",
        "database.postgres.password ",
        "1db.password",
        "",
    ],
)
async def test_bad_logical_name_is_a_configuration_error(name: str) -> None:
    """Names are lowercase dotted segments; anything else is refused, saying the expected form
    (without echoing the name, which might be a value passed by mistake)."""
    resolver = resolver_for({})
    with pytest.raises(ConfigurationError, match="lowercase dotted") as refused:
        await resolver.get_secret(name)
    assert "database.postgres.password" in str(refused.value)
    with pytest.raises(ConfigurationError, match="lowercase dotted"):
        await resolver.refresh(name)


def test_bad_source_mapping_is_refused_without_quoting_it() -> None:
    """A mapping with a bad name or a bad source fails at construction; the source text (a
    path) is not quoted."""
    with pytest.raises(ConfigurationError, match="ONEX_SECRETS__SOURCES"):
        resolver_for({"DB_PASSWORD": "env:DB_PASSWORD"})
    for spec in ("plain-value", "s3:bucket/key", "env:  ", "env:BAD-NAME", "vault:#field-x"):
        with pytest.raises(ConfigurationError, match="env:VAR") as refused:
            resolver_for({"database.postgres.password": spec})
        assert spec not in str(refused.value)


# -- Vault disabled, missing, down ------------------------------------------------------------


async def test_vault_disabled() -> None:
    """A Vault-sourced name without a Vault client: SecretResolutionError saying Vault is not
    configured (required or not: the name is mapped), with a warning naming only the logical
    name. build_secret_resolver builds no client when no address is set, and VaultClient
    refuses to exist without one."""
    resolver, client = await build_secret_resolver(
        OnexSettings(secrets=SecretsSettings(sources={"database.postgres.password": VAULT_SOURCE}))
    )
    assert client is None

    with (
        structlog.testing.capture_logs() as logs,
        pytest.raises(SecretResolutionError, match="from its vault source: Vault is not config"),
    ):
        await resolver.get_secret("database.postgres.password", required=False)
    assert logs == [
        {
            "event": "secret_vault_disabled",
            "secret": "database.postgres.password",
            "log_level": "warning",
        }
    ]
    with pytest.raises(SecretResolutionError, match="ONEX_VAULT__ADDRESS") as refused:
        await resolver.get_secret("database.postgres.password")
    assert DB_PATH not in str(refused.value)
    with pytest.raises(ConfigurationError, match="ONEX_VAULT__ADDRESS"):
        VaultClient(VaultSettings())
    with pytest.raises(ConfigurationError, match="ROLE_ID"):
        VaultClient(VaultSettings(address="http://127.0.0.1:1"))


async def test_missing_vault_secret_does_not_name_the_path(
    vault: FakeVaultServer, clients: Callable[..., VaultClient]
) -> None:
    """A missing Vault path or field: SecretResolutionError naming the logical secret and the
    source kind, never the path or field; not required, it is an error too (it is mapped)."""
    resolver = resolver_for(
        {
            "storage.s3.secret": "vault:storage/s3-credentials#secret_key",
            "database.postgres.api_key": f"vault:{DB_PATH}#api_key",
        },
        vault=token_client(clients, vault),
    )
    for name in ("storage.s3.secret", "database.postgres.api_key"):
        with pytest.raises(
            SecretResolutionError, match="from its vault source: it is not in"
        ) as missing:
            await resolver.get_secret(name)
        shown = str(missing.value) + repr(missing.value.context)
        assert name in shown
        for hidden in ("storage/s3", "s3-credentials", "secret_key", DB_PATH, "api_key#", "onex"):
            assert hidden not in str(missing.value), f"{hidden!r} in {missing.value}"
        assert not missing.value.retryable
        with pytest.raises(SecretResolutionError):
            await resolver.get_secret(name, required=False)
    assert vault.reads["storage/s3-credentials"] == 2


async def test_vault_down_is_a_classified_unavailable_error(
    vault: FakeVaultServer, clients: Callable[..., VaultClient]
) -> None:
    """A 503 from Vault is InfraUnavailableError (retryable, SERVICE_UNAVAILABLE) through
    classify(), the hvac VaultDown chained; it propagates even when the secret is optional,
    since an outage is not a missing secret."""
    resolver = resolver_for(
        {"database.postgres.password": VAULT_SOURCE}, vault=token_client(clients, vault)
    )
    vault.fail_next(1, 503)

    with pytest.raises(InfraUnavailableError) as down:
        await resolver.get_secret("database.postgres.password", required=False)

    error = down.value
    assert error.retryable
    assert error.code == "SERVICE_UNAVAILABLE"
    assert isinstance(error.__cause__, vault_errors.VaultDown)
    assert (error.context.transport, error.context.target) == (Transport.VAULT, "vault")
    context = ErrorContext(transport=Transport.VAULT, operation="read_secret", target="vault")
    assert classify(error, context) is error
    assert classify(error.__cause__, context).error_type == "InfraUnavailableError"
    assert DB_PATH not in str(error)
    assert value(await resolver.get_secret("database.postgres.password")) == DB_PASSWORD


async def test_breaker_opens_after_three_failures(
    vault: FakeVaultServer, clients: Callable[..., VaultClient], clock: FakeClock
) -> None:
    """Three failed calls open the vault breaker (3 failures / 60 s); the next call is refused
    without a request; after open_seconds, probe successes close it. A 404 does not count."""
    breakers = BreakerRegistry(clock=clock)
    client = token_client(clients, vault, breakers=breakers)
    with pytest.raises(SecretResolutionError):
        await client.read("no/such/path", "x", name="auth.missing.secret")
    vault.fail_next(3, 503)
    for _ in range(3):
        with pytest.raises(InfraUnavailableError):
            await client.read(DB_PATH, "password", name=PASSWORD_SECRET)
    assert client.breaker.state is BreakerState.OPEN
    requests_before = len(vault.requests)

    with pytest.raises(InfraUnavailableError, match="not attempted") as rejected:
        await client.read(DB_PATH, "password", name=PASSWORD_SECRET)

    assert len(vault.requests) == requests_before, "an open breaker must not call Vault"
    assert rejected.value.retry_after == pytest.approx(60.0)
    clock.now += 61
    for _ in range(2):
        assert value(await client.read(DB_PATH, "password")) == DB_PASSWORD
    assert client.breaker.state is BreakerState.CLOSED


# -- authentication and token upkeep ----------------------------------------------------------


async def test_approle_login(vault: FakeVaultServer, clients: Callable[..., VaultClient]) -> None:
    """Without a token, connect logs in with AppRole and reads with the issued token; a wrong
    secret ID is a non-retryable InfraAuthenticationError."""
    client = approle_client(clients, vault)

    assert await client.connect() == 600
    assert value(await client.read(DB_PATH, "password")) == DB_PASSWORD
    assert (client.logins, approle_logins(vault)) == (1, 1)

    wrong = clients(address=vault.url, role_id=ROLE_ID, secret_id=SecretStr("not-the-secret-id"))
    with pytest.raises(InfraAuthenticationError, match="AppRole") as refused:
        await wrong.connect()
    assert not refused.value.retryable
    assert "not-the-secret-id" not in str(refused.value)


async def test_refused_token_is_replaced_once_per_call(
    vault: FakeVaultServer, clients: Callable[..., VaultClient]
) -> None:
    """A revoked token: the read logs in again (AppRole) and is made once more, in the same
    call. Without AppRole, the refusal is a non-retryable InfraAuthenticationError."""
    client = approle_client(clients, vault)
    await client.connect()
    vault.revoke(issued_token(vault))

    assert value(await client.read(DB_PATH, "password")) == DB_PASSWORD
    assert approle_logins(vault) == 2

    revoked = vault.create_token()
    token_only = clients(address=vault.url, token=SecretStr(revoked))
    vault.revoke(revoked)
    with pytest.raises(InfraAuthenticationError) as refused:
        await token_only.read(DB_PATH, "password")
    assert not refused.value.retryable


async def test_token_is_renewed_ahead_of_expiry(
    clients: Callable[..., VaultClient],
) -> None:
    """A 3 s token with renew_before 2 s: the background task renews it about every second,
    so it never expires; stopping the task ends it promptly."""
    async with FakeVaultServer(root_token=ROOT, token_ttl=3) as vault:
        client = token_client(clients, vault, renew_before=2)
        stop = asyncio.Event()
        task = asyncio.create_task(client.keep_token_fresh(stop))
        try:

            async def renewed_twice() -> bool:
                return vault.renewals >= 2

            await wait_until(renewed_twice, within=15, what="two renewals of the Vault token")
            assert vault.token_ttl_of(ROOT) > 0
        finally:
            await run_until(stop, task)
        assert task.done()
        assert task.exception() is None
        assert client.renewals == vault.renewals
        assert client.renew_delay(3) == 1
        assert client.renew_delay(3600) == 3598


async def test_renewal_of_a_revoked_token_logs_in_again(
    clients: Callable[..., VaultClient],
) -> None:
    """The token is revoked between renewals: the renewal is refused (403), the task logs in
    with AppRole and keeps renewing the new token."""
    async with FakeVaultServer(root_token=ROOT, token_ttl=3) as vault:
        client = approle_client(clients, vault, renew_before=2)
        await client.connect()
        first_token = issued_token(vault)
        stop = asyncio.Event()
        with structlog.testing.capture_logs() as logs:
            task = asyncio.create_task(client.keep_token_fresh(stop))
            try:

                async def looked_up() -> bool:
                    return any(r.path == "/v1/auth/token/lookup-self" for r in vault.requests)

                await wait_until(looked_up, within=10, what="the renewal task's first lookup")
                vault.revoke(first_token)

                async def renewed_after_login() -> bool:
                    return approle_logins(vault) == 2 and vault.renewals >= 1

                await wait_until(renewed_after_login, within=15, what="a new login, then a renewal")
            finally:
                await run_until(stop, task)
        events = [entry["event"] for entry in logs]
        assert "vault_token_renewal_refused" in events
        assert events.index("vault_token_renewal_refused") < events.index("vault_token_renewed")
        vault.put_secret(DB_PATH, {"password": DB_PASSWORD})
        assert value(await client.read(DB_PATH, "password")) == DB_PASSWORD
        assert approle_logins(vault) == 2, "the new token serves reads: no further login"


async def test_build_secret_resolver_connects_and_prefetches(vault: FakeVaultServer) -> None:
    """With an address, the composition root's resolver has a connected Vault client (AppRole
    here) and the Vault-sourced names already cached; a missing one is skipped, not fatal."""
    vault.add_approle(ROLE_ID, SECRET_ID)
    settings = OnexSettings(
        vault=VaultSettings(address=vault.url, role_id=ROLE_ID, secret_id=SecretStr(SECRET_ID)),
        secrets=SecretsSettings(
            sources={
                "database.postgres.password": VAULT_SOURCE,
                "consul.token": "vault:consul/acl#token",
                "kafka.sasl.password": "env:NOT_PREFETCHED",
            }
        ),
    )
    resolver, client = await build_secret_resolver(settings)
    assert client is not None
    try:
        assert client.logins == 1
        assert resolver.stats().total_entries == 1
        assert value(await resolver.get_secret("database.postgres.password")) == DB_PASSWORD
        assert vault.reads == {DB_PATH: 1, "consul/acl": 1}
    finally:
        client.close()


# -- the headline: credential refresh inside one Temporal attempt -----------------------------


class VaultCheckedPostgres:
    """Password authentication, checked against what Vault holds NOW, in front of the embedded
    PostgreSQL (which trusts loopback and would accept any password).

    PostgreSQL checks a password when a connection is opened, and never again for that
    connection. So does this emulation: each pool it creates opens its connections through
    :meth:`connect`, which refuses any password other than Vault's current one with
    ``InvalidPasswordError``, exactly as the server would. After a rotation, existing pooled
    connections still work (as in reality) until they are replaced; :meth:`recycle` replaces
    them (``expire_connections``), as the pool does after their idle lifetime or when the
    database ended those sessions.
    """

    def __init__(self, vault: FakeVaultServer) -> None:
        self.vault = vault
        self.pools: list[Any] = []
        # Each connection attempt: which password was offered ("v1", "v2"), and was it accepted?
        self.connections: list[tuple[str, bool]] = []

    async def create_pool(self, **options: Any) -> Any:
        pool = await asyncpg.create_pool(connect=self.connect, **options)
        self.pools.append(pool)
        return pool

    async def connect(self, *args: Any, **options: Any) -> Any:
        password = options.get("password")
        accepted = password == self.vault.secrets[DB_PATH]["password"]
        label = {DB_PASSWORD: "v1", DB_PASSWORD_ROTATED: "v2"}.get(str(password), "other")
        self.connections.append((label, accepted))
        if not accepted:
            raise asyncpg.exceptions.InvalidPasswordError(
                'password authentication failed for user "onex"'
            )
        return await asyncpg.connect(*args, **options)

    async def recycle(self) -> None:
        for pool in self.pools:
            if not pool.is_closing():
                await pool.expire_connections()


def register_request() -> RegisterNodeRequest:
    return RegisterNodeRequest.model_validate(
        {
            "node_id": uuid.uuid4(),
            "node_type": "effect",
            "node_version": "1.0.0",
            "service_name": "billing",
            "address": "10.0.0.7",
            "port": 8080,
            "endpoints": {"health": "http://10.0.0.7:8080/health"},
            "correlation_id": uuid.uuid4(),
        }
    )


async def test_rotated_postgres_password_is_refreshed_within_one_temporal_attempt(
    time_skipping_env: WorkflowEnvironment,
    backends: OnexSettings,
    pg_dsn: str,
    vault: FakeVaultServer,
    clients: Callable[..., VaultClient],
    task_queue: str,
) -> None:
    """Credential refresh: the Vault fake rotates the PostgreSQL password; the next operation
    fails authentication once, refreshes, and succeeds within the same Temporal attempt.

    The handler's password comes from a real SecretResolver reading the fake Vault; its
    operations are real activities behind the real ActivityBoundary, run from a workflow.
    Nobody invalidates the resolver's cache by hand: the refused connection makes the handler
    call refresh("database.postgres.password") itself.
    """
    resolver = resolver_for({PASSWORD_SECRET: VAULT_SOURCE}, vault=token_client(clients, vault))
    database = VaultCheckedPostgres(vault)
    settings = OnexSettings(
        postgres=PostgresSettings(
            host=backends.postgres.host,
            port=backends.postgres.port,
            database=pg_dsn.rsplit("/", 1)[1],
            user=backends.postgres.user,
        )
    )
    handler = PostgresHandler(
        HandlerResources(
            settings=settings.postgres,
            breakers=BreakerRegistry(),
            secrets=resolver,
            clients={POOL_FACTORY_CLIENT: database.create_pool},
        )
    )
    await handler.initialize(
        HandlerConfig(
            handler_name="postgres",
            transport=Transport.DATABASE,
            operations=("upsert_node", "get_node"),
            policy=default_policy(Transport.DATABASE),
        )
    )
    boundary = ActivityBoundary(
        transport=Transport.DATABASE,
        target=handler.target,
        policy=default_policy(Transport.DATABASE),
        breakers=BreakerRegistry(),
    )
    activities: list[Callable[..., Any]] = [
        activity.defn(name="postgres.upsert_node")(
            boundary.wrap("upsert_node", handler.upsert_node)
        ),
        activity.defn(name="postgres.get_node")(boundary.wrap("get_node", handler.get_node)),
    ]
    request = register_request()
    client = time_skipping_env.client
    try:
        async with Worker(
            client,
            task_queue=task_queue,
            workflows=[RunActivityWorkflow],
            activities=activities,
        ):
            upserted = await client.execute_workflow(
                RunActivityWorkflow.run,
                RunActivity(
                    activity="postgres.upsert_node",
                    argument=request.model_dump(mode="json"),
                    max_attempts=3,
                ),
                id=f"vault-refresh-upsert-{uuid.uuid4()}",
                task_queue=task_queue,
            )
            assert upserted["previous"] is None
            assert database.connections == [("v1", True)] * 2, "the pool's 2 connections"

            vault.rotate_secret(DB_PATH, "password", DB_PASSWORD_ROTATED)
            await database.recycle()  # the next acquire opens a new connection

            handle = await client.start_workflow(
                RunActivityWorkflow.run,
                RunActivity(
                    activity="postgres.get_node",
                    argument={"node_id": str(request.node_id)},
                    max_attempts=3,
                ),
                id=f"vault-refresh-get-{uuid.uuid4()}",
                task_queue=task_queue,
            )
            found = await handle.result()
    finally:
        await handler.shutdown(10)

    node: Any = found["node"]
    assert node["node_id"] == str(request.node_id)
    history = await handle.fetch_history()
    started = [
        event.activity_task_started_event_attributes.attempt
        for event in history.events
        if event.event_type == EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED
    ]
    assert started == [1], f"the activity needed Temporal retries: attempts {started}"
    assert resolver.stats().refreshes == 1
    assert vault.reads[DB_PATH] == 2, "the password is read at start and once after refresh"
    # The operation's connection with the old password was refused (asyncpg's min-size upkeep
    # of the stale pool may try once more in the background before the pool is closed); every
    # connection with the new password was accepted.
    refused = {label for label, accepted in database.connections if not accepted}
    assert refused == {"v1"}
    assert database.connections.count(("v2", True)) >= 2
    assert len(database.pools) == 2
    assert database.pools[0].is_closing()
    shown = history.to_json()
    for password in (DB_PASSWORD, DB_PASSWORD_ROTATED):
        assert password not in shown, "a password reached the workflow history"


# -- nothing secret in any log line -----------------------------------------------------------


async def test_no_secret_value_in_any_log_line(
    caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """A full run (AppRole login, env/file/Vault reads, renewals, a revoked token and a new
    login, a rotation with refresh, a missing secret, an outage) logs no token, no password,
    no secret ID: every structlog event and every stdlib record (hvac, urllib3) is checked."""
    monkeypatch.setenv("ONEX_SECRET_KAFKA_SASL_PASSWORD", "env-sasl-password-77")
    (tmp_path / "consul-token").write_text("file-consul-token-88\n")
    caplog.set_level(logging.DEBUG)
    async with FakeVaultServer(root_token=ROOT, token_ttl=3) as vault:
        vault.put_secret(DB_PATH, {"username": "registry-owner", "password": DB_PASSWORD})
        vault.add_approle(ROLE_ID, SECRET_ID)
        settings = OnexSettings(
            vault=VaultSettings(
                address=vault.url,
                role_id=ROLE_ID,
                secret_id=SecretStr(SECRET_ID),
                renew_before=2,
            ),
            secrets=SecretsSettings(
                sources={
                    PASSWORD_SECRET: VAULT_SOURCE,
                    "consul.token": "file:consul-token",
                    "auth.jwt.secret": "vault:auth/jwt#secret",
                },
                secrets_dir=tmp_path,
            ),
        )
        with structlog.testing.capture_logs() as logs:
            resolver, client = await build_secret_resolver(settings)
            assert client is not None
            stop = asyncio.Event()
            task = asyncio.create_task(client.keep_token_fresh(stop))
            try:
                await resolver.get_secret("kafka.sasl.password")
                await resolver.get_secret("consul.token")

                async def renewed() -> bool:
                    return vault.renewals >= 1

                await wait_until(renewed, within=15, what="a token renewal")
                vault.revoke(issued_token(vault))

                async def logged_in_again() -> bool:
                    return approle_logins(vault) == 2 and vault.renewals >= 2

                await wait_until(logged_in_again, within=15, what="a new login and renewal")
                vault.rotate_secret(DB_PATH, "password", DB_PASSWORD_ROTATED)
                await resolver.refresh(PASSWORD_SECRET)
                assert value(await resolver.get_secret(PASSWORD_SECRET)) == DB_PASSWORD_ROTATED
                with pytest.raises(SecretResolutionError):  # mapped, and not in Vault
                    await resolver.get_secret("auth.jwt.secret", required=False)
            finally:
                await run_until(stop, task)
            try:
                # With the renewal task stopped, the injected failure is surely the read's.
                await resolver.refresh(PASSWORD_SECRET)
                vault.fail_next(1, 503)
                with pytest.raises(InfraUnavailableError) as down:
                    await resolver.get_secret(PASSWORD_SECRET)
                logging.getLogger("onex.test").warning("outage: %s", down.value)
            finally:
                client.close()

        served = vault.served_secret_values()
    secrets = served | {"env-sasl-password-77", "file-consul-token-88", SECRET_ID, ROOT}
    tokens = {secret for secret in served if secret.startswith("hvs.")}
    assert {DB_PASSWORD, DB_PASSWORD_ROTATED} <= served, "vacuous check: no password served"
    assert len(tokens) == 2, "vacuous check: expected two AppRole tokens"
    assert logs, "nothing was logged through structlog: the check would prove nothing"
    assert caplog.records, "nothing was logged through logging: the check would prove nothing"
    lines = [repr(entry) for entry in logs]
    lines += [record.getMessage() for record in caplog.records]
    lines.append(caplog.text)
    for line in lines:
        leaked = [secret for secret in secrets if secret in line]
        assert not leaked, f"a secret value appears in a log line: {sanitize_text(line)}"


# -- error classes: timeout, refused connection, refused token, breaker recovery --------------


async def test_slow_vault_is_a_retryable_timeout(
    vault: FakeVaultServer, clients: Callable[..., VaultClient]
) -> None:
    """Timeout: Vault answers 2 s late (the fake's latency) and the client's timeout is 0.5 s.
    Reading a secret fails at the client's timeout with InfraTimeoutError (retryable), classified
    from requests' ReadTimeout (hvac hands its timeout to requests); it propagates through the
    resolver even for an optional secret (a slow Vault is not a missing secret) and counts
    against the vault breaker. With Vault fast again, the next read succeeds."""
    client = token_client(clients, vault, timeout=0.5)
    resolver = resolver_for({PASSWORD_SECRET: VAULT_SOURCE}, vault=client)
    vault.set_latency(2)
    try:
        with pytest.raises(InfraTimeoutError) as slow:
            await resolver.get_secret(PASSWORD_SECRET, required=False)
    finally:
        vault.set_latency(0)

    error = slow.value
    assert error.retryable
    assert error.error_type == "InfraTimeoutError"
    # A ReadTimeout (not an answer 2 s later) shows the client's 0.5 s timeout applied.
    assert isinstance(error.__cause__, requests_errors.ReadTimeout)
    assert (error.context.transport, error.context.operation) == (Transport.VAULT, "read_secret")
    assert DB_PATH not in str(error)
    assert client.breaker.snapshot().consecutive_failures == 1
    assert value(await resolver.get_secret(PASSWORD_SECRET)) == DB_PASSWORD
    assert client.breaker.snapshot().consecutive_failures == 0


async def test_vault_refusing_connections_is_a_retryable_connection_error(
    clients: Callable[..., VaultClient],
) -> None:
    """Refused connection: Vault's address is a closed local port. Reading a secret (through
    the resolver, even an optional one) and checking the token both fail at once with
    InfraConnectionError (retryable), classified from requests' ConnectionError; each counts
    against the vault breaker. Neither message names the token; a read's does not name the
    address either, while connecting (what a starting worker reports) names it and its setting:
    an address never holds a credential (the settings refuse userinfo)."""
    address = f"127.0.0.1:{free_port()}"
    client = clients(address=f"http://{address}", token=SecretStr(ROOT))
    resolver = resolver_for({PASSWORD_SECRET: VAULT_SOURCE}, vault=client)

    with pytest.raises(InfraConnectionError) as refused:
        await resolver.get_secret(PASSWORD_SECRET, required=False)
    with pytest.raises(InfraConnectionError) as refused_connect:
        await client.connect()

    for error in (refused.value, refused_connect.value):
        assert error.retryable
        assert type(error.__cause__) is requests_errors.ConnectionError
        assert error.context.transport is Transport.VAULT
        assert ROOT not in str(error)
    assert address not in str(refused.value)
    assert str(refused_connect.value).startswith(
        f"cannot reach vault at http://{address}: connection failed (ConnectionError); check "
        "ONEX_VAULT__ADDRESS"
    )
    assert client.breaker.snapshot().consecutive_failures == 2


async def test_refused_token_without_approle_is_a_non_retryable_auth_error(
    vault: FakeVaultServer, clients: Callable[..., VaultClient]
) -> None:
    """Authentication failure without AppRole: a token this Vault never issued, and one that
    expired, are refused (403 permission denied). With no role ID and secret ID there is
    nothing to log in with, so the read fails with InfraAuthenticationError (not retryable),
    classified from hvac's Forbidden, and no login is tried. A refusal is an answer, not an
    outage: the breaker counts no failure. Behind the activity boundary it is a non-retryable
    ApplicationError of that type without a retry delay. The token appears nowhere: not in
    the error, its context, or the ApplicationError's message and details."""
    unknown = f"hvs.never-issued-{uuid.uuid4().hex}"
    expired = vault.create_token()
    vault.expire(expired)
    for token in (unknown, expired):
        client = clients(address=vault.url, token=SecretStr(token))
        assert not client.approle_configured

        with pytest.raises(InfraAuthenticationError) as refused:
            await client.read(DB_PATH, "password", name=PASSWORD_SECRET)
        error = refused.value
        assert not error.retryable
        assert isinstance(error.__cause__, vault_errors.Forbidden)
        assert token not in str(error) + repr(error.context)
        snapshot = client.breaker.snapshot()
        assert (snapshot.total_failures, snapshot.total_successes) == (0, 1)

        boundary = ActivityBoundary(
            transport=Transport.VAULT,
            target="vault",
            policy=default_policy(Transport.VAULT),
            breakers=BreakerRegistry(),
        )
        with pytest.raises(ApplicationError) as failed:
            await boundary.wrap("read_secret", client.read)(DB_PATH, "password")
        assert failed.value.type == "InfraAuthenticationError"
        assert failed.value.non_retryable is True
        assert failed.value.next_retry_delay is None
        [details] = failed.value.details
        assert (details["error_type"], details["retryable"]) == ("InfraAuthenticationError", False)
        assert token not in str(failed.value) + json.dumps(details, default=str)
    assert approle_logins(vault) == 0
    assert vault.reads[DB_PATH] == 0, "Vault served the secret to a refused token"


async def test_vault_breaker_recovers_after_its_open_time(
    vault: FakeVaultServer, clients: Callable[..., VaultClient], clock: FakeClock
) -> None:
    """Breaker recovery after an outage: three reads time out (2 s latency, 0.5 s timeout)
    and open the vault breaker. It refuses reads without a request until open_seconds (60 s,
    on a fake clock) have passed; then it is half-open and admits a probe. A probe that fails
    (503) opens it for another full open_seconds; with Vault healthy, the first probe success
    leaves it half-open and the second (success_threshold 2) closes it."""
    settings = default_policy(Transport.VAULT).circuit_breaker
    assert (settings.failure_threshold, settings.open_seconds) == (3, 60)
    assert settings.success_threshold == 2
    client = token_client(clients, vault, timeout=0.5, breakers=BreakerRegistry(clock=clock))
    breaker = client.breaker
    vault.set_latency(2)
    try:
        for _ in range(3):
            with pytest.raises(InfraTimeoutError):
                await client.read(DB_PATH, "password")
    finally:
        vault.set_latency(0)
    assert breaker.state is BreakerState.OPEN

    async def rejected_for(seconds: float) -> None:
        """The next read is refused without a request, for ``seconds`` more."""
        sent = len(vault.requests)
        with pytest.raises(InfraUnavailableError, match="not attempted") as rejected:
            await client.read(DB_PATH, "password")
        assert rejected.value.retry_after == pytest.approx(seconds)
        assert len(vault.requests) == sent, "an open breaker must not call Vault"

    clock.now += settings.open_seconds - 1
    await rejected_for(1.0)
    clock.now += 1.5
    assert breaker.state is BreakerState.HALF_OPEN
    vault.fail_next(1, 503)
    with pytest.raises(InfraUnavailableError) as probe_failed:
        await client.read(DB_PATH, "password")
    assert isinstance(probe_failed.value.__cause__, vault_errors.VaultDown)
    assert breaker.state is BreakerState.OPEN

    clock.now += settings.open_seconds - 1
    await rejected_for(1.0)
    clock.now += 1.5
    assert breaker.state is BreakerState.HALF_OPEN
    assert value(await client.read(DB_PATH, "password")) == DB_PASSWORD
    assert breaker.state is BreakerState.HALF_OPEN
    assert value(await client.read(DB_PATH, "password")) == DB_PASSWORD
    assert breaker.state is BreakerState.CLOSED
    snapshot = breaker.snapshot()
    assert (snapshot.total_failures, snapshot.total_rejections, snapshot.total_successes) == (
        4,
        2,
        2,
    )
    assert snapshot.consecutive_failures == 0
