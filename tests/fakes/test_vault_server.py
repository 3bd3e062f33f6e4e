"""The fake Vault server driven by the real (synchronous) hvac client.

The fake serves from a thread of its own, so these async tests call hvac directly; one test
shows the ``asyncio.to_thread`` route the activities use.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator

import hvac
import pytest
import requests
from hvac import exceptions as vault_errors

from tests.fakes import planted
from tests.fakes.vault_server import FakeVaultServer

ROOT = planted.VAULT_TOKEN
PASSWORD = "db-password-Xy7!q2"


@pytest.fixture
async def vault() -> AsyncIterator[FakeVaultServer]:
    async with FakeVaultServer(root_token=ROOT, token_ttl=600) as vault:
        yield vault


@pytest.fixture
def client(vault: FakeVaultServer) -> Iterator[hvac.Client]:
    client = hvac.Client(url=vault.url, token=ROOT)
    try:
        yield client
    finally:
        client.adapter.close()


def _read(client: hvac.Client, path: str) -> dict[str, object]:
    response = client.secrets.kv.v2.read_secret_version(path, raise_on_deleted_version=True)
    data: dict[str, object] = response["data"]["data"]
    return data


def test_sys_health_and_sealed(vault: FakeVaultServer, client: hvac.Client) -> None:
    """/v1/sys/health is 200 and unsealed; sealed it is 503 (hvac returns the response, as it
    asks not to raise), and every other call raises VaultDown("Vault is sealed")."""
    health = client.sys.read_health_status(method="GET")
    assert health["initialized"] is True
    assert health["sealed"] is False
    assert health["standby"] is False
    assert client.sys.is_sealed() is False

    vault.set_sealed(True)
    sealed = client.sys.read_health_status(method="GET")
    assert sealed.status_code == 503
    assert sealed.json()["sealed"] is True
    with pytest.raises(vault_errors.VaultDown, match="Vault is sealed"):
        client.auth.token.lookup_self()

    vault.set_sealed(False)
    assert client.is_authenticated()


def test_token_lookup_and_renewal(vault: FakeVaultServer, client: hvac.Client) -> None:
    """lookup-self reports the remaining TTL, expiry and renewability; renew-self answers with
    the same token and a new lease, and is counted."""
    data = client.auth.token.lookup_self()["data"]
    assert 0 < data["ttl"] <= 600
    assert data["renewable"] is True
    assert data["policies"] == ["root"]
    assert data["expire_time"].endswith("Z")

    vault.token_ttl = 900
    auth = client.auth.token.renew_self()["auth"]
    assert auth["client_token"] == ROOT
    assert auth["lease_duration"] == 900
    assert auth["renewable"] is True
    assert vault.renewals == 1
    assert client.auth.token.renew_self(increment="30s")["auth"]["lease_duration"] == 30
    assert vault.renewals == 2
    assert vault.token_ttl_of(ROOT) <= 30


def test_kv_v2_read_and_missing_path(vault: FakeVaultServer, client: hvac.Client) -> None:
    """A stored secret reads back with its metadata; a missing path raises InvalidPath."""
    vault.put_secret("onex/db", {"username": "onex", "password": PASSWORD})
    response = client.secrets.kv.v2.read_secret_version("onex/db", raise_on_deleted_version=True)
    assert response["data"]["data"] == {"username": "onex", "password": PASSWORD}
    assert response["data"]["metadata"]["version"] == 1
    assert response["data"]["metadata"]["deletion_time"] == ""
    assert response["data"]["metadata"]["destroyed"] is False

    with pytest.raises(vault_errors.InvalidPath):
        _read(client, "onex/missing")
    assert vault.reads == {"onex/db": 1, "onex/missing": 1}


def test_kv_v2_write_rotate_and_delete(vault: FakeVaultServer, client: hvac.Client) -> None:
    """A client write creates a version (check-and-set honoured); rotate_secret changes what the
    next read returns; a soft-deleted latest version reads as InvalidPath."""
    created = client.secrets.kv.v2.create_or_update_secret("app", secret={"password": "one"})
    assert created["data"]["version"] == 1
    with pytest.raises(vault_errors.InvalidRequest, match="check-and-set"):
        client.secrets.kv.v2.create_or_update_secret("app", secret={"password": "x"}, cas=0)

    assert _read(client, "app") == {"password": "one"}
    assert vault.rotate_secret("app", "password", "two") == 2
    assert _read(client, "app") == {"password": "two"}
    assert vault.secrets["app"] == {"password": "two"}

    client.secrets.kv.v2.delete_latest_version_of_secret("app")
    with pytest.raises(vault_errors.InvalidPath):
        _read(client, "app")


def test_approle_login(vault: FakeVaultServer) -> None:
    """AppRole login with the right IDs returns a fresh renewable token the client then uses;
    wrong IDs are 400, InvalidRequest("invalid role or secret ID")."""
    vault.add_approle("role-onex", "secret-id-42", policies=["onex"])
    client = hvac.Client(url=vault.url)
    try:
        auth = client.auth.approle.login(role_id="role-onex", secret_id="secret-id-42")["auth"]
        assert auth["client_token"].startswith("hvs.")
        assert auth["renewable"] is True
        assert auth["lease_duration"] == vault.token_ttl
        assert auth["policies"] == ["default", "onex"]
        assert client.token == auth["client_token"]
        assert client.auth.token.lookup_self()["data"]["path"] == "auth/approle/login"

        with pytest.raises(vault_errors.InvalidRequest, match="invalid role or secret ID"):
            client.auth.approle.login(role_id="role-onex", secret_id="wrong")
    finally:
        client.adapter.close()


def test_bad_expired_and_revoked_tokens_are_forbidden(vault: FakeVaultServer) -> None:
    """An unknown, expired or revoked token is 403 "permission denied": hvac raises Forbidden."""
    expiring = vault.create_token(ttl=600)
    revoked = vault.create_token()
    vault.put_secret("s", {"v": "x"})
    vault.expire(expiring)
    vault.revoke(revoked)
    for token in ("no-such-token", expiring, revoked):
        client = hvac.Client(url=vault.url, token=token)
        try:
            with pytest.raises(vault_errors.Forbidden, match="permission denied"):
                _read(client, "s")
            with pytest.raises(vault_errors.Forbidden):
                client.auth.token.renew_self()
            assert client.is_authenticated() is False
        finally:
            client.adapter.close()
    assert vault.renewals == 0


@pytest.mark.parametrize(
    ("status", "error"),
    [
        (500, vault_errors.InternalServerError),
        (502, vault_errors.BadGateway),
        (503, vault_errors.VaultDown),
        (429, vault_errors.RateLimitExceeded),
    ],
)
def test_injected_statuses(
    vault: FakeVaultServer,
    client: hvac.Client,
    status: int,
    error: type[vault_errors.VaultError],
) -> None:
    """fail_next(1, status) raises hvac's exception for that status once; then calls work."""
    vault.fail_next(1, status, "injected", headers={"Retry-After": "2"})
    with pytest.raises(error, match="injected") as caught:
        client.auth.token.lookup_self()
    assert type(caught.value) is error
    assert client.auth.token.lookup_self()["data"]["ttl"] > 0


def test_dropped_connection_and_latency(vault: FakeVaultServer, client: hvac.Client) -> None:
    """A dropped connection raises requests.exceptions.ConnectionError (hvac's session does not
    retry); latency beyond the client's timeout raises requests.exceptions.ReadTimeout."""
    vault.drop_next(1)
    with pytest.raises(requests.exceptions.ConnectionError):
        client.auth.token.lookup_self()
    assert client.auth.token.lookup_self()["data"]["renewable"] is True

    vault.set_latency(2)
    impatient = hvac.Client(url=vault.url, token=ROOT, timeout=0.3)
    try:
        with pytest.raises(requests.exceptions.ReadTimeout):
            impatient.auth.token.lookup_self()
    finally:
        impatient.adapter.close()
    vault.set_latency(0)


def test_served_secret_values(vault: FakeVaultServer, client: hvac.Client) -> None:
    """served_secret_values holds every KV value read and every token a response carried, and
    nothing that was never served."""
    vault.put_secret("db", {"password": PASSWORD, "port": 5432})
    vault.put_secret("unread", {"password": "never-read-value"})
    vault.add_approle("r", "s")
    _read(client, "db")
    client.auth.token.lookup_self()
    approle = hvac.Client(url=vault.url)
    try:
        token = approle.auth.approle.login(role_id="r", secret_id="s")["auth"]["client_token"]
    finally:
        approle.adapter.close()
    assert vault.served_secret_values() == {PASSWORD, ROOT, token}


def test_request_log_redacts_the_token(vault: FakeVaultServer, client: hvac.Client) -> None:
    """Every request is logged with its method and path; X-Vault-Token is "<redacted>" and no
    token or secret value appears anywhere in the log."""
    vault.put_secret("db", {"password": PASSWORD})
    _read(client, "db")
    client.auth.token.renew_self()
    assert [(m, p) for m, p, _ in vault.requests] == [
        ("GET", "/v1/secret/data/db"),
        ("POST", "/v1/auth/token/renew-self"),
    ]
    assert all(h["X-Vault-Token"] == "<redacted>" for _, _, h in vault.requests)
    log = repr(vault.requests)
    assert not any(value in log for value in vault.served_secret_values())


async def test_hvac_through_to_thread(vault: FakeVaultServer, client: hvac.Client) -> None:
    """hvac run through asyncio.to_thread (as the activities do) works against the fake, several
    calls at once."""
    vault.put_secret("a", {"v": "1"})
    results = await asyncio.gather(*(asyncio.to_thread(_read, client, "a") for _ in range(5)))
    assert results == [{"v": "1"}] * 5
    assert vault.reads["a"] == 5


def test_synchronous_use_without_an_event_loop() -> None:
    """The fake is also a plain context manager, for synchronous tests."""
    with FakeVaultServer(root_token=ROOT) as vault:
        client = hvac.Client(url=vault.url, token=ROOT)
        try:
            assert client.is_authenticated()
        finally:
            client.adapter.close()
