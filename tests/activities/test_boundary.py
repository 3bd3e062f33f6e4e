"""The activity boundary under real Temporal servers: retries, classification, breaker, secrets.

Retry timing is read from what Temporal recorded: each attempt's start time (as the
activity saw it) and the history's scheduled and started events, on the time-skipping server,
where the waits pass in milliseconds.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import random
import uuid
from collections.abc import Awaitable, Callable
from datetime import datetime, timedelta
from typing import Any

import asyncpg
import pytest
from pydantic import BaseModel
from temporalio import activity
from temporalio.api.enums.v1 import EventType
from temporalio.client import WorkflowFailureError
from temporalio.exceptions import ActivityError, ApplicationError
from temporalio.testing import ActivityEnvironment, WorkflowEnvironment
from temporalio.worker import Worker

from activities.resilience.boundary import ActivityBoundary
from activities.resilience.breaker import BreakerRegistry, BreakerState
from contracts.errors import Transport
from contracts.resilience import (
    RESULT_ATTEMPT_KEY,
    BreakerSettings,
    ResiliencePolicy,
    RetrySettings,
    default_policy,
)
from tests.sample_workflows import ActivityCall, CallActivityWorkflow
from tests.support import readable_history
from workflows.operation import _patient

POLICY = ResiliencePolicy(
    retry=RetrySettings(max_attempts=5, initial_interval=1.0, max_interval=60.0, jitter=0.25),
    circuit_breaker=BreakerSettings(failure_threshold=10, open_seconds=20.0),
)


class TemporalClock:
    """The breaker's clock, set to Temporal's time at each attempt (time skips in these tests)."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Script:
    """An operation that fails with the given exceptions, in order, then succeeds."""

    def __init__(self, *failures: BaseException) -> None:
        self.failures = list(failures)
        self.calls = 0
        self.started: list[datetime] = []

    async def __call__(self, argument: str) -> str:
        self.calls += 1
        if self.failures:
            raise self.failures.pop(0)
        return argument.upper()


def boundary_activity(
    name: str,
    script: Script,
    *,
    policy: ResiliencePolicy = POLICY,
    uniform: Callable[[], float] | None = None,
    clock: TemporalClock | None = None,
) -> tuple[Callable[[str], Awaitable[str]], BreakerRegistry]:
    """An activity named ``name`` running ``script`` behind a boundary; also its breakers."""
    breakers = BreakerRegistry(clock=clock or TemporalClock())
    boundary = ActivityBoundary(
        transport=Transport.DATABASE,
        target="postgresql-primary",
        policy=policy,
        breakers=breakers,
        uniform=uniform or random.random,
    )
    guarded = boundary.wrap("upsert_node", script)

    @activity.defn(name=name)
    async def run(argument: str) -> str:
        started = activity.info().started_time
        script.started.append(started)
        if clock is not None:
            clock.now = started.timestamp()
        return await guarded(argument)

    return run, breakers


async def run_workflow(
    env: WorkflowEnvironment,
    task_queue: str,
    activity_fn: Callable[[str], Awaitable[str]],
    name: str,
    policy: ResiliencePolicy = POLICY,
) -> tuple[str | BaseException, list[dict[str, Any]]]:
    """Run CallActivityWorkflow; return its result (or failure) and its history events."""
    workflow_id = f"boundary-{uuid.uuid4()}"
    async with Worker(
        env.client,
        task_queue=task_queue,
        workflows=[CallActivityWorkflow],
        activities=[activity_fn],
    ):
        handle = await env.client.start_workflow(
            CallActivityWorkflow.run,
            ActivityCall(activity=name, argument="ok", policy=policy),
            id=workflow_id,
            task_queue=task_queue,
        )
        outcome: str | BaseException
        try:
            outcome = await handle.result()
        except WorkflowFailureError as failure:
            outcome = failure
        history = await handle.fetch_history()
    return outcome, json.loads(history.to_json())["events"]


def _gaps(times: list[datetime]) -> list[float]:
    return [(later - earlier).total_seconds() for earlier, later in itertools.pairwise(times)]


def _event_time(events: list[dict[str, Any]], event_type: EventType.ValueType) -> datetime:
    name = EventType.Name(event_type)
    for event in events:
        if event["eventType"] == name:
            return datetime.fromisoformat(str(event["eventTime"]).replace("Z", "+00:00"))
    raise AssertionError(f"no {name} in the history")


async def test_connection_errors_are_retried_with_the_jittered_backoff(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    """Two connection errors then success: 3 attempts, delays of 1 s and 2 s within ±25 %.

    With the jitter draw pinned, the exact delays prove that Temporal used the activity's
    next_retry_delay rather than its own (jitter-free) policy.
    """
    script = Script(ConnectionRefusedError(111, "refused"), ConnectionResetError("reset"))
    pinned, _ = boundary_activity("db.pinned", script, uniform=lambda: 0.9)  # factor 1.2
    result, events = await run_workflow(time_skipping_env, task_queue, pinned, "db.pinned")
    assert result == "OK"
    assert script.calls == 3
    assert _gaps(script.started) == pytest.approx([1.2, 2.4], abs=0.05)

    started = _event_time(events, EventType.EVENT_TYPE_ACTIVITY_TASK_STARTED)
    scheduled = _event_time(events, EventType.EVENT_TYPE_ACTIVITY_TASK_SCHEDULED)
    assert (started - scheduled).total_seconds() == pytest.approx(3.6, abs=0.1)
    started_event = next(e for e in events if e["eventType"] == "EVENT_TYPE_ACTIVITY_TASK_STARTED")
    assert started_event["activityTaskStartedEventAttributes"]["attempt"] == 3

    jittered = Script(ConnectionRefusedError(111, "refused"), TimeoutError())
    random_jitter, _ = boundary_activity("db.random", jittered)
    result, _ = await run_workflow(time_skipping_env, task_queue, random_jitter, "db.random")
    assert result == "OK"
    first, second = _gaps(jittered.started)
    assert 0.75 - 0.05 <= first <= 1.25 + 0.05
    assert 1.5 - 0.05 <= second <= 2.5 + 0.05


@pytest.mark.parametrize(
    ("failure", "error_type"),
    [
        (
            asyncpg.exceptions.InvalidPasswordError("password authentication failed"),
            "InfraAuthenticationError",
        ),
        (ValueError("a bug in a handler"), "InfraUnexpectedError"),
    ],
    ids=["auth", "unknown"],
)
async def test_auth_and_unknown_errors_are_attempted_once(
    time_skipping_env: WorkflowEnvironment,
    task_queue: str,
    failure: Exception,
    error_type: str,
) -> None:
    """Retrying bad credentials or an unclassified bug cannot help: one attempt, then failure."""
    script = Script(failure, failure, failure)
    name = f"db.once.{error_type}"
    fn, _ = boundary_activity(name, script)
    outcome, _ = await run_workflow(time_skipping_env, task_queue, fn, name)
    assert isinstance(outcome, WorkflowFailureError)
    assert isinstance(outcome.cause, ActivityError)
    cause = outcome.cause.cause
    assert isinstance(cause, ApplicationError)
    assert (cause.type, cause.non_retryable) == (error_type, True)
    assert script.calls == 1, "a non-retryable error must not be attempted again"
    details = cause.details[0]
    assert isinstance(details, dict)
    assert details["context"]["target"] == "postgresql-primary"
    assert details["code"] == "DATABASE_CONNECTION_ERROR"


async def test_an_open_breaker_delays_the_next_attempt_until_half_open(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    """Two failures open the breaker; the rejected attempt tells Temporal to wait the rest of
    the open time, and the attempt after that is the half-open probe, which succeeds."""
    policy = POLICY.model_copy(
        update={"circuit_breaker": BreakerSettings(failure_threshold=2, open_seconds=20.0)}
    )
    clock = TemporalClock()
    script = Script(ConnectionRefusedError(111, "refused"), ConnectionRefusedError(111, "x"))
    fn, breakers = boundary_activity(
        "db.breaker", script, policy=policy, uniform=lambda: 0.5, clock=clock
    )
    result, _ = await run_workflow(time_skipping_env, task_queue, fn, "db.breaker", policy)
    assert result == "OK"
    assert script.calls == 3, "the rejected attempt never reached the dependency"
    attempts = script.started
    assert len(attempts) == 4
    opened_at = attempts[1]  # the second failure opened it
    rejected, probe = attempts[2], attempts[3]
    remaining = 20.0 - (rejected - opened_at).total_seconds()
    assert (probe - rejected).total_seconds() == pytest.approx(remaining, abs=0.1)
    assert (probe - opened_at).total_seconds() == pytest.approx(20.0, abs=0.1)
    assert breakers.snapshot()[0].state is BreakerState.HALF_OPEN, "one probe success of two"


SECRETS = ("hunter2-Sekr3t", "xoxb-SECRET-TOKEN-1234", "Pa55w0rd-XYZ")


async def test_no_secret_reaches_the_workflow_history(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    """Failures whose messages hold a password, a token and a DSN with credentials leave no
    trace of them anywhere in the history, while the failures themselves are recorded."""
    script = Script(
        ConnectionRefusedError(111, f"password={SECRETS[0]} refused"),
        asyncpg.exceptions.InvalidPasswordError(f"token {SECRETS[1]} rejected"),
    )
    fn, _ = boundary_activity("db.secrets", script)
    outcome, events = await run_workflow(time_skipping_env, task_queue, fn, "db.secrets")
    assert isinstance(outcome, WorkflowFailureError)

    dsn_script = Script(RuntimeError(f"cannot reach postgresql://admin:{SECRETS[2]}@db:5432/x"))
    dsn_fn, _ = boundary_activity("db.dsn", dsn_script)
    dsn_outcome, dsn_events = await run_workflow(time_skipping_env, task_queue, dsn_fn, "db.dsn")
    assert isinstance(dsn_outcome, WorkflowFailureError)

    history = readable_history(events) + readable_history(dsn_events)
    assert "InfraAuthenticationError" in history, "the failure itself must be recorded"
    assert "InfraUnexpectedError" in history
    for secret in SECRETS:
        assert secret not in history, f"{secret!r} leaked into the workflow history"


class _Undo(BaseModel):
    action: str


async def _in_activity(
    fn: Callable[[str], Awaitable[Any]], **info: Any
) -> tuple[Any, ApplicationError | None]:
    """Run ``fn`` once in Temporal's ActivityEnvironment with ``info`` changed."""
    env = ActivityEnvironment()
    env.info = dataclasses.replace(env.info, **info)
    try:
        return await env.run(fn, "ok"), None
    except ApplicationError as error:
        return None, error


async def test_a_compensation_backs_off_by_its_own_patient_policy() -> None:
    """A compensation runs with the workflow's patient options (backoff cap 5 minutes): after
    its 9th failed attempt the boundary asks for 256 s, not the forward policy's 30 s cap."""
    forward = default_policy(Transport.CONSUL)
    patient = _patient(forward.activity_options())["retry_policy"]
    script = Script(*(ConnectionRefusedError(111, "refused") for _ in range(2)))
    fn, _ = boundary_activity("consul.undo", script, policy=forward, uniform=lambda: 0.5)
    _, error = await _in_activity(fn, attempt=9, retry_policy=patient)
    assert error is not None
    assert error.next_retry_delay is not None
    assert error.next_retry_delay.total_seconds() == pytest.approx(256.0), (
        "the delay must follow the retry policy the activity runs with (info.retry_policy)"
    )
    _, forward_error = await _in_activity(fn, attempt=9, retry_policy=forward.retry.retry_policy())
    assert forward_error is not None
    assert forward_error.next_retry_delay is not None
    assert forward_error.next_retry_delay.total_seconds() == pytest.approx(30.0)


async def test_a_rejection_behind_a_probe_in_flight_waits_for_the_probe() -> None:
    """Half-open with a slow probe in flight (another attempt, admitted 10 s ago with a 45 s
    start-to-close): the rejected attempt's next_retry_delay is the 35 s until that probe must
    have ended, not a second, so it does not spend attempts against the breaker."""
    clock = TemporalClock()
    policy = POLICY.model_copy(
        update={"circuit_breaker": BreakerSettings(failure_threshold=1, open_seconds=20.0)}
    )
    script = Script(ConnectionRefusedError(111, "refused"))
    breakers = BreakerRegistry(clock=clock)
    boundary = ActivityBoundary(
        transport=Transport.DATABASE, target="postgresql-primary", policy=policy, breakers=breakers
    )
    fn = boundary.wrap("upsert_node", script)
    await _in_activity(fn)  # the failure opens the breaker
    clock.now += 20.0
    breaker = breakers.get("database:postgresql-primary", policy.circuit_breaker)
    assert breaker.acquire(probe_seconds=45.0), "the slow probe, in flight"
    clock.now += 10.0
    _, error = await _in_activity(fn, start_to_close_timeout=timedelta(seconds=45))
    assert error is not None
    assert error.type == "InfraUnavailableError"
    assert error.next_retry_delay == timedelta(seconds=35), (
        "wait until the probe in flight must have ended"
    )
    assert script.calls == 1, "the rejected attempt never reached the dependency"


async def test_a_success_reports_temporals_attempt_in_an_object_result() -> None:
    """A result that is an object on the wire carries the attempt it succeeded on, for the
    operation workflow; other workflows and other results get the result unchanged."""

    async def undo(argument: str) -> _Undo:
        return _Undo(action=argument)

    boundary = ActivityBoundary(
        transport=Transport.CONSUL,
        target="consul",
        policy=default_policy(Transport.CONSUL),
        breakers=BreakerRegistry(),
    )
    guarded = boundary.wrap("undo", undo)
    result, _ = await _in_activity(guarded, attempt=2, workflow_type="OperationWorkflow")
    assert result == {"action": "ok", RESULT_ATTEMPT_KEY: 2}
    other, _ = await _in_activity(guarded, attempt=2, workflow_type="SomeoneElsesWorkflow")
    assert other == _Undo(action="ok"), "only the workflows that read the attempt get it"
    plain, _ = boundary_activity("db.plain", Script())
    assert (await _in_activity(plain, attempt=2, workflow_type="OperationWorkflow"))[0] == "OK"
