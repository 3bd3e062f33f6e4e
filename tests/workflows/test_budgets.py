"""Retry budgets: what a step's attempts cost, and how many it reports (issue items 6 and 7).

A lost attempt (a worker that dies mid-call) is noticed by heartbeat timeout and retried within
the step's time budget, without using up a count meant for the backend's own failures; a step
reports Temporal's own attempt count, on success and on failure.

The crash test runs the activities in a child process that is killed (SIGKILL) in the middle
of a call, on the real dev server; the counting tests run on the time-skipping server.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from typing import Any

from temporalio import activity
from temporalio.api.enums.v1 import TimeoutType
from temporalio.client import Client, WorkflowHandle
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from contracts.errors import Transport
from contracts.operation_contract import OperationPlan
from contracts.operations_io import BackendResult, OperationResult, OperationStatus, StepStatus
from contracts.resilience import RetrySettings, default_policy
from tests.support import wait_until
from tests.workflows.scenarios import Backends, plan, refused, start, worker
from workers.converter import DATA_CONVERTER
from workflows import WORKFLOWS
from workflows.operation import OperationWorkflow

CRASHES = 3
"""More lost attempts than the former three-attempt limit allowed."""
MARKER = "hanging-call-started"
HEARTBEAT = 2.0
"""The test's heartbeat timeout (the default is 10 s; the mechanism is the same)."""


def consul(result: OperationResult) -> BackendResult:
    return next(backend for backend in result.backends if backend.backend == "consul")


def budget_plan() -> OperationPlan:
    """The built-in plan with Consul's default budget (unlimited attempts within 120 s), fast
    backoff and a short heartbeat timeout."""
    compiled = plan()
    fast = default_policy(Transport.CONSUL).retry.model_copy(
        update={"initial_interval": 0.2, "max_interval": 1.0}
    )
    steps = []
    for step in compiled.steps:
        timeouts = step.policy.timeouts.model_copy(update={"heartbeat": HEARTBEAT})
        policy = step.policy.model_copy(update={"retry": fast, "timeouts": timeouts})
        steps.append(step.model_copy(update={"policy": policy}))
    return compiled.model_copy(update={"steps": tuple(steps)})


async def _hang(attempt: int) -> None:
    """The call the child process is killed in: it says it started, then never ends."""
    print(f"{MARKER} {activity.info().attempt}", flush=True)
    await asyncio.Event().wait()


async def _marker(stream: asyncio.StreamReader) -> str:
    """The child's line saying the hanging call started (its logs go to stdout too)."""
    while line := (await stream.readline()).decode():
        if line.startswith(MARKER):
            return line
    return "(the child ended without starting the call)"


async def _child(target: str, namespace: str, task_queue: str) -> None:
    """The doomed worker: every activity, with Consul's registration hanging."""
    client = await Client.connect(target, namespace=namespace, data_converter=DATA_CONVERTER)
    backends = Backends()
    backends.script("consul.register_service", _hang)
    async with Worker(client, task_queue=task_queue, activities=backends.activities()):
        await asyncio.Event().wait()


async def _lost_attempt(handle: WorkflowHandle[Any, Any], attempt: int) -> bool:
    """Whether Temporal has declared ``attempt`` lost by heartbeat timeout and retries it."""
    description = await handle.describe()
    for pending in description.raw_description.pending_activities:
        if pending.activity_type.name != "consul.register_service":
            continue
        timeout = pending.last_failure.timeout_failure_info.timeout_type
        return pending.attempt > attempt and timeout == TimeoutType.TIMEOUT_TYPE_HEARTBEAT
    return False


async def test_a_worker_killed_mid_call_loses_only_its_attempt(
    temporal_env: WorkflowEnvironment, task_queue: str
) -> None:
    """Three workers are killed in the middle of Consul's registration. Each lost attempt is
    declared lost by heartbeat timeout (not after start-to-close) and retried; none counts
    against a limit meant for the backend, so the fourth attempt, on a healthy worker,
    succeeds: the operation ends success, not partial, and reports 4 attempts."""
    client = temporal_env.client
    config = client.service_client.config
    # The workflow worker runs the event writes itself (local activities), and no step.
    events = Backends().activities(only={"postgres.enqueue_event"})
    async with Worker(
        client,
        task_queue=task_queue,
        workflows=WORKFLOWS,
        activities=events,
        no_remote_activities=True,
    ):
        handle = await start(client, task_queue, budget_plan())
        for attempt in range(1, CRASHES + 1):
            child = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "tests.workflows.test_budgets",
                config.target_host,
                client.namespace,
                task_queue,
                stdout=asyncio.subprocess.PIPE,
            )
            assert child.stdout is not None
            try:
                line = await asyncio.wait_for(_marker(child.stdout), timeout=60)
            finally:
                os.kill(child.pid, signal.SIGKILL)
                await child.wait()
            assert line.split() == [MARKER, str(attempt)], (
                f"the child worker should have started attempt {attempt}, it said {line!r}; "
                "run `python -m tests.workflows.test_budgets` by hand to see why"
            )
            await wait_until(
                lambda attempt=attempt: _lost_attempt(handle, attempt),  # type: ignore[misc]
                within=30,
                what=f"attempt {attempt} to be declared lost by heartbeat timeout",
            )
            status = await handle.query(OperationWorkflow.status)
            assert status.status is OperationStatus.RUNNING, (
                f"a lost attempt must not end the step; the operation is {status.status.value}"
            )
        async with Worker(client, task_queue=task_queue, activities=Backends().activities()):
            result = await handle.result()
    assert result.status is OperationStatus.SUCCESS, (
        f"lost attempts used up the step's budget: {result.status.value}, {consul(result)}"
    )
    assert consul(result).attempts == CRASHES + 1, "Temporal's count: the lost ones included"


async def test_attempts_are_temporals_count_on_success_and_on_failure(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    """Consul fails once then succeeds: it reports 2 attempts, not 1. Then, with a 3-attempt
    policy, Consul fails 3 times: 3 attempts; a targeted retry whose first attempt fails too and
    whose second succeeds adds its own 2: 5 in all."""
    client = time_skipping_env.client
    backends = Backends()
    backends.script("consul.register_service", lambda n: refused(n) if n == 1 else None)
    async with worker(client, task_queue, backends):
        handle = await start(client, task_queue, plan())
        result = await handle.result()
    assert result.status is OperationStatus.SUCCESS
    assert consul(result).attempts == 2, "succeeded on Temporal's attempt 2"
    assert "_onex_attempt" not in (consul(result).result or {}), "the workflow keeps results clean"
    postgres = next(backend for backend in result.backends if backend.backend == "postgres")
    assert postgres.attempts == 1

    backends = Backends()
    backends.script("consul.register_service", lambda n: refused(n) if n <= 4 else None)
    three = RetrySettings(max_attempts=3, initial_interval=1.0, max_interval=4.0)
    assert plan().step("consul").policy.retry == three, "scenarios.plan gives 3 attempts"
    async with worker(client, task_queue, backends):
        handle = await start(client, task_queue, plan())

        async def partial() -> bool:
            return (await handle.query(OperationWorkflow.status)).status is OperationStatus.PARTIAL

        await wait_until(partial, within=30, what="the operation to become partial")
        failed = consul(await handle.query(OperationWorkflow.status))
        assert (failed.status, failed.attempts) == (StepStatus.FAILED, 3), "failed on attempt 3"
        retried = await handle.execute_update(OperationWorkflow.retry_failed, "consul")
        # Let it finish while the worker runs: an activity left pending on the shared
        # time-skipping server would hold its clock for the tests after this one.
        await handle.result()
    assert retried.status is OperationStatus.SUCCESS
    assert consul(retried).attempts == 5, "3 attempts, then the retry's own 2"
    assert len(backends.calls["consul.register_service"]) == 5


if __name__ == "__main__":  # the child worker of the crash test
    asyncio.run(_child(*sys.argv[1:4]))
