"""The operation workflow on real Temporal servers, every path of the saga.

Backends are scripted (see scenarios.py) behind the real activity boundary; time-dependent paths
(the 15-minute retry window) run on the time-skipping server.
"""

from __future__ import annotations

import asyncio

import pytest
from temporalio.client import WorkflowFailureError, WorkflowUpdateFailedError
from temporalio.testing import WorkflowEnvironment

from contracts.operations_io import OperationStatus, StepStatus
from tests.support import wait_until
from tests.workflows import scenarios
from tests.workflows.scenarios import Backends, plan, refused, skipped, start, worker
from workers.client import result_of
from workflows.operation import OperationWorkflow


def statuses(result) -> dict[str, StepStatus]:  # type: ignore[no-untyped-def]
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
