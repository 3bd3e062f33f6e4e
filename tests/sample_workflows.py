"""Small workflows for fixture tests.

Workflow definitions live in modules that import nothing but the SDK: the workflow sandbox
re-imports a workflow's module, and re-importing a C extension such as asyncpg inside it
corrupts that extension's state for the whole process (it crashed the interpreter here).
"""

from __future__ import annotations

from datetime import timedelta

from temporalio import activity, workflow
from temporalio.common import RetryPolicy


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
