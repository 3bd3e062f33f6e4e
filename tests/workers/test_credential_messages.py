"""What a user reads when a worker cannot start for want of a credential, case by case.

Each test runs ``onex worker`` against real servers (the Temporal dev server, the embedded
PostgreSQL and Kafka broker; Vault through its fake) with one thing wrong, and asserts the one
error line the user sees, word for word, and exit 6. An authentication failure says
``authentication failed at <target>: <what to do>``; a missing secret names the logical secret
and its source kind (env, file or vault), never a path or a value; no credential appears, and
the sanitizer's placeholder does not either: the message is the product's own, sanitized once
where it was built, and passes the sanitizer unchanged (its words, ``lookup_token`` or
``ONEX_VAULT__TOKEN``, are not credentials).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from temporalio.testing import WorkflowEnvironment
from typer.testing import CliRunner

from activities.resilience.sanitize import GENERIC_MESSAGE, sanitize_text
from tests.fakes import planted
from tests.fakes.vault_server import FakeVaultServer
from tests.support import free_port
from workers.cli import app
from workers.cli.exit_codes import ExitCode
from workers.settings import OnexSettings

runner = CliRunner()

START = "error: cannot start the worker: "
POSTGRES_START = START + "handler 'postgres' failed to initialize: "
REMAP = "or map the secret elsewhere in ONEX_SECRETS__SOURCES"


@pytest.fixture
def worker_env(
    temporal_env: WorkflowEnvironment, backends: OnexSettings, cli_env: dict[str, str]
) -> dict[str, str]:
    """A worker's environment reaching the session's servers, with nothing wrong yet."""
    host, port = temporal_env.client.service_client.config.target_host.rsplit(":", 1)
    return {
        **cli_env,
        "ONEX_TEMPORAL__HOST": host,
        "ONEX_TEMPORAL__PORT": port,
        "ONEX_POSTGRES__HOST": backends.postgres.host,
        "ONEX_POSTGRES__PORT": str(backends.postgres.port),
        "ONEX_KAFKA__BOOTSTRAP_SERVERS": backends.kafka.bootstrap_servers,
    }


@pytest.fixture
def vault() -> Iterator[FakeVaultServer]:
    with FakeVaultServer(root_token=planted.VAULT_TOKEN) as server:
        yield server


def _error_line(env: dict[str, str], *credentials: str) -> str:
    """``onex worker``'s error line; it exited 6 and showed no credential, no placeholder."""
    result = runner.invoke(app, ["worker"], env=env)
    output = result.output
    assert result.exit_code == ExitCode.UNAVAILABLE, output
    for credential in credentials:
        assert credential not in output, "a credential reached the user's screen"
    assert GENERIC_MESSAGE not in output, f"the sanitizer hid the message: {output}"
    assert "Traceback" not in output
    [line] = [line for line in output.splitlines() if line.startswith("error: ")]
    assert sanitize_text(line) == line, "the product's own message must pass the sanitizer"
    return line


def test_an_expired_vault_token_says_which_setting_to_fix(
    worker_env: dict[str, str], vault: FakeVaultServer
) -> None:
    """Found 6, expired token: the token Vault issued has expired (403 on lookup-self)."""
    vault.expire(planted.VAULT_TOKEN)
    env = {**worker_env, "ONEX_VAULT__ADDRESS": vault.url, "ONEX_VAULT__TOKEN": planted.VAULT_TOKEN}
    assert _error_line(env, planted.VAULT_TOKEN) == (
        START + "authentication failed at vault: the token (ONEX_VAULT__TOKEN) was refused: it "
        "is expired, revoked or unknown; set a valid token, or AppRole credentials "
        "(ONEX_VAULT__ROLE_ID and ONEX_VAULT__SECRET_ID) to log in with "
        "[SERVICE_UNAVAILABLE; lookup_token on vault]"
    )


def test_a_bad_approle_secret_id_says_what_to_check(
    worker_env: dict[str, str], vault: FakeVaultServer
) -> None:
    """Found 6, bad secret_id: the worker's AppRole secret ID is not the role's (400)."""
    vault.add_approle("onex-worker", "the-secret-id-vault-expects-0b7e")
    env = {
        **worker_env,
        "ONEX_VAULT__ADDRESS": vault.url,
        "ONEX_VAULT__ROLE_ID": "onex-worker",
        "ONEX_VAULT__SECRET_ID": planted.APPROLE_SECRET_ID,
    }
    assert _error_line(env, planted.APPROLE_SECRET_ID) == (
        START + "authentication failed at vault: the AppRole login was refused: check "
        "ONEX_VAULT__ROLE_ID and ONEX_VAULT__SECRET_ID (a secret ID can expire or run out of "
        "uses: issue a new one) [SERVICE_UNAVAILABLE; login on vault]"
    )


def test_an_unreachable_vault_names_its_address_and_setting(worker_env: dict[str, str]) -> None:
    """Found 6, unreachable Vault: nothing listens at the address (connection refused)."""
    address = f"http://127.0.0.1:{free_port()}"
    env = {**worker_env, "ONEX_VAULT__ADDRESS": address, "ONEX_VAULT__TOKEN": planted.VAULT_TOKEN}
    assert _error_line(env, planted.VAULT_TOKEN) == (
        START + f"cannot reach vault at {address}: connection failed (ConnectionError); check "
        "ONEX_VAULT__ADDRESS and that Vault is running [SERVICE_UNAVAILABLE; lookup_token on vault]"
    )


def test_a_missing_secret_file_names_the_secret_and_its_source_kind(
    worker_env: dict[str, str], tmp_path: Path
) -> None:
    """Found 6, missing secret file: the database password is mapped to a file that is not
    there. The message names neither the file nor the secrets directory."""
    env = {
        **worker_env,
        "ONEX_SECRETS__SECRETS_DIR": str(tmp_path),
        "ONEX_SECRETS__SOURCES": json.dumps({"database.postgres.password": "file:pg/password"}),
    }
    line = _error_line(env, str(tmp_path), "pg/password")
    assert line == (
        POSTGRES_START + "secret database.postgres.password is not available from its file "
        f"source: the file is missing or unreadable; create it, {REMAP}"
    )


def test_a_secret_missing_in_vault_names_the_secret_and_its_source_kind(
    worker_env: dict[str, str], vault: FakeVaultServer
) -> None:
    """Found 6, secret missing in Vault: the database password is mapped to a Vault path
    that holds nothing. The message names neither the path nor the field."""
    env = {
        **worker_env,
        "ONEX_VAULT__ADDRESS": vault.url,
        "ONEX_VAULT__TOKEN": planted.VAULT_TOKEN,
        "ONEX_SECRETS__SOURCES": json.dumps(
            {"database.postgres.password": "vault:team/registry-db#password"}
        ),
    }
    line = _error_line(env, planted.VAULT_TOKEN, "team/registry-db", "#password")
    assert line == (
        POSTGRES_START + "secret database.postgres.password is not available from its vault "
        f"source: it is not in Vault (no such secret or field); write it there, {REMAP}"
    )


def test_a_wrong_postgres_password_says_where_the_password_came_from(
    worker_env: dict[str, str], password_login: str
) -> None:
    """Found 6, wrong PostgreSQL password: the login requires planted.POSTGRES_PASSWORD and
    the secret store gives another (refreshed once, refused again). The message names the
    logical secret the password came from, never the value."""
    wrong = "not-the-" + planted.POSTGRES_PASSWORD
    env = {
        **worker_env,
        "ONEX_POSTGRES__USER": password_login,
        "ONEX_SECRET_DATABASE_POSTGRES_PASSWORD": wrong,
    }
    assert _error_line(env, wrong, planted.POSTGRES_PASSWORD) == (
        POSTGRES_START + "authentication failed at postgresql-primary: the database refused "
        f"user {password_login} (InvalidPasswordError): check the secret "
        "database.postgres.password and ONEX_POSTGRES__USER "
        "[DATABASE_CONNECTION_ERROR; connect on postgresql-primary]"
    )
