"""The operation workflow on real Temporal servers, every path of the saga.

Backends are scripted (see scenarios.py) behind the real activity boundary; time-dependent paths
(the 15-minute retry window) run on the time-skipping server.
"""

from __future__ import annotations

import asyncio

import pytest
from temporalio.client import WorkflowFailureError, WorkflowUpdateFailedError
from temporalio.testing import WorkflowEnvironment

from contracts.operations_io import OperationResult, OperationStatus, StepStatus
from contracts.registry import DeregisterNodeRequest
from tests.support import wait_until
from tests.workflows import scenarios
from tests.workflows.scenarios import Backends, plan, record, refused, skipped, start, worker
from workers.client import result_of
from workflows.operation import OperationWorkflow


def statuses(result: OperationResult) -> dict[str, StepStatus]:
    return {backend.backend: backend.status for backend in result.backends}


async def test_success_registers_in_both_backends_and_queues_events(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    """Both steps succeed: status success, and the started, registered and completed events
    are queued with ids that are stable UUIDs."""
    backends = Backends()
    async with worker(time_skipping_env.client, task_queue, backends):
        handle = await start(time_skipping_env.client, task_queue, plan())
        result = await handle.result()
    await record(handle, "register_success")
    assert result.status is OperationStatus.SUCCESS
    assert statuses(result) == {"consul": StepStatus.SUCCEEDED, "postgres": StepStatus.SUCCEEDED}
    assert result.failed_backends == []
    assert [event.event_type for event in backends.events] == [
        "onex.registry.workflow.started.v1",
        "onex.registry.node.registered.v1",
        "onex.registry.workflow.completed.v1",
    ]
    registered = backends.events[1].payload
    assert registered["consul_service_id"] == f"onex-effect-{scenarios.NODE_ID}"
    assert registered["postgres_row_id"] == str(scenarios.NODE_ID)


async def test_partial_then_targeted_retry_succeeds_without_repeating_the_success(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    """Consul exhausts its attempts while PostgreSQL succeeds: the workflow stays open in
    partial; the validator refuses unknown and succeeded backends; retry_failed('consul')
    re-runs only Consul and the operation succeeds."""
    backends = Backends()
    backends.script("consul.register_service", lambda n: refused(n) if n <= 3 else None)
    client = time_skipping_env.client
    async with worker(client, task_queue, backends):
        handle = await start(client, task_queue, plan())

        async def partial() -> bool:
            return (await handle.query(OperationWorkflow.status)).status is OperationStatus.PARTIAL

        await wait_until(partial, within=30, what="the operation to become partial")
        status = await handle.query(OperationWorkflow.status)
        assert status.failed_backends == ["consul"]
        consul = next(b for b in status.backends if b.backend == "consul")
        assert (consul.error_type, consul.attempts) == ("InfraConnectionError", 3)
        assert consul.error_code == "SERVICE_UNAVAILABLE"

        with pytest.raises(WorkflowUpdateFailedError) as unknown:
            await handle.execute_update(OperationWorkflow.retry_failed, "vault")
        assert "unknown backend 'vault'" in str(unknown.value.cause)
        with pytest.raises(WorkflowUpdateFailedError) as succeeded:
            await handle.execute_update(OperationWorkflow.retry_failed, "postgres")
        assert "did not fail" in str(succeeded.value.cause)

        retried = await handle.execute_update(OperationWorkflow.retry_failed, "consul")
        assert retried.status is OperationStatus.SUCCESS
        result = await handle.result()
    await record(handle, "register_partial_retry_success")
    assert result.status is OperationStatus.SUCCESS
    assert len(backends.calls["postgres.upsert_node"]) == 1, "a success is never repeated"
    assert len(backends.calls["consul.register_service"]) == 4
    assert [e.event_type for e in backends.events][-2:] == [
        "onex.registry.node.registered.v1",
        "onex.registry.workflow.completed.v1",
    ]


async def test_partial_window_expiry_compensates_the_succeeded_steps(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    """Nobody retries within the 15-minute window: PostgreSQL's upsert is undone with the
    request and its own result, and the operation ends compensated."""
    backends = Backends()
    backends.script("consul.register_service", refused)
    client = time_skipping_env.client
    async with worker(client, task_queue, backends):
        handle = await start(client, task_queue, plan())
        result = await handle.result()
    await record(handle, "register_partial_window_expired_compensated")
    assert result.status is OperationStatus.COMPENSATED
    assert statuses(result) == {"consul": StepStatus.FAILED, "postgres": StepStatus.COMPENSATED}
    (compensation,) = backends.calls["postgres.restore_node"]
    assert compensation.forward_result["previous"] is None
    assert compensation.request["node_id"] == str(scenarios.NODE_ID)
    assert backends.calls["consul.undo_register_service"] == []
    assert [e.event_type for e in backends.events][-2:] == [
        "onex.registry.node.registration_failed.v1",
        "onex.registry.workflow.failed.v1",
    ]


async def test_all_or_nothing_compensates_at_once(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    """With all_or_nothing, a failed step compensates the others immediately."""
    backends = Backends()
    backends.script("postgres.upsert_node", refused)
    client = time_skipping_env.client
    async with worker(client, task_queue, backends):
        handle = await start(client, task_queue, plan(aggregation="all_or_nothing"))
        result = await handle.result()
    await record(handle, "register_all_or_nothing_compensated")
    assert result.status is OperationStatus.COMPENSATED
    assert statuses(result) == {"consul": StepStatus.COMPENSATED, "postgres": StepStatus.FAILED}
    assert len(backends.calls["consul.undo_register_service"]) == 1


async def test_a_failed_compensation_ends_compensation_failed_and_stays_queryable(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    """A compensation that keeps failing does not stop the others; the workflow fails with
    CompensationFailedError naming it, and its status can still be queried."""
    backends = Backends()
    backends.script("postgres.upsert_node", refused)
    backends.script("consul.undo_register_service", scenarios.denied)
    client = time_skipping_env.client
    async with worker(client, task_queue, backends):
        handle = await start(client, task_queue, plan(aggregation="all_or_nothing"))
        with pytest.raises(WorkflowFailureError):
            await handle.result()
        result = await result_of(handle)
        queried = await handle.query(OperationWorkflow.status)
    await record(handle, "register_compensation_failed")
    assert result.status is OperationStatus.COMPENSATION_FAILED
    assert result.failed_compensations == ["consul"]
    assert queried.status is OperationStatus.COMPENSATION_FAILED
    assert len(backends.calls["consul.undo_register_service"]) == 1, "non-retryable: once"


async def test_cancellation_compensates_what_succeeded_including_the_step_in_flight(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    """Cancelled while PostgreSQL is still working: the workflow lets that step finish (so it
    knows the upsert took effect), then undoes both steps and ends cancelled."""
    backends = Backends()
    release = asyncio.Event()

    async def slow_upsert(attempt: int) -> None:
        await release.wait()

    backends.script("postgres.upsert_node", slow_upsert)
    client = time_skipping_env.client
    async with worker(client, task_queue, backends):
        handle = await start(client, task_queue, plan())

        async def consul_done_and_upsert_running() -> bool:
            status = await handle.query(OperationWorkflow.status)
            consul = next(b for b in status.backends if b.backend == "consul")
            return consul.success and len(backends.calls["postgres.upsert_node"]) == 1

        await wait_until(consul_done_and_upsert_running, within=30, what="consul to succeed")
        await handle.cancel()
        release.set()  # the upsert completes after the cancellation request
        with pytest.raises(WorkflowFailureError) as failure:
            await handle.result()
        status = await handle.query(OperationWorkflow.status)
    await record(handle, "register_cancelled_compensated")
    assert "cancel" in str(failure.value.cause).lower()
    assert len(backends.calls["consul.undo_register_service"]) == 1
    assert len(backends.calls["postgres.restore_node"]) == 1, "the late upsert is undone too"
    assert statuses(status) == {
        "consul": StepStatus.COMPENSATED,
        "postgres": StepStatus.COMPENSATED,
    }
    assert status.status is OperationStatus.COMPENSATED


async def test_a_retry_is_refused_while_compensating(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    """An all_or_nothing failure compensates at once; a retry_failed Update arriving during the
    compensation is refused, and the operation still ends compensated."""
    backends = Backends()
    backends.script("postgres.upsert_node", refused)
    release = asyncio.Event()

    async def slow_undo(attempt: int) -> None:
        await release.wait()

    backends.script("consul.undo_register_service", slow_undo)
    client = time_skipping_env.client
    async with worker(client, task_queue, backends):
        handle = await start(client, task_queue, plan(aggregation="all_or_nothing"))

        async def compensating() -> bool:
            return len(backends.calls["consul.undo_register_service"]) == 1

        await wait_until(compensating, within=30, what="the compensation to start")
        with pytest.raises(WorkflowUpdateFailedError) as refused_update:
            await handle.execute_update(OperationWorkflow.retry_failed, "postgres")
        assert "being compensated" in str(refused_update.value.cause)
        release.set()
        result = await handle.result()
    assert result.status is OperationStatus.COMPENSATED
    assert len(backends.calls["postgres.upsert_node"]) == 3, "no retry ran"


async def test_a_sequence_retries_the_failed_step_then_the_ones_after_it(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    """In a sequence, a failure stops the steps after it (they stay pending, never success);
    retry_failed re-runs the failed step and then the pending ones, in order."""
    backends = Backends()
    backends.script("postgres.upsert_node", lambda n: refused(n) if n <= 3 else None)
    base = plan(execution_mode="sequential")
    replica = base.step("postgres").model_copy(update={"backend": "replica"})
    sequence = base.model_copy(update={"steps": (*base.steps, replica)})
    client = time_skipping_env.client
    async with worker(client, task_queue, backends):
        handle = await start(client, task_queue, sequence)

        async def partial() -> bool:
            return (await handle.query(OperationWorkflow.status)).status is OperationStatus.PARTIAL

        await wait_until(partial, within=30, what="the sequence to become partial")
        status = await handle.query(OperationWorkflow.status)
        assert statuses(status) == {
            "consul": StepStatus.SUCCEEDED,
            "postgres": StepStatus.FAILED,
            "replica": StepStatus.PENDING,
        }
        retried = await handle.execute_update(OperationWorkflow.retry_failed, "postgres")
        result = await handle.result()
    assert retried.status is OperationStatus.SUCCESS
    assert result.status is OperationStatus.SUCCESS
    assert set(statuses(result).values()) == {StepStatus.SUCCEEDED}
    assert len(backends.calls["postgres.upsert_node"]) == 5, "postgres 3 + 1, then the replica"


async def test_a_disabled_backend_is_skipped_not_successful(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    """A step whose backend is disabled is reported as skipped with the reason."""
    backends = Backends()
    backends.script("consul.register_service", skipped)
    client = time_skipping_env.client
    async with worker(client, task_queue, backends):
        handle = await start(client, task_queue, plan())
        result = await handle.result()
    await record(handle, "register_consul_skipped")
    consul = next(b for b in result.backends if b.backend == "consul")
    assert (consul.status, consul.success) == (StepStatus.SKIPPED, False)
    assert consul.skip_reason == "no Consul address is configured"
    assert result.status is OperationStatus.SUCCESS


async def test_deregistration_removes_from_both_and_announces_it(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    """deregister_node runs both steps in parallel and queues the deregistered event."""
    backends = Backends()
    client = time_skipping_env.client
    request = DeregisterNodeRequest(
        node_id=scenarios.NODE_ID,
        node_type="effect",
        reason="decommissioned",
        correlation_id=scenarios.CORRELATION_ID,
    )
    async with worker(client, task_queue, backends):
        handle = await start(client, task_queue, plan("deregister_node"), request)
        result = await handle.result()
    await record(handle, "deregister_success")
    assert result.status is OperationStatus.SUCCESS
    deregistered = next(
        e for e in backends.events if e.event_type == "onex.registry.node.deregistered.v1"
    )
    assert deregistered.payload["reason"] == "decommissioned"
    assert deregistered.payload["consul_deregistered"] is True


async def test_cancelling_a_sequence_stops_it_and_undoes_the_step_in_flight(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    """Cancelled during the first step of a sequence: that step finishes and is undone, the
    next step never runs, and the workflow ends cancelled (the request is not lost)."""
    backends = Backends()
    release = asyncio.Event()

    async def slow_register(attempt: int) -> None:
        await release.wait()

    backends.script("consul.register_service", slow_register)
    client = time_skipping_env.client
    async with worker(client, task_queue, backends):
        handle = await start(client, task_queue, plan(execution_mode="sequential"))

        async def registering() -> bool:
            return len(backends.calls["consul.register_service"]) == 1

        await wait_until(registering, within=30, what="the first step to start")
        await handle.cancel()
        release.set()
        with pytest.raises(WorkflowFailureError) as failure:
            await handle.result()
    assert "cancel" in str(failure.value.cause).lower()
    assert backends.calls["postgres.upsert_node"] == [], "the sequence stopped"
    assert len(backends.calls["consul.undo_register_service"]) == 1
