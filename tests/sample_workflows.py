"""Small workflows for fixture tests.

Workflow definitions live in modules that import nothing but the SDK: the workflow sandbox
re-imports a workflow's module, and re-importing a C extension such as asyncpg inside it
corrupts that extension's state for the whole process (it crashed the interpreter here).
"""

from __future__ import annotations

import asyncio
import uuid
from datetime import timedelta
from typing import Any

from pydantic import BaseModel
from temporalio import activity, workflow
from temporalio.common import RetryPolicy

from contracts.resilience import ResiliencePolicy


@activity.defn(name="fixtures.echo")
async def echo(text: str) -> str:
    return text.upper()


@workflow.defn
class SleepThenEchoWorkflow:
    """Waits one hour of workflow time, then runs one activity."""

    @workflow.run
    async def run(self, text: str) -> str:
        await workflow.sleep(timedelta(hours=1))
        return await workflow.execute_activity(
            echo,
            text,
            start_to_close_timeout=timedelta(seconds=10),
            retry_policy=RetryPolicy(maximum_attempts=1),
        )


class ActivityCall(BaseModel):
    """Run one activity by name with a project resilience policy."""

    activity: str
    argument: str
    policy: ResiliencePolicy


@workflow.defn
class CallActivityWorkflow:
    """Calls one activity with the options compiled from a ResiliencePolicy."""

    @workflow.run
    async def run(self, call: ActivityCall) -> str:
        result: str = await workflow.execute_activity(
            call.activity, call.argument, result_type=str, **call.policy.activity_options()
        )
        return result


class CorrelatedRequest(BaseModel):
    """A request that may carry its correlation id, as the project's requests do."""

    name: str
    correlation_id: uuid.UUID | None = None


@activity.defn(name="correlation.observe")
async def observe_correlation(label: str) -> dict[str, str]:
    """What an activity sees: the bound correlation id and its structlog context."""
    import structlog

    from activities.resilience.correlation import current_correlation_id

    context = {key: str(value) for key, value in structlog.contextvars.get_contextvars().items()}
    return {"label": label, "correlation_id": str(current_correlation_id()), **context}


@workflow.defn
class ObserveCorrelationChildWorkflow:
    @workflow.run
    async def run(self) -> dict[str, str]:
        return await workflow.execute_activity(
            observe_correlation, "child", start_to_close_timeout=timedelta(seconds=10)
        )


@workflow.defn
class ObserveCorrelationWorkflow:
    """Runs the observing activity itself and in a child workflow."""

    @workflow.run
    async def run(self, request: CorrelatedRequest) -> list[dict[str, str]]:
        own = await workflow.execute_activity(
            observe_correlation, "parent", start_to_close_timeout=timedelta(seconds=10)
        )
        child = await workflow.execute_child_workflow(
            ObserveCorrelationChildWorkflow.run, id=f"{workflow.info().workflow_id}-child"
        )
        return [own, child]


class RunActivity(BaseModel):
    """Run one activity by name with a JSON argument."""

    activity: str
    argument: dict[str, object]
    max_attempts: int = 1
    # The activity's task queue, when it is not the workflow's (a worker process that serves
    # the activity but not this workflow).
    task_queue: str | None = None


@workflow.defn
class RunActivityWorkflow:
    @workflow.run
    async def run(self, call: RunActivity) -> dict[str, object]:
        result: dict[str, object] = await workflow.execute_activity(
            call.activity,
            call.argument,
            result_type=dict,
            start_to_close_timeout=timedelta(seconds=60),
            retry_policy=RetryPolicy(maximum_attempts=call.max_attempts),
            task_queue=call.task_queue,
        )
        return result


@workflow.defn
class BareShapeWorkflow:
    """The register_node shape with no-op activities: 1, then 2 in parallel, then 2 (the
    baseline of ``make bench``; sandboxed like every workflow of the project)."""

    @workflow.run
    async def run(self, payload: dict[str, Any]) -> str:
        options: dict[str, Any] = {
            "start_to_close_timeout": timedelta(seconds=30),
            "retry_policy": RetryPolicy(maximum_attempts=3),
        }
        await workflow.execute_activity(bare_noop, payload, **options)
        await asyncio.gather(
            workflow.execute_activity(bare_noop, payload, **options),
            workflow.execute_activity(bare_noop, payload, **options),
        )
        await workflow.execute_activity(bare_noop, payload, **options)
        await workflow.execute_activity(bare_noop, payload, **options)
        return "ok"


@activity.defn(name="bench.noop")
async def bare_noop(payload: dict[str, Any]) -> dict[str, Any]:
    return payload
