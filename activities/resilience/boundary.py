"""The activity boundary: every handler operation passes through it exactly once per attempt.

It binds the log context, asks the circuit breaker, times the call and turns any failure into
the one thing Temporal should see::

    ApplicationError(
        message=<sanitized>,
        <ErrorDetails: type, code, retryable, sanitized context, attempt, delay>,
        type=<InfraError subclass name>,
        non_retryable=<not retryable>,
        next_retry_delay=<jittered backoff for this attempt, or the breaker's time left>,
    )

The native exception stays inside the process: it is logged (sanitized) and never chained into
the ``ApplicationError``, because Temporal records a failure's whole cause chain in the
workflow history, which anyone with UI access can read.

There are no loops and no sleeps here: Temporal schedules the next attempt, after
``next_retry_delay``. Temporal's ``RetryPolicy`` has no jitter, so the delay is computed here,
from the retry policy of the activity being run (a compensation's patient one is not the
forward step's), with the boundary's jitter.

While the call runs, the boundary heartbeats (three times per heartbeat timeout, with the
attempt number as details), so that Temporal notices a lost attempt, a crashed worker, within
seconds. On success it adds Temporal's attempt number to a result that is an object, under
``RESULT_ATTEMPT_KEY``, for the workflows that read it (``RESULT_ATTEMPT_WORKFLOWS``): the
operation workflow reports how many attempts a step took.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from datetime import timedelta
from typing import Any, ParamSpec, TypeVar, cast
from uuid import UUID

import structlog
from pydantic_core import to_jsonable_python
from temporalio import activity
from temporalio.exceptions import ApplicationError

from activities.resilience.breaker import BreakerRegistry, CircuitOpenError, is_transport_failure
from activities.resilience.classify import classify
from activities.resilience.correlation import correlation_scope, current_correlation_id
from activities.resilience.sanitize import redact_mapping, sanitize_text
from contracts.errors import (
    ErrorContext,
    ErrorDetails,
    InfraError,
    InfraUnavailableError,
    Transport,
)
from contracts.resilience import (
    RESULT_ATTEMPT_KEY,
    RESULT_ATTEMPT_WORKFLOWS,
    ResiliencePolicy,
    RetrySettings,
)

P = ParamSpec("P")
R = TypeVar("R")

logger = structlog.get_logger("onex.activity")


class ActivityBoundary:
    """The resilience wrapper for the operations of one handler talking to one dependency.

    ``breaker_key`` picks the breaker for a call from its arguments (one per Kafka topic, one
    per Consul datacenter); by default there is one breaker per ``target``.
    """

    def __init__(
        self,
        *,
        transport: Transport,
        target: str,
        policy: ResiliencePolicy,
        breakers: BreakerRegistry,
        breaker_key: Callable[..., str] | None = None,
        uniform: Callable[[], float] = random.random,
    ) -> None:
        self.transport = transport
        self.target = target
        self.policy = policy
        self.breakers = breakers
        self._breaker_key = breaker_key
        self._uniform = uniform

    def wrap(
        self, operation: str, function: Callable[P, Awaitable[R]]
    ) -> Callable[P, Awaitable[R]]:
        """``function`` behind the boundary, with the same signature (for ``activity.defn``)."""

        @functools.wraps(function)
        async def guarded(*args: P.args, **kwargs: P.kwargs) -> R:
            correlation_id = current_correlation_id() or _correlation_in(args, kwargs)
            if correlation_id is None or correlation_id == current_correlation_id():
                return await self._attempt(operation, function, correlation_id, args, kwargs)
            with correlation_scope(correlation_id):
                return await self._attempt(operation, function, correlation_id, args, kwargs)

        return guarded

    async def _attempt(
        self,
        operation: str,
        function: Callable[..., Awaitable[R]],
        correlation_id: UUID | None,
        args: tuple[Any, ...],
        kwargs: Mapping[str, Any],
    ) -> R:
        info = activity.info() if activity.in_activity() else None
        attempt = info.attempt if info else 1
        retry = self.policy.retry.following(info.retry_policy if info else None)
        # A probe cannot outlast its attempt: rejections behind it wait at most that long.
        start_to_close = info.start_to_close_timeout if info else None
        probe_seconds = (
            start_to_close.total_seconds()
            if start_to_close
            else self.policy.timeouts.start_to_close
        )
        context = ErrorContext(
            transport=self.transport,
            operation=operation,
            target=self.target,
            correlation_id=correlation_id,
        )
        key = self._breaker_key(*args, **kwargs) if self._breaker_key else self.target
        breaker = self.breakers.get(f"{self.transport.value}:{key}", self.policy.circuit_breaker)
        log = logger.bind(transport=self.transport.value, operation=operation, target=self.target)
        admitted = False
        started = time.perf_counter()
        try:
            async with breaker.guard(is_failure=is_transport_failure, probe_seconds=probe_seconds):
                admitted = True
                try:
                    async with _heartbeating(info):
                        result = await function(*args, **kwargs)
                except Exception as exc:
                    # Classified inside the guard: only transport failures count against it.
                    error = classify(exc, context)
                    if error is exc:
                        raise
                    raise error from exc
        except CircuitOpenError as rejected:
            if admitted:  # raised by the call itself (a nested breaker): an ordinary failure
                raise self._failed(operation, rejected, attempt, retry, started, log) from None
            error = InfraUnavailableError(
                f"{operation} on {self.target} not attempted: its circuit breaker is open",
                context=context,
                retry_after=rejected.retry_after,
            )
            log.warning("circuit_open", retry_after=round(rejected.retry_after, 3))
            _count("onex_circuit_breaker_rejections", breaker=breaker.name)
            raise self._application_error(error, attempt, rejected.retry_after) from None
        except InfraError as error:
            raise self._failed(operation, error, attempt, retry, started, log) from None
        log.debug(
            "operation_succeeded", duration_ms=round((time.perf_counter() - started) * 1000, 2)
        )
        if info and info.workflow_type in RESULT_ATTEMPT_WORKFLOWS:
            return _with_attempt(result, attempt)
        return result

    def _failed(
        self,
        operation: str,
        error: InfraError,
        attempt: int,
        retry: RetrySettings,
        started: float,
        log: Any,
    ) -> ApplicationError:
        """Count and log a failed attempt; the ``ApplicationError`` Temporal should see."""
        duration = time.perf_counter() - started
        delay = self._retry_delay(error, attempt, retry)
        _count(
            "onex_activity_failures",
            operation=operation,
            error_type=error.error_type,
            retryable=str(error.retryable).lower(),
        )
        cause = error.__cause__ if error.__cause__ is not None else error
        log.warning(
            "operation_failed",
            error_type=error.error_type,
            error=sanitize_text(str(error)),
            cause=type(cause).__name__,
            retryable=error.retryable,
            next_retry_delay=None if delay is None else round(delay, 3),
            duration_ms=round(duration * 1000, 2),
        )
        return self._application_error(error, attempt, delay)

    def _retry_delay(self, error: InfraError, attempt: int, retry: RetrySettings) -> float | None:
        if not error.retryable:
            return None
        backoff = retry.delay(attempt, self._uniform())
        # A server that says when to come back (Retry-After) is believed, never undercut.
        return max(backoff, error.retry_after) if error.retry_after else backoff

    def _application_error(
        self, error: InfraError, attempt: int, delay: float | None
    ) -> ApplicationError:
        message = sanitize_text(error.message)
        safe_context = error.context.model_copy(
            update={"extra": redact_mapping(error.context.extra)}
        )
        details = ErrorDetails(
            error_type=error.error_type,
            code=error.code,
            retryable=error.retryable,
            message=message,
            context=safe_context,
            attempt=attempt,
            next_retry_delay_seconds=delay,
        )
        return ApplicationError(
            message,
            details.model_dump(mode="json"),
            type=error.error_type,
            non_retryable=not error.retryable,
            next_retry_delay=None if delay is None else timedelta(seconds=delay),
        )


@contextlib.asynccontextmanager
async def _heartbeating(info: activity.Info | None) -> AsyncIterator[None]:
    """Heartbeat while the block runs, when the activity has a heartbeat timeout.

    Three heartbeats per timeout: one lost or late heartbeat does not fail a live attempt.
    The details are the attempt number, which a heartbeat timeout carries to the workflow.
    """
    timeout = info.heartbeat_timeout if info else None
    if info is None or not timeout:
        yield
        return
    interval = timeout.total_seconds() / 3
    attempt = info.attempt

    async def beat() -> None:
        while True:
            activity.heartbeat(attempt)
            await asyncio.sleep(interval)

    task = asyncio.create_task(beat())
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def _with_attempt(result: R, attempt: int) -> R:
    """``result`` with Temporal's attempt number added, if it is an object on the wire.

    The workflow reads step results as dicts: a model is sent as its JSON object anyway, so
    sending that object with one more key changes nothing else. Other results pass unchanged.
    """
    wire = to_jsonable_python(result)
    if not isinstance(wire, dict):
        return result
    return cast("R", {**wire, RESULT_ATTEMPT_KEY: attempt})


def _count(metric: str, **labels: str) -> None:
    """Add one to a counter of the worker's Temporal runtime (its Prometheus endpoint)."""
    if activity.in_activity():
        activity.metric_meter().create_counter(metric).add(1, labels)


def _correlation_in(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> UUID | None:
    """The correlation id of the first argument that carries one (request models do)."""
    for value in (*args, *kwargs.values()):
        found = getattr(value, "correlation_id", None)
        if isinstance(found, UUID):
            return found
    return None
