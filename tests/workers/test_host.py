"""The worker host: activities from contracts, disabled and refused handlers, graceful drain."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import asyncpg
import pytest
import structlog
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from activities.base import HandlerBase, HandlerResources
from activities.postgres import APPLICATION_NAME, PostgresHandler
from activities.settings import KafkaSettings, PostgresSettings, SecretsSettings
from activities.vault import SecretResolver
from contracts.errors import ConfigurationError, Transport
from tests.plugins.echo import EchoRequest, EchoResult
from tests.sample_workflows import RunActivity, RunActivityWorkflow
from tests.support import wait_until
from workers.host import WorkerHost, WorkerStartError
from workers.settings import OnexSettings, WorkerSettings

REPO = Path(__file__).resolve().parents[2]
NAMESPACES = ["activities.", "tests.plugins."]


def write_contract(root: Path, name: str, handler_class: str, operation: str) -> None:
    directory = root / name
    directory.mkdir(parents=True)
    (directory / "handler_contract.yaml").write_text(
        f"handler_name: {name}\n"
        f"handler_class: {handler_class}\n"
        "handler_type: effect\n"
        "transport: http\n"
        f"operations:\n  {operation}: {{idempotent: true}}\n"
    )


@pytest.fixture
def contracts_dir(tmp_path: Path) -> Path:
    root = tmp_path / "contracts"
    write_contract(root, "echo", "tests.plugins.echo:EchoHandler", "echo")
    write_contract(root, "sleepy", "tests.plugins.slow:SlowHandler", "wait_then_echo")
    write_contract(root, "catalog", "tests.plugins.slow:DisabledHandler", "register_service")
    write_contract(root, "outsider", "elsewhere.plugins:Handler", "anything")
    return root


def settings_for(contracts_dir: Path, task_queue: str) -> OnexSettings:
    return OnexSettings(
        worker=WorkerSettings(
            task_queue=task_queue,
            contract_paths=[contracts_dir],
            allowed_namespaces=NAMESPACES,
            graceful_shutdown_timeout=10,
        )
    )


async def test_host_serves_handlers_and_reports_disabled_and_refused(
    temporal_env: WorkflowEnvironment, contracts_dir: Path, task_queue: str
) -> None:
    """Each operation is an activity named <handler>.<operation>; a disabled handler's step is
    reported as skipped with its reason; a refused contract is listed, the rest still serve."""
    host = WorkerHost(
        settings_for(contracts_dir, task_queue),
        temporal_env.client,
        workflows=[RunActivityWorkflow],
    )
    report = await host.start()
    assert report.activities == ["catalog.register_service", "echo.echo", "sleepy.wait_then_echo"]
    assert [h["handler"] for h in report.loaded] == ["echo", "sleepy"]
    assert report.disabled == [
        {"handler": "catalog", "reason": "no Consul address is configured (ONEX_CONSUL__ADDRESS)"}
    ]
    assert [r["code"] for r in report.refused] == ["HANDLER_LOADER_013"]

    stop = asyncio.Event()
    serving = asyncio.create_task(host.run(stop))
    try:
        echoed = await temporal_env.client.execute_workflow(
            RunActivityWorkflow.run,
            RunActivity(activity="echo.echo", argument={"text": "hi"}),
            id=f"host-{uuid.uuid4()}",
            task_queue=task_queue,
        )
        skipped = await temporal_env.client.execute_workflow(
            RunActivityWorkflow.run,
            RunActivity(
                activity="catalog.register_service",
                argument={"text": "x", "seconds": 0, "started_marker": "/nonexistent"},
            ),
            id=f"host-{uuid.uuid4()}",
            task_queue=task_queue,
        )
    finally:
        stop.set()
        await serving
    assert echoed == {"text": "HI"}
    assert skipped == {
        "skipped": True,
        "reason": "no Consul address is configured (ONEX_CONSUL__ADDRESS)",
    }


class FlakyService:
    """A background service that raises, then returns at once, then runs until stopped."""

    def __init__(self) -> None:
        self.calls = 0
        self.running = False
        self.stopped_cleanly = False

    async def run(self, stop: asyncio.Event) -> None:
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError("lost postgresql://onex:hunter2@db.internal:5432/onex")
        if self.calls == 2:
            return  # ended while the worker still runs: also a failure
        self.running = True
        await stop.wait()
        self.running = False
        self.stopped_cleanly = True


async def test_failed_background_service_is_restarted_and_the_host_keeps_serving(
    temporal_env: WorkflowEnvironment, contracts_dir: Path, task_queue: str
) -> None:
    """A background service that raises, then returns early, is logged (sanitized) and
    restarted each time after the backoff; the third run lasts, activities are served all along,
    and the service is stopped, not restarted, when the worker stops."""
    host = WorkerHost(
        settings_for(contracts_dir, task_queue),
        temporal_env.client,
        workflows=[RunActivityWorkflow],
    )
    host.restart_delay = 0.01  # the production backoff is 1 s doubling to 30 s
    service = FlakyService()
    host.background_services.append(service.run)
    stop = asyncio.Event()
    with structlog.testing.capture_logs() as logs:
        serving = asyncio.create_task(host.run(stop))
        try:

            async def restarted_and_running() -> bool:
                if serving.done():
                    serving.result()
                return service.running

            await wait_until(restarted_and_running, within=10, what="the service's third run")
            echoed = await temporal_env.client.execute_workflow(
                RunActivityWorkflow.run,
                RunActivity(activity="echo.echo", argument={"text": "still"}),
                id=f"host-{uuid.uuid4()}",
                task_queue=task_queue,
            )
        finally:
            stop.set()
            await serving

    assert echoed == {"text": "STILL"}
    assert service.calls == 3
    assert host.restarts == {"FlakyService.run": 2}
    assert service.stopped_cleanly
    events = [(entry["event"], entry.get("restart_in")) for entry in logs]
    assert ("background_service_failed", 0.01) in events
    assert ("background_service_returned", 0.02) in events
    [failure] = [entry for entry in logs if entry["event"] == "background_service_failed"]
    assert failure["error"].startswith("RuntimeError")
    assert "hunter2" not in str(logs)


_LISTENING_BACKEND = """
SELECT pid FROM pg_stat_activity
WHERE datname = current_database() AND query LIKE 'LISTEN%' AND application_name = $1
"""


async def test_outbox_relay_listens_outside_the_pool(
    temporal_env: WorkflowEnvironment,
    backends: OnexSettings,
    pg_dsn: str,
    topic_prefix: str,
    task_queue: str,
) -> None:
    """The worker's relay LISTENs on a connection of its own, opened with the PostgreSQL
    settings (the secret store, which has no source for the password, falls back to them):
    every pooled connection goes back idle, so a pool rebuilt after a credential refresh never
    waits for the relay. On stop that connection is closed."""
    settings = OnexSettings(
        postgres=PostgresSettings(
            host=backends.postgres.host,
            port=backends.postgres.port,
            user=backends.postgres.user,
            database=pg_dsn.rsplit("/", 1)[1],
        ),
        kafka=KafkaSettings(
            bootstrap_servers=backends.kafka.bootstrap_servers, topic_prefix=topic_prefix
        ),
        worker=WorkerSettings(task_queue=task_queue),
    )
    secrets = SecretResolver(SecretsSettings(env_fallback=False))
    host = WorkerHost(settings, temporal_env.client, secrets=secrets)
    report = await host.start()
    assert "outbox relay (postgres -> kafka)" in report.services, (
        "the PostgreSQL handler declares the relay when the Kafka handler offers its publisher: "
        "check PostgresHandler.background_services and KafkaHandler.offers"
    )
    [postgres] = [hosted.instance for hosted in host.handlers if hosted.name == "postgres"]
    assert isinstance(postgres, PostgresHandler)
    pool = await postgres.current_pool()
    stop = asyncio.Event()
    serving = asyncio.create_task(host.run(stop))
    try:

        async def listening_outside_the_pool() -> bool:
            if serving.done():
                serving.result()
            listening = await pool.fetchval(_LISTENING_BACKEND, APPLICATION_NAME)
            return listening is not None and pool.get_idle_size() == pool.get_size()

        await wait_until(
            listening_outside_the_pool, within=10, what="a LISTEN backend and an idle pool"
        )
    finally:
        stop.set()
        await serving
    connection = await asyncpg.connect(pg_dsn)
    try:
        assert await connection.fetchval(_LISTENING_BACKEND, APPLICATION_NAME) is None
    finally:
        await connection.close()


async def test_nothing_to_serve_is_an_error(
    temporal_env: WorkflowEnvironment, tmp_path: Path, task_queue: str
) -> None:
    """A worker with no handler and no workflow refuses to start, saying why."""
    (tmp_path / "empty").mkdir()
    host = WorkerHost(settings_for(tmp_path / "empty", task_queue), temporal_env.client)
    with pytest.raises(WorkerStartError, match="nothing to do"):
        await host.start()


def _worker_env(env: WorkflowEnvironment, contracts_dir: Path, task_queue: str) -> dict[str, str]:
    host, port = env.client.service_client.config.target_host.rsplit(":", 1)
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "ONEX_TEMPORAL__HOST": host,
        "ONEX_TEMPORAL__PORT": port,
        "ONEX_WORKER__TASK_QUEUE": task_queue,
        "ONEX_WORKER__CONTRACT_PATHS": json.dumps([str(contracts_dir)]),
        "ONEX_WORKER__ALLOWED_NAMESPACES": json.dumps(NAMESPACES),
        "ONEX_WORKER__GRACEFUL_SHUTDOWN_TIMEOUT": "20",
    }


async def test_onex_worker_drains_an_in_flight_activity_on_sigterm(
    temporal_env: WorkflowEnvironment, contracts_dir: Path, task_queue: str, tmp_path: Path
) -> None:
    """`onex worker` as a subprocess prints its handler report, serves, and on SIGTERM while
    an activity runs exits 0 within the drain timeout, the activity completed: the workflow
    finishes on its first attempt."""
    output = tmp_path / "worker.out"
    with output.open("w") as sink:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "onex"), "worker"],
            env=_worker_env(temporal_env, contracts_dir, task_queue),
            stdout=sink,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    try:

        async def serving() -> bool:
            assert process.poll() is None, output.read_text()
            return "serving 3 activities" in output.read_text()

        await wait_until(serving, within=60, what="the worker to report that it is serving")
        report = output.read_text()
        assert "loaded   echo" in report
        assert "disabled catalog" in report
        assert "refused  outsider" in report

        marker = tmp_path / "started"
        client: Client = temporal_env.client
        # The subprocess serves the activities (and the project's workflows, so the sample
        # workflow has a queue of its own: a task it polled would fail there); this process
        # runs the workflow.
        workflows = f"{task_queue}-workflow"
        async with Worker(client, task_queue=workflows, workflows=[RunActivityWorkflow]):
            handle = await client.start_workflow(
                RunActivityWorkflow.run,
                RunActivity(
                    activity="sleepy.wait_then_echo",
                    argument={"text": "drained", "seconds": 3, "started_marker": str(marker)},
                    task_queue=task_queue,
                ),
                id=f"drain-{uuid.uuid4()}",
                task_queue=workflows,
            )

            async def activity_running() -> bool:
                return marker.exists()

            await wait_until(activity_running, within=30, what="the slow activity to start")
            process.send_signal(signal.SIGTERM)

            async def exited() -> bool:
                return process.poll() is not None

            await wait_until(exited, within=25, what="the worker to exit after draining")
            assert process.returncode == 0, output.read_text()
            assert await handle.result() == {"text": "DRAINED"}
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    history = await handle.fetch_history()
    started = [
        e.activity_task_started_event_attributes.attempt
        for e in history.events
        if e.HasField("activity_task_started_event_attributes")
    ]
    assert started == [1], "the activity must have completed on its first attempt"


async def test_metrics_endpoint_exports_sdk_and_breaker_metrics(
    temporal_env: WorkflowEnvironment, contracts_dir: Path, task_queue: str
) -> None:
    """With ONEX_WORKER__METRICS_ADDRESS set, the worker's runtime serves Prometheus metrics:
    the SDK's own and the circuit breakers' state."""
    import aiohttp

    from contracts.resilience import BreakerSettings
    from tests.support import free_port
    from workers.host import build_host
    from workers.settings import TemporalSettings

    host_name, port = temporal_env.client.service_client.config.target_host.rsplit(":", 1)
    address = f"127.0.0.1:{free_port()}"
    settings = settings_for(contracts_dir, task_queue).model_copy(
        update={
            "temporal": TemporalSettings(host=host_name, port=int(port)),
            "worker": settings_for(contracts_dir, task_queue).worker.model_copy(
                update={"metrics_address": address}
            ),
        }
    )
    worker_host = await build_host(settings, workflows=[RunActivityWorkflow])
    await worker_host.start()
    breaker = worker_host.breakers.get("consul:dc1", BreakerSettings(failure_threshold=1))
    breaker.record_failure(breaker.acquire())

    async def exported() -> bool:
        async with aiohttp.ClientSession() as http, http.get(f"http://{address}/metrics") as r:
            text = await r.text()
        return 'onex_circuit_breaker_state{breaker="consul:dc1"' in text and "temporal" in text

    try:
        await wait_until(exported, within=20, what="the metrics endpoint to export the breaker")
    finally:
        await worker_host.shutdown()


class PeekingHandler(HandlerBase):
    """Declares the PostgreSQL section and the database password; records what it was given,
    offers a value to its peers and declares a background service that reports what it got."""

    transport = Transport.HTTP
    settings_type = PostgresSettings
    secret_names = ("database.postgres.password",)
    seen: ClassVar[dict[str, Any]] = {}

    def __init__(self, resources: HandlerResources[PostgresSettings]) -> None:
        super().__init__(resources)
        PeekingHandler.seen["settings"] = resources.settings
        PeekingHandler.seen["secrets"] = resources.secrets

    async def echo(self, request: EchoRequest) -> EchoResult:
        return EchoResult(text=request.text)

    def background_services(self, offered: Mapping[str, object]) -> Mapping[str, Any]:
        PeekingHandler.seen["offered"] = dict(offered)

        async def report(stop: asyncio.Event) -> None:
            PeekingHandler.seen["service_ran"] = True
            await stop.wait()

        return {"peeking report": report}


class OfferingHandler(HandlerBase):
    """Offers one value to the other handlers (as Kafka offers its publisher)."""

    transport = Transport.HTTP

    async def echo(self, request: EchoRequest) -> EchoResult:
        return EchoResult(text=request.text)

    def offers(self) -> Mapping[str, object]:
        return {"test.offer": "offered value"}


async def test_each_handler_gets_its_own_section_its_secrets_and_runs_its_services(
    temporal_env: WorkflowEnvironment,
    tmp_path: Path,
    task_queue: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The host hands a handler the one settings section its class declares and a secret
    source that resolves only the names it declares; what a peer offers reaches its
    background_services hook, and the service it declares is reported and run."""
    root = tmp_path / "contracts"
    write_contract(root, "peeking", "tests.workers.test_host:PeekingHandler", "echo")
    write_contract(root, "offering", "tests.workers.test_host:OfferingHandler", "echo")
    settings = OnexSettings(
        postgres=PostgresSettings(port=6543),
        worker=WorkerSettings(
            task_queue=task_queue,
            contract_paths=[root],
            allowed_namespaces=["tests.workers."],
            graceful_shutdown_timeout=10,
        ),
    )
    # Resolvable, but not by this handler: it does not declare the name.
    monkeypatch.setenv("ONEX_SECRET_CONSUL_TOKEN", "another-handlers-token")
    secrets = SecretResolver(SecretsSettings())
    host = WorkerHost(settings, temporal_env.client, secrets=secrets)
    PeekingHandler.seen.clear()
    report = await host.start()
    given = PeekingHandler.seen["settings"]
    assert given == settings.postgres, (
        "the handler must get exactly its declared section (settings_type), not OnexSettings"
    )
    scoped = PeekingHandler.seen["secrets"]
    assert await scoped.get_secret("database.postgres.password", required=False) is None
    with pytest.raises(ConfigurationError, match="does not declare"):
        await scoped.get_secret("consul.token")
    assert PeekingHandler.seen["offered"] == {"test.offer": "offered value"}, (
        "a handler's background_services hook must receive what the other handlers offer"
    )
    assert "peeking report" in report.services

    stop = asyncio.Event()
    serving = asyncio.create_task(host.run(stop))
    try:

        async def service_ran() -> bool:
            if serving.done():
                serving.result()
            return bool(PeekingHandler.seen.get("service_ran"))

        await wait_until(service_ran, within=10, what="the declared background service")
    finally:
        stop.set()
        await serving
