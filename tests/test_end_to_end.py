"""End to end: real Temporal, PostgreSQL and Kafka, the Consul fake, the worker and the CLI."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from contracts.errors import Transport
from contracts.operations_io import OperationStatus, StepStatus
from contracts.registry import RegisterNodeRequest
from contracts.resilience import BreakerSettings, default_policy
from tests.builders import register_request
from tests.conftest import isolated_environment
from tests.fakes.consul_agent import FakeConsulAgent
from tests.stack import serving_stack
from tests.support import readable_history, wait_until
from workers.client import get_status, register_node, retry_failed, start_register_node
from workers.demo import SIMULATED_NODES
from workers.host import WorkerHost
from workers.settings import OnexSettings

BIN = Path(sys.executable).parent
CONSUL_BUDGET = default_policy(Transport.CONSUL).timeouts.schedule_to_close or 0.0
"""How long a Consul step keeps trying before it fails (its budget in time)."""


def node_request() -> RegisterNodeRequest:
    return register_request(
        address="127.0.0.1", endpoints={"health": "http://127.0.0.1:8080/health"}
    )


@pytest.fixture
async def stack(
    temporal_env: WorkflowEnvironment,
    backends: OnexSettings,
    pg_dsn: str,
    topic_prefix: str,
    task_queue: str,
) -> AsyncIterator[tuple[OnexSettings, Client, FakeConsulAgent, WorkerHost]]:
    """A worker host serving the built-in contracts against real servers and the Consul fake."""
    async with serving_stack(temporal_env, backends, pg_dsn, topic_prefix, task_queue) as served:
        yield served.settings, served.client, served.agent, served.host


async def _registered_events(settings: OnexSettings, node_id: uuid.UUID) -> list[dict]:  # type: ignore[type-arg]
    topic = settings.kafka.topic_prefix + "onex.registry.node.registered.v1"
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=settings.kafka.bootstrap_servers, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        batches = await consumer.getmany(timeout_ms=1000)
    finally:
        await consumer.stop()
    events = [json.loads(m.value) for ms in batches.values() for m in ms]
    return [e for e in events if e["payload"]["node_id"] == str(node_id)]


async def test_registration_reaches_consul_postgres_and_kafka(
    stack: tuple[OnexSettings, Client, FakeConsulAgent, WorkerHost],
) -> None:
    """register_node through the client helper: the service is in Consul with its health
    check, the row is in PostgreSQL, the registered event is on its Kafka topic, and the
    workflow is found by its CorrelationId."""
    settings, client, agent, _ = stack
    request = node_request()
    result = await register_node(client, request, settings=settings)
    assert result.status is OperationStatus.SUCCESS, result
    assert request.consul_service_id in agent.services
    assert agent.services[request.consul_service_id]["Check"]["HTTP"] == (
        "http://127.0.0.1:8080/health"
    )
    connection = await asyncpg.connect(
        host=settings.postgres.host,
        port=settings.postgres.port,
        user=settings.postgres.user,
        database=settings.postgres.database,
    )
    try:
        status = await connection.fetchval(
            "SELECT status FROM onex_nodes WHERE node_id = $1", request.node_id
        )
    finally:
        await connection.close()
    assert status == "active"

    async def event_published() -> bool:
        return len(await _registered_events(settings, request.node_id)) == 1

    await wait_until(event_published, within=30, what="the registered event on Kafka")

    async def listed() -> bool:
        query = f"CorrelationId='{result.correlation_id}'"
        return [w.id async for w in client.list_workflows(query)] == [result.workflow_id]

    await wait_until(listed, within=10, what="the workflow to be listed by CorrelationId")


@pytest.mark.timeout(CONSUL_BUDGET + 120)
async def test_partial_registration_is_retried_to_success(
    stack: tuple[OnexSettings, Client, FakeConsulAgent, WorkerHost],
) -> None:
    """Consul answers 500 through its whole time budget: the registration is partial
    (PostgreSQL done) and Consul's breaker is open; after Consul recovers and an operator
    resets the breaker, `retry_failed` completes it without touching PostgreSQL."""
    settings, client, agent, worker_host = stack
    agent.fail_next(100, status=500)
    request = node_request()
    handle = await start_register_node(client, request, settings=settings)

    async def partial() -> bool:
        return (await get_status(client, handle.id)).status is OperationStatus.PARTIAL

    # The step keeps trying (waiting for its breaker) until its budget in time runs out.
    await wait_until(partial, within=CONSUL_BUDGET + 60, what="the registration to become partial")
    status = await get_status(client, handle.id)
    consul = next(b for b in status.backends if b.backend == "consul")
    assert (consul.error_type, consul.status) == ("InfraUnavailableError", StepStatus.FAILED)

    breakers = {b.name: b.state.value for b in worker_host.breakers.snapshot()}
    assert breakers["consul:default"] == "open", breakers
    agent.clear_faults()
    worker_host.breakers.reset("consul:default")  # else the retry waits out the open time
    retried = await retry_failed(client, handle.id, "consul")
    assert retried.status is OperationStatus.SUCCESS
    assert request.consul_service_id in agent.services
    postgres = next(b for b in retried.backends if b.backend == "postgres")
    assert postgres.attempts == 1, "the succeeded backend was not run again"


def _cli_env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        **isolated_environment(tmp_path / "state"),
        # Secrets a deployment would hold; they must never reach a history.
        "ONEX_POSTGRES__PASSWORD": "pg-Secret-4f9a",
        "ONEX_CONSUL__TOKEN": "consul-Secret-77b1",
    }


def _onex(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "onex"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def _assert_quiet(run: subprocess.CompletedProcess[str], what: str) -> None:
    """A command that succeeded wrote nothing on standard error: no library log line, no
    traceback, no warning."""
    assert run.stderr.strip() == "", (
        f"{what} succeeded but wrote on stderr:\n{run.stderr}\nA library's log line is held "
        "back until a failure (workers.logging, libraries='on_failure'); the command's own "
        "story goes to stdout"
    )


async def test_onex_demo_as_a_new_user_runs_it(tmp_path: Path) -> None:
    """`onex demo` on its own stack: exit 0, a table of outcomes, the events on Kafka, the
    simulated fleet registered from Kafka with one node unhealthy, the workflows listed by
    CorrelationId with the temporal CLI, no secret in any history, and a quiet first screen:
    nothing on stderr (the broker probe's connection errors while it waits, for one, are not
    shown)."""
    env = _cli_env(tmp_path)
    try:
        demo = _onex(env, "demo")
        assert demo.returncode == 0, f"{demo.stdout}\n{demo.stderr}"
        _assert_quiet(demo, "onex demo")
        out = demo.stdout
        assert "3 of 3 registrations are on Kafka topic" in out
        assert "refused as bad input" in out
        assert f"registered from Kafka, heartbeating: {SIMULATED_NODES} nodes" in out, out
        assert "│ unhealthy │" in out, "the silent simulated node must be shown unhealthy"
        assert out.count("success") >= 4, out
        correlation_id = out.split("CorrelationId='", 1)[1].split("'", 1)[0]
        listed = subprocess.run(
            [
                str(BIN / "temporal"),
                "workflow",
                "list",
                "--address",
                f"127.0.0.1:{env['ONEX_TEMPORAL__PORT']}",
                "--query",
                f"CorrelationId='{correlation_id}'",
                "--output",
                "json",
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        workflows = json.loads(listed.stdout)
        assert len(workflows) == 1, listed.stdout

        client = await Client.connect(f"127.0.0.1:{env['ONEX_TEMPORAL__PORT']}")
        texts = []
        async for execution in client.list_workflows("OnexOperation='register_node'"):
            history = await client.get_workflow_handle(execution.id).fetch_history()
            texts.append(readable_history(json.loads(history.to_json())))
        assert len(texts) == 3 + SIMULATED_NODES, (
            "the demo registers three nodes through the client helpers and the simulated ones "
            "through the Kafka ingress"
        )
        everything = "\n".join(texts)
        for secret in ("pg-Secret-4f9a", "consul-Secret-77b1"):
            assert secret not in everything, f"{secret} reached a workflow history"
    finally:
        down = _onex(env, "dev", "down", "--purge")
        assert down.returncode == 0, down.stderr


def _env_for(settings: OnexSettings) -> dict[str, str]:
    return {
        **os.environ,
        "ONEX_TEMPORAL__HOST": settings.temporal.host,
        "ONEX_TEMPORAL__PORT": str(settings.temporal.port),
        "ONEX_WORKER__TASK_QUEUE": settings.worker.task_queue,
    }


async def test_cli_register_status_retry_exit_codes(
    stack: tuple[OnexSettings, Client, FakeConsulAgent, WorkerHost],
) -> None:
    """`onex register-node` then `onex status` exit 0; `onex retry` of a finished operation is
    refused (2); `onex status` of an unknown id is not found (5)."""
    settings, _, _, _ = stack
    env = _env_for(settings)
    registered = await asyncio.to_thread(
        _onex,
        env,
        "register-node", "--node-type", "effect", "--service-name", "cli-node",
        "--address", "127.0.0.1", "--port", "9000",
        "--health-url", "http://127.0.0.1:9000/health", "--json",
    )  # fmt: skip
    assert registered.returncode == 0, registered.stderr
    _assert_quiet(registered, "onex register-node")
    result = json.loads(registered.stdout)
    assert result["status"] == "success"
    assert {b["backend"]: b["status"] for b in result["backends"]} == {
        "consul": "succeeded",
        "postgres": "succeeded",
    }
    workflow_id = result["workflow_id"]

    status = await asyncio.to_thread(_onex, env, "status", workflow_id)
    assert status.returncode == 0, status.stderr
    assert "succeeded" in status.stdout
    _assert_quiet(status, "onex status")

    retry = await asyncio.to_thread(_onex, env, "retry", workflow_id)
    assert retry.returncode == 2
    assert "nothing to retry" in retry.stderr

    missing = await asyncio.to_thread(_onex, env, "status", "onex-register-node-nobody")
    assert missing.returncode == 5, missing.stderr
    assert missing.stderr.strip() == (
        "error: no operation with workflow id 'onex-register-node-nobody'"
    ), f"a failure is one line on stderr, nothing else: {missing.stderr}"


async def test_breaker_transitions_are_announced_through_the_outbox(
    stack: tuple[OnexSettings, Client, FakeConsulAgent, WorkerHost],
) -> None:
    """A breaker opening in the worker queues onex.infra.circuit_breaker.state_changed.v1,
    which the relay then publishes like any event."""
    settings, _, _, worker_host = stack
    breaker = worker_host.breakers.get("consul:dc-e2e", BreakerSettings(failure_threshold=1))
    breaker.record_failure(breaker.acquire())
    topic = settings.kafka.topic_prefix + "onex.infra.circuit_breaker.state_changed.v1"

    async def announced() -> bool:
        consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=settings.kafka.bootstrap_servers, auto_offset_reset="earliest"
        )
        await consumer.start()
        try:
            batches = await consumer.getmany(timeout_ms=500)
        finally:
            await consumer.stop()
        payloads = [json.loads(m.value)["payload"] for ms in batches.values() for m in ms]
        return any(
            p["service_name"] == "consul:dc-e2e" and p["new_state"] == "open" for p in payloads
        )

    await wait_until(announced, within=30, what="the state_changed event on Kafka")
