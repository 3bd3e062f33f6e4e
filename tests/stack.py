"""The project's worker, in-process, against the real servers of the test session and the
Consul fake: what the end-to-end and interleaving tests run on."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from activities.settings import ConsulSettings, KafkaSettings, PostgresSettings
from contracts.resilience import RetrySettings
from tests.fakes.consul_agent import FakeConsulAgent
from workers.client import Operations, connect
from workers.host import WorkerHost
from workers.settings import OnexSettings, TemporalSettings, WorkerSettings
from workflows import WORKFLOWS


def fast_operations(operations: Operations, *, window_seconds: float) -> Operations:
    """The plans with quick forward retries and a short retry window, so that a run with
    faults is about the saga and not about waiting (compensations stay patient)."""
    quick = RetrySettings(max_attempts=2, initial_interval=0.2, max_interval=0.5)
    plans = {}
    for name, plan in operations.plans.items():
        steps = tuple(
            step.model_copy(update={"policy": step.policy.model_copy(update={"retry": quick})})
            for step in plan.steps
        )
        plans[name] = plan.model_copy(
            update={"steps": steps, "retry_window_seconds": window_seconds}
        )
    return Operations(plans=plans, contracts=operations.contracts)


@dataclass(frozen=True)
class Stack:
    settings: OnexSettings
    client: Client
    agent: FakeConsulAgent
    host: WorkerHost


@asynccontextmanager
async def serving_stack(
    temporal_env: WorkflowEnvironment,
    backends: OnexSettings,
    pg_dsn: str,
    topic_prefix: str,
    task_queue: str,
    *,
    postgres_port: int | None = None,
) -> AsyncIterator[Stack]:
    """A worker host serving the built-in contracts; PostgreSQL at ``postgres_port`` when
    given (a fault proxy in front of it), else the session's server."""
    host, port = temporal_env.client.service_client.config.target_host.rsplit(":", 1)
    async with FakeConsulAgent() as agent:
        settings = OnexSettings(
            temporal=TemporalSettings(host=host, port=int(port)),
            postgres=PostgresSettings(
                host=backends.postgres.host,
                port=postgres_port or backends.postgres.port,
                database=pg_dsn.rsplit("/", 1)[1],
            ),
            kafka=KafkaSettings(
                bootstrap_servers=backends.kafka.bootstrap_servers,
                topic_prefix=topic_prefix,
                request_timeout_ms=5000,
            ),
            consul=ConsulSettings(address=agent.address, timeout=5),
            worker=WorkerSettings(task_queue=task_queue),
        )
        client = await connect(settings)
        worker_host = WorkerHost(settings, client, workflows=WORKFLOWS)
        await worker_host.start()
        stop = asyncio.Event()
        serving = asyncio.create_task(worker_host.run(stop))
        try:
            yield Stack(settings, client, agent, worker_host)
        finally:
            stop.set()
            await serving
