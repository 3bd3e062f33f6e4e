"""A worker lost while it queues an event, with a cancel arriving meanwhile: the run goes on
on another worker, and its history replays.

An event is written by a local activity, which the server records only when it ends (as a
marker in the next completed workflow task). When the worker running it dies, the next
worker writes it again, after the cancel; replaying that history resolves the write *before*
the cancel. Code that decided something on a cancel seen during the write took the other
branch on replay (found by the chaos runner, seed 5). These tests kill a real worker process
there and replay what the survivor wrote.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from temporalio.api.enums.v1 import EventType
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.testing import WorkflowEnvironment

from contracts.operations_io import OperationInput, OperationResult, OperationStatus
from tests.support import wait_until
from tests.workflows.scenarios import CORRELATION_ID, Backends, plan, record, request, worker
from workers.replay import replayer
from workflows.operation import OperationWorkflow

ROOT = Path(__file__).resolve().parents[2]


async def lost_while_queuing(
    client: Client, task_queue: str, tmp_path: Path, event_number: int
) -> WorkflowHandle[Any, OperationResult]:
    """Start an operation served by a doomed worker and let it queue its ``event_number``-th
    event until the workflow task is heartbeated (what came before is recorded); cancel it,
    let the doomed worker take the cancel, then kill it."""
    ready = tmp_path / "queuing"
    target = client.service_client.config.target_host
    doomed = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.workflows.doomed_worker",
            target,
            task_queue,
            str(event_number),
            str(ready),
        ],
        cwd=ROOT,
    )
    try:
        node = request(node_id=uuid.uuid4())
        handle = await client.start_workflow(
            OperationWorkflow.run,
            OperationInput(
                plan=plan(), request=node.model_dump(mode="json"), correlation_id=CORRELATION_ID
            ),
            id=f"onex-register-node-{node.node_id}",
            task_queue=task_queue,
            task_timeout=timedelta(seconds=2),
        )

        async def queuing() -> bool:
            return ready.exists()

        await wait_until(queuing, within=60, what="the doomed worker to queue the event")
        completed = await count(handle, EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED)

        async def heartbeated() -> bool:
            return await count(handle, EventType.EVENT_TYPE_WORKFLOW_TASK_COMPLETED) > completed

        await wait_until(heartbeated, within=30, what="the workflow task to be heartbeated")
        await handle.cancel()
        await wait_until(
            lambda: cancel_seen(handle, EventType.EVENT_TYPE_WORKFLOW_TASK_STARTED),
            within=30,
            what="the doomed worker to take the cancel",
        )
    finally:
        doomed.send_signal(signal.SIGKILL)
        doomed.wait()
    return handle


async def count(handle: WorkflowHandle[Any, Any], event_type: EventType.ValueType) -> int:
    return sum([event.event_type == event_type async for event in handle.fetch_history_events()])


async def cancel_seen(handle: WorkflowHandle[Any, Any], then: EventType.ValueType) -> bool:
    """Whether an event of type ``then`` follows the cancel request."""
    requested = False
    async for event in handle.fetch_history_events():
        if event.event_type == EventType.EVENT_TYPE_WORKFLOW_EXECUTION_CANCEL_REQUESTED:
            requested = True
        elif requested and event.event_type == then:
            return True
    return False


async def replays(handle: WorkflowHandle[Any, Any]) -> None:
    history = await handle.fetch_history()
    types = [event.event_type for event in history.events]
    assert EventType.EVENT_TYPE_WORKFLOW_TASK_TIMED_OUT in types, "the worker was not lost"
    result = await replayer().replay_workflow(history, raise_on_replay_failure=False)
    assert result.replay_failure is None, f"the history does not replay: {result.replay_failure}"


async def test_a_cancel_while_a_lost_worker_queues_the_started_event(
    temporal_env: WorkflowEnvironment, task_queue: str, tmp_path: Path
) -> None:
    """The cancel is acted on at the steps: both run on the surviving worker and are undone,
    the operation ends cancelled, and the history replays."""
    client = temporal_env.client
    handle = await lost_while_queuing(client, task_queue, tmp_path, 1)
    backends = Backends()
    async with worker(client, task_queue, backends):
        with pytest.raises(WorkflowFailureError) as failure:
            await handle.result()
        status = await handle.query(OperationWorkflow.status)
    await record(handle, "register_cancelled_worker_lost_during_started_event")
    await replays(handle)
    assert "cancel" in str(failure.value.cause).lower()
    assert status.status is OperationStatus.COMPENSATED
    assert len(backends.calls["consul.undo_register_service"]) == len(
        backends.calls["consul.register_service"]
    )
    assert len(backends.calls["postgres.restore_node"]) == len(
        backends.calls["postgres.upsert_node"]
    )


async def test_a_cancel_while_a_lost_worker_queues_the_completed_event(
    temporal_env: WorkflowEnvironment, task_queue: str, tmp_path: Path
) -> None:
    """The outcome was settled before the last events: the operation reports its success,
    nothing is undone, and the history replays."""
    client = temporal_env.client
    handle = await lost_while_queuing(client, task_queue, tmp_path, 3)
    backends = Backends()
    async with worker(client, task_queue, backends):
        result = await handle.result()
    await record(handle, "register_success_worker_lost_during_completed_event")
    await replays(handle)
    assert result.status is OperationStatus.SUCCESS
    assert backends.calls["consul.undo_register_service"] == []
    assert backends.calls["postgres.restore_node"] == []
