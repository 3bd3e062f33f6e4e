"""The operation workflow on real Temporal servers, every path of the saga.

Backends are scripted (see scenarios.py) behind the real activity boundary; time-dependent paths
(the 15-minute retry window) run on the time-skipping server.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from rich.console import Console
from temporalio.client import (
    Client,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowUpdateFailedError,
    WorkflowUpdateStage,
)
from temporalio.service import RPCError
from temporalio.testing import WorkflowEnvironment

from contracts.operations_io import OperationResult, OperationStatus, StepStatus
from contracts.registry import DeregisterNodeRequest
from tests.support import wait_until
from tests.workflows import scenarios
from tests.workflows.real_backends import real_backends
from tests.workflows.scenarios import Backends, plan, record, refused, skipped, start, worker
from workers.cli.operations import result_table
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
    await record(handle, "register_success_local_events")
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
    request and its own result, and the operation ends compensated. Consul's failure (retryable:
    it may have reached the agent) gets an ambiguous undo, which finds nothing written, so
    that step stays failed."""
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
    (ambiguous,) = backends.calls["consul.undo_register_service"]
    assert (ambiguous.ambiguous, ambiguous.forward_result) == (True, {})
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


async def paused(handle: WorkflowHandle[Any, OperationResult]) -> OperationResult:
    async def is_paused() -> bool:
        status = await handle.query(OperationWorkflow.status)
        return status.status is OperationStatus.COMPENSATION_PAUSED

    await wait_until(is_paused, within=30, what="the compensation to pause")
    return await handle.query(OperationWorkflow.status)


async def test_a_failed_compensation_pauses_and_an_abandon_ends_compensation_failed(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    """A compensation that fails after its budget pauses the operation: it stays open, says
    what is stuck and why, and emits the failure event once. ``abandon(reason)`` ends it
    compensation_failed with the reason; its status can still be queried."""
    backends = Backends()
    backends.script("postgres.upsert_node", refused)
    backends.script("consul.undo_register_service", scenarios.denied)
    client = time_skipping_env.client
    async with worker(client, task_queue, backends):
        handle = await start(client, task_queue, plan(aggregation="all_or_nothing"))
        status = await paused(handle)
        assert status.failed_compensations == ["consul"]
        assert status.reason
        assert "--resume" in status.reason
        assert statuses(status)["consul"] is StepStatus.COMPENSATION_FAILED
        with pytest.raises(WorkflowUpdateFailedError) as blank:
            await handle.execute_update(OperationWorkflow.abandon, " ")
        assert "needs a reason" in str(blank.value.cause)
        with pytest.raises(WorkflowUpdateFailedError) as no_retry:
            await handle.execute_update(OperationWorkflow.retry_failed, "postgres")
        assert "nothing to retry" in str(no_retry.value.cause)
        abandoned = await handle.execute_update(
            OperationWorkflow.abandon, "service removed by hand (ticket OPS-12)"
        )
        with pytest.raises(WorkflowFailureError):
            await handle.result()
        result = await result_of(handle)
        queried = await handle.query(OperationWorkflow.status)
    await record(handle, "register_compensation_paused_abandoned")
    assert abandoned.status is OperationStatus.COMPENSATION_FAILED
    assert result.status is OperationStatus.COMPENSATION_FAILED
    assert result.failed_compensations == ["consul"]
    assert result.reason == "abandoned by an operator: service removed by hand (ticket OPS-12)"
    assert queried.status is OperationStatus.COMPENSATION_FAILED
    assert len(backends.calls["consul.undo_register_service"]) == 1, "non-retryable: once"
    failure_events = [
        e for e in backends.events if e.event_type == "onex.registry.node.registration_failed.v1"
    ]
    assert len(failure_events) == 1, "the failure event goes out once, when the undo pauses"


async def test_a_paused_compensation_resumes_and_the_operation_ends_compensated(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    """After the cause is fixed, ``resume_compensation`` re-runs only the stuck compensation
    and the operation ends compensated; resuming a finished operation is refused."""
    backends = Backends()
    backends.script("postgres.upsert_node", refused)
    backends.script(
        "consul.undo_register_service", lambda n: scenarios.denied(n) if n == 1 else None
    )
    client = time_skipping_env.client
    async with worker(client, task_queue, backends):
        handle = await start(client, task_queue, plan(aggregation="all_or_nothing"))
        await paused(handle)
        resumed = await handle.execute_update(OperationWorkflow.resume_compensation)
        result = await handle.result()
        with pytest.raises(RPCError):  # the workflow has closed: no update can reach it
            await handle.execute_update(OperationWorkflow.resume_compensation)
    await record(handle, "register_compensation_paused_resumed")
    assert resumed.status is OperationStatus.COMPENSATED
    assert result.status is OperationStatus.COMPENSATED
    assert result.failed_compensations == []
    assert statuses(result) == {"consul": StepStatus.COMPENSATED, "postgres": StepStatus.FAILED}
    assert len(backends.calls["consul.undo_register_service"]) == 2
    assert len(backends.calls["postgres.upsert_node"]) == 3, "the forward step is not re-run"


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


async def cancelled_while_event_is_queued(
    client: Client, task_queue: str, backends: Backends, event_number: int, what: str
) -> WorkflowHandle[Any, OperationResult]:
    """Start an operation and cancel it while its ``event_number``-th event is being queued."""
    release = asyncio.Event()

    async def hold(call: int) -> None:
        if call == event_number:
            await release.wait()

    backends.script("postgres.enqueue_event", hold)
    handle = await start(client, task_queue, plan())

    async def queuing() -> bool:
        return len(backends.calls["postgres.enqueue_event"]) == event_number

    await wait_until(queuing, within=30, what=what)
    await handle.cancel()
    # An event is written by a local activity inside a workflow task, which delivers nothing
    # new until it ends: held this long, the worker ends it (at 80% of its timeout) and the
    # next one brings the cancel while the write is still in flight.
    await wait_until(
        lambda: cancel_seen(handle),
        within=60,
        what="a workflow task to complete after the cancel request (bringing it to the workflow)",
    )
    release.set()
    return handle


async def test_a_cancel_while_the_started_event_is_queued_is_acted_on_at_the_steps(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    """Cancelled while the started event was still being queued: the cancel is acted on at the
    steps (a durable point, PATCH_CANCEL_AT_DURABLE_POINTS), which run and are undone; nothing
    is left and the workflow ends cancelled. (Histories from before the patch skipped the
    steps; their golden histories keep replaying that path.)"""
    backends = Backends()
    client = time_skipping_env.client
    async with worker(client, task_queue, backends):
        handle = await cancelled_while_event_is_queued(
            client, task_queue, backends, 1, "the started event to be queued"
        )
        with pytest.raises(WorkflowFailureError) as failure:
            await handle.result()
        status = await handle.query(OperationWorkflow.status)
    assert "cancel" in str(failure.value.cause).lower()
    assert status.status is OperationStatus.COMPENSATED
    for step, undo in (
        ("consul.register_service", "consul.undo_register_service"),
        ("postgres.upsert_node", "postgres.restore_node"),
    ):
        assert len(backends.calls[undo]) == len(backends.calls[step]) == 1, f"{step} not undone"


async def test_a_cancel_after_the_operation_succeeded_reports_success(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    """A cancel that arrives while the completed event is queued, after both steps succeeded,
    undoes nothing, and the operation reports its success."""
    backends = Backends()
    client = time_skipping_env.client
    async with worker(client, task_queue, backends):
        handle = await cancelled_while_event_is_queued(
            client, task_queue, backends, 3, "the completed event to be queued"
        )
        result = await handle.result()
    assert result.status is OperationStatus.SUCCESS
    assert backends.calls["consul.undo_register_service"] == []
    assert backends.calls["postgres.restore_node"] == []


async def cancel_seen(handle: WorkflowHandle[Any, OperationResult]) -> bool:
    """Whether a workflow task has completed since the cancel request was recorded."""
    requested = False
    async for event in handle.fetch_history_events():
        if event.HasField("workflow_execution_cancel_requested_event_attributes"):
            requested = True
        elif requested and event.HasField("workflow_task_completed_event_attributes"):
            return True
    return False


async def test_a_cancel_during_a_retry_waits_for_the_retried_step_and_undoes_it(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    """Cancelled while a retry_failed Update re-runs Consul: the workflow waits for that step to
    end, then undoes it together with PostgreSQL, and ends cancelled with nothing left behind."""
    backends = Backends()
    release = asyncio.Event()

    async def consul(call: int) -> None:
        if call <= 3:
            refused(call)
        await release.wait()

    backends.script("consul.register_service", consul)
    client = time_skipping_env.client
    async with worker(client, task_queue, backends):
        handle = await start(client, task_queue, plan())

        async def partial() -> bool:
            return (await handle.query(OperationWorkflow.status)).status is OperationStatus.PARTIAL

        await wait_until(partial, within=30, what="the operation to become partial")
        await handle.start_update(
            OperationWorkflow.retry_failed, "consul", wait_for_stage=WorkflowUpdateStage.ACCEPTED
        )

        async def retrying() -> bool:
            return len(backends.calls["consul.register_service"]) == 4

        await wait_until(retrying, within=30, what="the retried step to start")
        await handle.cancel()
        await wait_until(
            lambda: cancel_seen(handle), within=30, what="the workflow to act on the cancel"
        )
        release.set()  # the retried step ends only after the workflow has seen the cancel
        with pytest.raises(WorkflowFailureError):
            await handle.result()
        status = await handle.query(OperationWorkflow.status)
    await record(handle, "register_cancelled_during_retry")
    assert len(backends.calls["consul.undo_register_service"]) == 1, "the retried step is undone"
    assert len(backends.calls["postgres.restore_node"]) == 1
    assert status.status is OperationStatus.COMPENSATED
    assert statuses(status) == {
        "consul": StepStatus.COMPENSATED,
        "postgres": StepStatus.COMPENSATED,
    }


async def test_an_event_write_that_outlasts_its_attempts_is_not_dropped(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    """A database restart as the operation ends fails the registered event's write three times
    (all of the event policy's attempts): the write is bounded by time, so the event is queued
    once the database is back, and nothing is listed as undelivered."""
    backends = Backends()
    backends.script("postgres.enqueue_event", lambda n: refused(n) if 2 <= n <= 4 else None)
    client = time_skipping_env.client
    async with worker(client, task_queue, backends):
        handle = await start(client, task_queue, plan())
        result = await handle.result()
    assert result.undelivered_events == []
    assert result.status is OperationStatus.SUCCESS
    assert [e.event_type for e in backends.events] == [
        "onex.registry.workflow.started.v1",
        "onex.registry.node.registered.v1",
        "onex.registry.workflow.completed.v1",
    ]


# -- an undo never destroys newer work (real PostgreSQL, the Consul fake) ------------------------


def consul_down(attempt: int) -> None:
    raise ConnectionRefusedError(111, "connection refused")


def reply_lost(attempt: int) -> None:
    """The agent applied the write; the reply never came back (a timeout, retryable)."""
    raise TimeoutError("the reply was lost after the write")


async def test_register_undo_after_a_newer_deregister_is_superseded(
    time_skipping_env: WorkflowEnvironment, task_queue: str, pg_dsn: str
) -> None:
    """Scenario 1: register(N) goes partial (Consul down); a deregister of N succeeds in
    between; when the register's retry window expires its undo finds the node written by the
    deregister: the node stays deregistered and the register's PostgreSQL step ends superseded,
    with the deregister's workflow id as the reason (result, memo and CLI table). Consul's
    failed step gets an ambiguous undo that finds nothing written: it stays failed."""
    client = time_skipping_env.client
    node = scenarios.request()
    async with real_backends(pg_dsn) as real:
        real.fail("consul.register_service", consul_down)
        async with real.worker(client, task_queue):
            register = await start(client, task_queue, plan())

            async def partial() -> bool:
                status = await register.query(OperationWorkflow.status)
                return status.status is OperationStatus.PARTIAL

            await wait_until(partial, within=30, what="the register to become partial")
            real.heal("consul.register_service")
            # The register's 15-minute window must not pass while the deregister runs.
            with time_skipping_env.auto_time_skipping_disabled():
                deregister = await start(
                    client,
                    task_queue,
                    plan("deregister_node"),
                    DeregisterNodeRequest(
                        node_id=node.node_id, node_type="effect", correlation_id=node.correlation_id
                    ),
                )
                assert (await deregister.result()).status is OperationStatus.SUCCESS
            result = await register.result()
            memo = await (await register.describe()).memo()
        row = await real.node(node.node_id)
        await record(register, "register_superseded_undo")

    assert row is not None, "the undo deleted the node the deregister left inactive"
    assert row["status"] == "inactive", "the register's undo resurrected a deregistered node"
    assert statuses(result) == {"consul": StepStatus.FAILED, "postgres": StepStatus.SUPERSEDED}
    postgres = next(b for b in result.backends if b.backend == "postgres")
    assert postgres.superseded_reason == f"the node was written since by {deregister.id}"
    assert memo["backends"] == {"consul": "failed", "postgres": "superseded"}
    assert result.status is OperationStatus.COMPENSATED
    console = Console(width=300, record=True)
    console.print(result_table(result))
    assert f"undo superseded: the node was written since by {deregister.id}" in (
        console.export_text()
    ), "the CLI table must show why the undo changed nothing"
    (undo_consul,) = real.calls["consul.undo_register_service"]
    assert undo_consul.ambiguous


async def test_a_reused_correlation_id_undoes_with_its_own_run_s_pre_image(
    time_skipping_env: WorkflowEnvironment, task_queue: str, pg_dsn: str
) -> None:
    """Scenario 2: two runs with the same correlation id. The first registers N (new); the
    second updates it and goes partial, and its window expires: its undo restores the first
    run's row (its own pre-image), never deleting a node that existed before its request."""
    client = time_skipping_env.client
    node = scenarios.request()
    async with real_backends(pg_dsn) as real:
        async with real.worker(client, task_queue):
            first = await start(client, task_queue, plan(), node)
            assert (await first.result()).status is OperationStatus.SUCCESS
            before = await real.node(node.node_id)
            real.fail("consul.register_service", consul_down)
            second = await start(client, task_queue, plan(), node.model_copy(update={"port": 7000}))
            result = await second.result()
        after = await real.node(node.node_id)

    assert after is not None, "the second run's undo used the first run's pre-image (no row)"
    assert (after["port"], after["written_by"]) == (8080, before["written_by"])
    assert statuses(result)["postgres"] is StepStatus.COMPENSATED
    assert real.agent.services  # the first run's registration is still there


async def test_an_ambiguous_failure_is_undone_and_a_refused_one_is_not(
    time_skipping_env: WorkflowEnvironment, task_queue: str, pg_dsn: str
) -> None:
    """Scenario 5: every attempt of Consul's register is applied by the agent and then loses
    its reply (retryable): the step fails, yet its ambiguous undo removes the service, so none
    is orphaned. A register the agent refuses (non-retryable) pushes no undo at all."""
    client = time_skipping_env.client
    node = scenarios.request()
    async with real_backends(pg_dsn) as real:
        real.fail("consul.register_service", reply_lost, after_the_write=True)
        real.fail("postgres.upsert_node", reply_lost, after_the_write=True)
        async with real.worker(client, task_queue):
            handle = await start(client, task_queue, plan())
            result = await handle.result()
            await record(handle, "register_ambiguous_failure_undone")
            assert real.agent.services == {}, "an ambiguous failure left an orphaned service"
            assert await real.node(node.node_id) is None, "and an orphaned row"
            assert result.status is OperationStatus.COMPENSATED
            assert statuses(result) == {
                "consul": StepStatus.COMPENSATED,
                "postgres": StepStatus.COMPENSATED,
            }
            consul = next(b for b in result.backends if b.backend == "consul")
            assert consul.error_type == "InfraTimeoutError", "the failure stays reported"

            real.fail("consul.register_service", scenarios.denied)
            real.heal("postgres.upsert_node")
            refused_run = await start(client, task_queue, plan())
            await wait_until(
                lambda: _status_is(refused_run, OperationStatus.PARTIAL),
                within=30,
                what="the refused register to become partial",
            )
            refused = await refused_run.query(OperationWorkflow.status)
            # An open workflow would hold the shared time-skipping server's clock for later tests.
            await refused_run.terminate("the test has seen what it needed")
    assert len(real.calls["consul.undo_register_service"]) == 1, (
        "a refused step (non-retryable) must push no undo"
    )
    assert statuses(refused)["consul"] is StepStatus.FAILED


async def _status_is(handle: WorkflowHandle[Any, OperationResult], wanted: OperationStatus) -> bool:
    return (await handle.query(OperationWorkflow.status)).status is wanted
