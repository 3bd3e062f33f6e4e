"""The correlation id travels from the client to every activity, child workflow and log line."""

from __future__ import annotations

import uuid

from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from tests.sample_workflows import (
    CorrelatedRequest,
    ObserveCorrelationChildWorkflow,
    ObserveCorrelationWorkflow,
    observe_correlation,
)
from tests.support import wait_until
from workers.interceptors import CORRELATION_ID_ATTRIBUTE, CorrelationInterceptor


def _client_with_interceptor(env: WorkflowEnvironment) -> Client:
    config = env.client.config()
    config["interceptors"] = [CorrelationInterceptor()]
    return Client(**config)


async def _run(
    client: Client, task_queue: str, request: CorrelatedRequest
) -> tuple[str, list[dict[str, str]]]:
    workflow_id = f"correlation-{uuid.uuid4()}"
    async with Worker(
        client,
        task_queue=task_queue,
        workflows=[ObserveCorrelationWorkflow, ObserveCorrelationChildWorkflow],
        activities=[observe_correlation],
    ):
        seen = await client.execute_workflow(
            ObserveCorrelationWorkflow.run, request, id=workflow_id, task_queue=task_queue
        )
    return workflow_id, seen


async def test_the_request_correlation_id_reaches_activities_children_and_logs(
    temporal_env: WorkflowEnvironment, task_queue: str
) -> None:
    """A correlation id in the request is in the header of the activity and of the child
    workflow's activity, in their structlog context, and in the CorrelationId search
    attribute (so `temporal workflow list --query "CorrelationId='...'"` finds the run)."""
    client = _client_with_interceptor(temporal_env)
    correlation_id = uuid.uuid4()
    workflow_id, seen = await _run(
        client, task_queue, CorrelatedRequest(name="n1", correlation_id=correlation_id)
    )
    parent, child = seen
    for observed in (parent, child):
        assert observed["correlation_id"] == str(correlation_id), observed
        assert observed["attempt"] == "1"
        assert observed["activity_type"] == "correlation.observe"
    assert parent["workflow_id"] == workflow_id
    assert child["workflow_id"] == f"{workflow_id}-child"

    description = await client.get_workflow_handle(workflow_id).describe()
    assert description.typed_search_attributes.get(CORRELATION_ID_ATTRIBUTE) == str(correlation_id)

    async def listed() -> bool:
        query = f"CorrelationId='{correlation_id}'"
        return [w.id async for w in client.list_workflows(query)] == [workflow_id]

    await wait_until(listed, within=10, what="the workflow to be listed by CorrelationId")


async def test_a_request_without_one_gets_a_minted_id_everywhere(
    temporal_env: WorkflowEnvironment, task_queue: str
) -> None:
    """With no id anywhere, the client mints one and every hop sees that same id."""
    client = _client_with_interceptor(temporal_env)
    workflow_id, seen = await _run(client, task_queue, CorrelatedRequest(name="n2"))
    minted = uuid.UUID(seen[0]["correlation_id"])
    assert seen[1]["correlation_id"] == str(minted)
    description = await client.get_workflow_handle(workflow_id).describe()
    assert description.typed_search_attributes.get(CORRELATION_ID_ATTRIBUTE) == str(minted)
