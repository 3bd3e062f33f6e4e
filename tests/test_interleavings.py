"""Randomized interleavings: register, deregister, retry and cancel on three shared nodes, with
Consul errors and PostgreSQL cuts, on the real servers (Temporal, PostgreSQL through a fault
proxy, Kafka) and the Consul fake, with the project's own worker.

At the end, for every node, PostgreSQL and Consul agree (active in both, or in neither), the
last finished operation says the same, and no operation is left open without a reason. The
seed is printed; ``ONEX_INTERLEAVING_SEED`` and ``ONEX_INTERLEAVING_ROUNDS`` replay a run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from temporalio.client import Client, WorkflowUpdateFailedError
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment

from activities.migrate import TARGET as POSTGRES_TARGET
from contracts.errors import Transport
from contracts.operations_io import OperationResult, OperationStatus
from contracts.registry import DeregisterNodeRequest
from contracts.resilience import BreakerSettings
from tests.builders import register_request
from tests.fakes.fault_proxy import FaultProxy
from tests.stack import Stack, fast_operations, serving_stack
from tests.support import wait_until
from workers.client import (
    NodeBusy,
    OperationFinished,
    OperationHandle,
    OperationNotFound,
    Operations,
    get_node_state,
    get_status,
    retry_failed,
    start_operation,
)
from workers.settings import OnexSettings

SEED = int(os.environ.get("ONEX_INTERLEAVING_SEED", "0")) or random.SystemRandom().randrange(
    1, 10**6
)
ROUNDS = int(os.environ.get("ONEX_INTERLEAVING_ROUNDS", "60"))
NODES = 3
# Breakers that open and probe again quickly, so that the run is about the saga, not waiting.
FAST_BREAKER = BreakerSettings(failure_threshold=3, open_seconds=1.0)


@pytest.fixture
async def proxied_stack(
    temporal_env: WorkflowEnvironment,
    backends: OnexSettings,
    pg_dsn: str,
    topic_prefix: str,
    task_queue: str,
) -> AsyncIterator[tuple[Stack, FaultProxy]]:
    proxy = FaultProxy(backends.postgres.host, backends.postgres.port)
    await proxy.start()
    try:
        async with serving_stack(
            temporal_env, backends, pg_dsn, topic_prefix, task_queue, postgres_port=proxy.port
        ) as stack:
            for name in ("default", POSTGRES_TARGET):
                transport = Transport.CONSUL if name == "default" else Transport.DATABASE
                stack.host.breakers.get(f"{transport.value}:{name}", FAST_BREAKER)
            yield stack, proxy
    finally:
        await proxy.stop()


class Run:
    """One seeded interleaving: the actions, the faults, and what was started."""

    def __init__(self, stack: Stack, proxy: FaultProxy, rng: random.Random) -> None:
        self.stack, self.proxy, self.rng = stack, proxy, rng
        self.client: Client = stack.client
        self.operations = fast_operations(Operations.load(stack.settings), window_seconds=2.0)
        self.nodes = [uuid.uuid4() for _ in range(NODES)]
        self.handles: list[OperationHandle] = []
        self.actions: Counter[str] = Counter()
        self.cut_rounds = 0
        self.retries: set[asyncio.Task[None]] = set()

    async def step(self) -> None:
        node = self.rng.choice(self.nodes)
        action = self.rng.choices(
            ["register", "deregister", "retry", "cancel", "consul_errors", "postgres_cut"],
            weights=[5, 3, 2, 1, 1, 1],
        )[0]
        self.actions[action] += 1
        if self.cut_rounds:
            self.cut_rounds -= 1
            if self.cut_rounds == 0:
                self.proxy.restore()
        if action == "register":
            port = self.rng.choice([8080, 8081])
            request = register_request(node_id=node, address="127.0.0.1", port=port)
            await self._start("register_node", request)
        elif action == "deregister":
            await self._start(
                "deregister_node", DeregisterNodeRequest(node_id=node, node_type="effect")
            )
        elif action == "retry":
            await self._retry(f"onex-register-node-{node}")
        elif action == "cancel":
            await self._cancel(f"onex-register-node-{node}")
        elif action == "consul_errors":
            self.stack.agent.fail_next(self.rng.randint(1, 4), status=self.rng.choice([500, 429]))
        elif not self.proxy.is_cut:
            await self.proxy.cut()
            self.cut_rounds = self.rng.randint(1, 3)

    async def _start(self, operation: str, request: Any) -> None:
        try:
            handle = await start_operation(
                self.client,
                operation,
                request,
                settings=self.stack.settings,
                operations=self.operations,
            )
        except (WorkflowUpdateFailedError, NodeBusy):  # the node is full: refused, nothing ran
            self.actions["refused"] += 1
            return
        self.handles.append(handle)

    async def _retry(self, workflow_id: str) -> None:
        try:
            status = await get_status(self.client, workflow_id)
            if status.status is OperationStatus.PARTIAL:
                # Not awaited here: a retry may wait for a cut PostgreSQL.
                retry = asyncio.create_task(self._quietly(retry_failed(self.client, workflow_id)))
                self.retries.add(retry)
        except (OperationNotFound, OperationFinished, WorkflowUpdateFailedError, RPCError):
            pass

    async def _cancel(self, workflow_id: str) -> None:
        with contextlib.suppress(RPCError):  # not running: nothing to cancel
            await self.client.get_workflow_handle(workflow_id).cancel()

    @staticmethod
    async def _quietly(retry: Any) -> None:
        with contextlib.suppress(OperationFinished, WorkflowUpdateFailedError, RPCError):
            await retry

    async def settle(self) -> list[OperationResult]:
        """Lift every fault and wait, with a deadline, for every operation to end or pause."""
        self.proxy.restore()
        self.stack.agent.clear_faults()
        results: list[OperationResult] = []
        pending = [asyncio.ensure_future(handle.result()) for handle in self.handles]

        async def quiet() -> bool:
            for handle, task in zip(self.handles, pending, strict=True):
                if not task.done() and not await self._paused(handle.id):
                    return False
            for node in self.nodes:
                try:
                    state = await get_node_state(self.client, node)
                except OperationNotFound:
                    continue
                running = state.running
                if state.queued or (running and not await self._paused(running.workflow_id)):
                    return False
            return True

        await wait_until(
            quiet, within=240, what="every operation to end (or pause, with its reason)"
        )
        await asyncio.gather(*self.retries)
        for task in pending:
            if not task.done():  # a paused operation: it waits for an operator, with its reason
                task.cancel()
            elif task.exception() is None:
                results.append(task.result())
            else:  # a cancelled operation workflow ends in a failure, and has no result
                self.actions["ended_without_result"] += 1
        return results

    async def _paused(self, workflow_id: str) -> bool:
        try:
            status = await get_status(self.client, workflow_id)
        except OperationNotFound:
            return False
        return status.status is OperationStatus.COMPENSATION_PAUSED and bool(status.reason)


async def _postgres_state(connection: Any, node: uuid.UUID) -> tuple[int, str | None]:
    rows = await connection.fetch("SELECT status FROM onex_nodes WHERE node_id = $1", node)
    return len(rows), (rows[0]["status"] if rows else None)


@pytest.mark.timeout(600)
async def test_random_interleavings_leave_every_node_consistent(
    proxied_stack: tuple[Stack, FaultProxy], pg_dsn: str
) -> None:
    """After a seeded run of overlapping operations and faults, every node is active in both
    PostgreSQL and Consul or in neither; its last finished operation says the same; it has
    one registry row at most; nothing is left running, and a paused operation says why."""
    stack, proxy = proxied_stack
    rng = random.Random(SEED)
    run = Run(stack, proxy, rng)
    for _ in range(ROUNDS):
        await run.step()
    results = await run.settle()
    connection = await asyncpg.connect(pg_dsn)  # the server itself, not the proxy
    disagreements = {}
    try:
        for node in run.nodes:
            rows, status = await _postgres_state(connection, node)
            in_consul = f"onex-effect-{node}" in stack.agent.services
            active = status == "active"
            try:
                last = (await get_node_state(run.client, node)).last
            except OperationNotFound:  # no operation on this node was ever accepted
                last = None
            facts = {"rows": rows, "postgres": status, "consul": in_consul, "last": last}
            if rows > 1 or active != in_consul:
                disagreements[str(node)] = facts
            elif last and last["status"] == OperationStatus.SUCCESS.value:
                registered = last["workflow_id"].startswith("onex-register-node-")
                if registered != active:
                    disagreements[str(node)] = facts
    finally:
        await connection.close()
    figures = {
        "seed": SEED,
        "rounds": ROUNDS,
        "actions": dict(run.actions),
        "operations": dict(Counter(result.status.value for result in results)),
    }
    print("interleavings:", json.dumps(figures, sort_keys=True))
    assert disagreements == {}, (
        f"seed {SEED}: these nodes disagree between PostgreSQL, Consul and their last "
        f"operation: {disagreements}; replay with ONEX_INTERLEAVING_SEED={SEED}"
    )
