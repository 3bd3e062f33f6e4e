"""The operation workflow's activities on real backends: the PostgreSQL handler on a fresh
database and the Consul handler on the fake agent, each behind the real activity boundary.

``faults`` replaces what one activity does around the real call (``before`` or ``after`` it:
the agent is down, or it applied the write and the reply was lost), so that the fenced undo is
checked against what the backends really hold.
"""

from __future__ import annotations

import functools
from collections import defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from temporalio import activity
from temporalio.client import Client
from temporalio.worker import Worker

from activities.base import HandlerConfig, HandlerResources
from activities.consul import CLIENT_FACTORY, ConsulHandler
from activities.migrate import migrate
from activities.postgres import POOL_CLIENT, PostgresHandler
from activities.resilience.boundary import ActivityBoundary
from activities.resilience.breaker import BreakerRegistry
from activities.settings import ConsulSettings, PostgresSettings
from contracts.errors import Transport
from contracts.resilience import default_policy
from tests.fakes.consul_agent import FakeConsulAgent, consul_client
from tests.workflows.scenarios import scripted_policy
from workflows import WORKFLOWS

OPERATIONS = {
    "postgres": ("upsert_node", "restore_node", "deactivate_node", "enqueue_event"),
    "consul": (
        "register_service",
        "undo_register_service",
        "deregister_service",
        "undo_deregister_service",
    ),
}

Fault = Callable[[int], None]


@dataclass
class RealBackends:
    postgres: PostgresHandler
    consul: ConsulHandler
    agent: FakeConsulAgent
    pool: Any
    # activity name -> (when, fault): ``fault(attempt)`` raises, before or after the real call.
    faults: dict[str, tuple[str, Fault]] = field(default_factory=dict)
    calls: dict[str, list[Any]] = field(default_factory=lambda: defaultdict(list))

    def fail(self, name: str, fault: Fault, *, after_the_write: bool = False) -> None:
        self.faults[name] = ("after" if after_the_write else "before", fault)

    def heal(self, name: str) -> None:
        self.faults.pop(name, None)

    def activities(self) -> list[Callable[..., Any]]:
        breakers = BreakerRegistry()
        definitions = []
        for handler, transport in (
            (self.postgres, Transport.DATABASE),
            (self.consul, Transport.CONSUL),
        ):
            boundary = ActivityBoundary(
                transport=transport,
                target=handler.target,
                policy=scripted_policy(transport),  # no breaker: see scripted_policy
                breakers=breakers,
                uniform=lambda: 0.5,
            )
            prefix = "postgres" if transport is Transport.DATABASE else "consul"
            for operation in OPERATIONS[prefix]:
                name = f"{prefix}.{operation}"
                method = self._faulty(name, handler.operation(operation))
                definitions.append(activity.defn(name=name)(boundary.wrap(operation, method)))
        return definitions

    def _faulty(
        self, name: str, method: Callable[[Any], Awaitable[Any]]
    ) -> Callable[[Any], Awaitable[Any]]:
        @functools.wraps(method)
        async def call(argument: Any) -> Any:
            self.calls[name].append(argument)
            attempt = activity.info().attempt
            when, fault = self.faults.get(name, ("", None))
            if fault is not None and when == "before":
                fault(attempt)
            result = await method(argument)
            if fault is not None and when == "after":
                fault(attempt)
            return result

        return call

    def worker(self, client: Client, task_queue: str) -> Worker:
        return Worker(
            client,
            task_queue=task_queue,
            workflows=WORKFLOWS,
            activities=self.activities(),
            identity="onex-test-worker",
        )

    async def node(self, node_id: Any) -> Any:
        return await self.pool.fetchrow("SELECT * FROM onex_nodes WHERE node_id = $1", node_id)


def _config(name: str, transport: Transport) -> HandlerConfig:
    return HandlerConfig(
        handler_name=name,
        transport=transport,
        operations=OPERATIONS[name],
        policy=default_policy(transport),
    )


@asynccontextmanager
async def real_backends(pg_dsn: str) -> AsyncIterator[RealBackends]:
    """Both handlers initialized on fresh state, shut down afterwards."""
    connection = await asyncpg.connect(pg_dsn)
    try:
        await migrate(connection)
    finally:
        await connection.close()
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=5)
    async with FakeConsulAgent() as agent:
        postgres = PostgresHandler(
            HandlerResources(
                settings=PostgresSettings(), breakers=BreakerRegistry(), clients={POOL_CLIENT: pool}
            )
        )
        consul = ConsulHandler(
            HandlerResources(
                settings=ConsulSettings(address=agent.address),
                breakers=BreakerRegistry(),
                clients={CLIENT_FACTORY: consul_client},
            )
        )
        await postgres.initialize(_config("postgres", Transport.DATABASE))
        await consul.initialize(_config("consul", Transport.CONSUL))
        try:
            yield RealBackends(postgres=postgres, consul=consul, agent=agent, pool=pool)
        finally:
            await consul.shutdown(5)
            await postgres.shutdown(5)
            await pool.close()
