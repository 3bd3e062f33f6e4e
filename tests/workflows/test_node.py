"""The per-node workflow on a real Temporal server: one operation per node at a time.

Requests go through the client helpers (update-with-start on ``onex-node-<node_id>``); the
backends are scripted behind the real activity boundary (see scenarios.py).
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from temporalio.client import Client, WorkflowUpdateFailedError
from temporalio.testing import WorkflowEnvironment

from contracts.node import MAX_QUEUED, NodeInput, NodeState, node_workflow_id
from contracts.operations_io import OperationStatus, StepStatus
from contracts.registry import DeregisterNodeRequest, RegisterNodeRequest
from tests.support import wait_until
from tests.workflows import scenarios
from tests.workflows.scenarios import Backends, onex, operations, record, refused, worker
from workers.client import (
    OperationHandle,
    OperationNotFound,
    get_node_state,
    get_status,
    register_node,
    start_operation,
)
from workers.settings import OnexSettings, WorkerSettings
from workflows.node import NodeWorkflow


def _settings(task_queue: str) -> OnexSettings:
    return OnexSettings(worker=WorkerSettings(task_queue=task_queue))


def _register(node_id: uuid.UUID, **changes: Any) -> RegisterNodeRequest:
    # A new correlation id each time: it is not part of what makes two requests the same.
    return scenarios.request(node_id=node_id, correlation_id=uuid.uuid4(), **changes)


class Gate:
    """A scripted step that waits until the test opens the gate (on its first call only)."""

    def __init__(self) -> None:
        self.open = asyncio.Event()

    async def __call__(self, call: int) -> None:
        if call == 1:
            await self.open.wait()


async def _start(client: Client, task_queue: str, operation: str, request: Any) -> OperationHandle:
    return await start_operation(
        client, operation, request, settings=_settings(task_queue), operations=operations()
    )


async def _state_is(client: Client, node_id: uuid.UUID, running: int, queued: int) -> NodeState:
    async def reached() -> bool:
        state = await get_node_state(client, node_id)
        return (state.running is not None) + 0 == running and len(state.queued) == queued

    await wait_until(reached, within=30, what=f"{running} running and {queued} queued")
    return await get_node_state(client, node_id)


async def test_the_same_request_sent_twice_attaches_and_runs_once(
    temporal_env: WorkflowEnvironment, task_queue: str
) -> None:
    """A second send of the same request (another correlation id, as a client retry mints)
    while the first is open attaches to it: one operation runs, both callers get its result."""
    client, node_id, gate = temporal_env.client, uuid.uuid4(), Gate()
    backends = Backends()
    backends.script("consul.register_service", gate)
    async with worker(client, task_queue, backends):
        first = await _start(client, task_queue, "register_node", _register(node_id))
        second = await _start(client, task_queue, "register_node", _register(node_id))
        state = await _state_is(client, node_id, running=1, queued=0)
        gate.open.set()
        results = await asyncio.gather(first.result(), second.result())
    assert state.accepted == 1, "the repeated request must not be accepted as a new operation"
    assert results[0] == results[1]
    assert results[0].status is OperationStatus.SUCCESS
    assert len(backends.calls["consul.register_service"]) == 1
    assert first.id == second.id == f"onex-register-node-{node_id}"
    assert first.node_workflow_id == node_workflow_id(node_id)


async def test_a_different_request_waits_its_turn_and_then_runs_with_its_own_content(
    temporal_env: WorkflowEnvironment, task_queue: str
) -> None:
    """A register with a new address while one is running is queued (visible in the node's
    state), runs after it, and its result is its own, not the first one's."""
    client, node_id, gate = temporal_env.client, uuid.uuid4(), Gate()
    backends = Backends()
    backends.script("consul.register_service", gate)
    async with worker(client, task_queue, backends):
        first = await _start(client, task_queue, "register_node", _register(node_id))
        moved = _register(node_id, address="10.0.0.9")
        second = await _start(client, task_queue, "register_node", moved)
        state = await _state_is(client, node_id, running=1, queued=1)
        assert state.running is not None
        assert state.running.sequence == 1
        assert [queued.sequence for queued in state.queued] == [2]

        async def first_upserted() -> bool:
            return bool(backends.calls["postgres.upsert_node"])

        await wait_until(first_upserted, within=30, what="the first operation's upsert")
        assert [call.address for call in backends.calls["postgres.upsert_node"]] == ["10.0.0.7"], (
            "the second operation must wait for the first"
        )
        gate.open.set()
        first_result, second_result = await first.result(), await second.result()
        final = await get_node_state(client, node_id)
        await record(client.get_workflow_handle(node_workflow_id(node_id)), "node_queued_operation")
    assert first_result.status is second_result.status is OperationStatus.SUCCESS
    upserts = [call.address for call in backends.calls["postgres.upsert_node"]]
    assert upserts == ["10.0.0.7", "10.0.0.9"], "in the order accepted, one at a time"
    assert second_result.correlation_id == moved.correlation_id
    assert (final.completed, final.running, final.queued) == (2, None, [])


async def test_a_deregister_supersedes_a_register_waiting_in_partial(
    temporal_env: WorkflowEnvironment, task_queue: str
) -> None:
    """register goes partial (Consul refuses); a deregister of the node closes the
    register's retry window: the register is compensated at once (not after 15 minutes),
    then the deregister runs; a retry of the superseded register is refused."""
    client, node_id = temporal_env.client, uuid.uuid4()
    backends = Backends()
    backends.script("consul.register_service", refused)
    async with worker(client, task_queue, backends):
        register = await _start(client, task_queue, "register_node", _register(node_id))

        async def partial() -> bool:
            try:
                status = await get_status(client, register.id)
            except OperationNotFound:  # the node workflow has not started it yet
                return False
            return status.status is OperationStatus.PARTIAL

        await wait_until(partial, within=30, what="the register to go partial")
        deregister = await _start(
            client,
            task_queue,
            "deregister_node",
            DeregisterNodeRequest(node_id=node_id, node_type="effect", correlation_id=uuid.uuid4()),
        )
        registered, removed = await register.result(), await deregister.result()
        await record(
            client.get_workflow_handle(node_workflow_id(node_id)),
            "node_deregister_supersedes_partial_register",
        )
    assert registered.status is OperationStatus.COMPENSATED, registered
    assert registered.reason
    assert "superseded by deregister_node" in registered.reason
    assert {b.backend: b.status for b in registered.backends}["postgres"] is StepStatus.COMPENSATED
    assert removed.status is OperationStatus.SUCCESS
    assert len(backends.calls["postgres.restore_node"]) == 1
    assert len(backends.calls["postgres.deactivate_node"]) == 1


async def test_the_queue_is_bounded_and_a_refusal_says_why(
    temporal_env: WorkflowEnvironment, task_queue: str
) -> None:
    """Behind a running operation, at most MAX_QUEUED wait; the next is refused with the
    count and where to look, and nothing about it runs."""
    client, node_id, gate = temporal_env.client, uuid.uuid4(), Gate()
    backends = Backends()
    backends.script("consul.register_service", gate)
    async with worker(client, task_queue, backends):
        handles = [await _start(client, task_queue, "register_node", _register(node_id))]
        for port in range(9000, 9000 + MAX_QUEUED):
            handles.append(
                await _start(client, task_queue, "register_node", _register(node_id, port=port))
            )
        await _state_is(client, node_id, running=1, queued=MAX_QUEUED)
        with pytest.raises(WorkflowUpdateFailedError) as refused_update:
            await _start(client, task_queue, "register_node", _register(node_id, port=9999))
        gate.open.set()
        results = [await handle.result() for handle in handles]
    assert "operations waiting" in str(refused_update.value.cause)
    assert f"onex status {node_workflow_id(node_id)}" in str(refused_update.value.cause)
    assert all(result.status is OperationStatus.SUCCESS for result in results)
    ports = [call.port for call in backends.calls["postgres.upsert_node"]]
    assert 9999 not in ports
    assert len(ports) == MAX_QUEUED + 1


async def test_register_node_waits_in_one_call_and_a_later_register_is_a_new_operation(
    temporal_env: WorkflowEnvironment, task_queue: str
) -> None:
    """The waiting helper returns the result of its own request; sent again with new content
    after the first finished, it runs again (nothing adopts an old run's result)."""
    client, node_id = temporal_env.client, uuid.uuid4()
    settings, plans = _settings(task_queue), operations()
    async with worker(client, task_queue, Backends()):
        first = await register_node(client, _register(node_id), settings=settings, operations=plans)
        second = await register_node(
            client, _register(node_id, port=8081), settings=settings, operations=plans
        )
        state = await get_node_state(client, node_id)
    assert first.status is second.status is OperationStatus.SUCCESS
    assert first.correlation_id != second.correlation_id
    assert (state.accepted, state.completed) == (2, 2)


async def test_a_queued_operation_reports_queued_with_what_it_waits_for(
    temporal_env: WorkflowEnvironment, task_queue: str, cli_env: dict[str, str]
) -> None:
    """Before its turn an operation has no workflow of its own: its status is ``queued``,
    naming how many wait before it and where to look; a supersede signal to a register that
    is still running its steps changes nothing (it succeeds, then the deregister runs)."""
    client, node_id, gate = temporal_env.client, uuid.uuid4(), Gate()
    backends = Backends()
    backends.script("consul.register_service", gate)
    async with worker(client, task_queue, backends):
        register = await _start(client, task_queue, "register_node", _register(node_id))
        deregister = await _start(
            client,
            task_queue,
            "deregister_node",
            DeregisterNodeRequest(node_id=node_id, node_type="effect", correlation_id=uuid.uuid4()),
        )
        await _state_is(client, node_id, running=1, queued=1)
        waiting = await get_status(client, deregister.id)
        shown = await onex(temporal_env, cli_env, "status", node_workflow_id(node_id))
        queued_shown = await onex(temporal_env, cli_env, "status", deregister.id)
        gate.open.set()
        registered, removed = await register.result(), await deregister.result()
    assert waiting.status is OperationStatus.QUEUED
    assert waiting.reason is not None
    assert f"waiting behind 1 operation(s) on node {node_id}" in waiting.reason
    assert registered.status is OperationStatus.SUCCESS
    assert removed.status is OperationStatus.SUCCESS
    assert backends.calls["postgres.restore_node"] == [], "nothing was undone"
    assert shown.exit_code == 0, shown.output
    assert "1 waiting" in shown.output
    assert deregister.id in shown.output
    assert queued_shown.exit_code == 0, queued_shown.output
    assert "queued" in queued_shown.output


async def test_the_node_workflow_continues_as_new_between_operations_and_keeps_its_counts(
    temporal_env: WorkflowEnvironment, task_queue: str
) -> None:
    """Started to continue as new after every operation, the node workflow does so while
    idle: the second request reaches the new run, and the counts and the last outcome carry
    over (the history of one run stays short however many operations a node sees)."""
    client, node_id = temporal_env.client, uuid.uuid4()
    settings, plans = _settings(task_queue), operations()
    first_run = await client.start_workflow(
        NodeWorkflow.run,
        NodeInput(node_id=node_id, continue_after=1),
        id=node_workflow_id(node_id),
        task_queue=task_queue,
    )
    async with worker(client, task_queue, Backends()):
        await register_node(client, _register(node_id), settings=settings, operations=plans)

        async def continued() -> bool:
            latest = await client.get_workflow_handle(node_workflow_id(node_id)).describe()
            return latest.run_id != first_run.first_execution_run_id

        await wait_until(continued, within=30, what="the node workflow to continue as new")
        second = await register_node(
            client, _register(node_id, port=8082), settings=settings, operations=plans
        )
        state = await get_node_state(client, node_id)
    assert second.status is OperationStatus.SUCCESS
    assert (state.accepted, state.completed) == (2, 2)
    assert state.last == {"workflow_id": second.workflow_id, "status": "success"}
