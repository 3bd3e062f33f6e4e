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
``next_retry_delay``. Temporal's ``RetryPolicy`` has no jitter, so the delay is computed here.
"""

from __future__ import annotations

import functools
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import timedelta
from typing import Any, ParamSpec, TypeVar
from uuid import UUID

import structlog
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
from contracts.resilience import ResiliencePolicy

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
        attempt = activity.info().attempt if activity.in_activity() else 1
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
            async with breaker.guard(is_failure=is_transport_failure):
                admitted = True
                try:
                    result = await function(*args, **kwargs)
                except Exception as exc:
                    # Classified inside the guard: only transport failures count against it.
                    error = classify(exc, context)
                    if error is exc:
                        raise
                    raise error from exc
        except CircuitOpenError as rejected:
            if admitted:  # raised by the call itself (a nested breaker): an ordinary failure
                raise self._failed(operation, rejected, attempt, started, log) from None
            error = InfraUnavailableError(
                f"{operation} on {self.target} not attempted: its circuit breaker is open",
                context=context,
                retry_after=rejected.retry_after,
            )
            log.warning("circuit_open", retry_after=round(rejected.retry_after, 3))
            _count("onex_circuit_breaker_rejections", breaker=breaker.name)
            raise self._application_error(error, attempt, rejected.retry_after) from None
        except InfraError as error:
            raise self._failed(operation, error, attempt, started, log) from None
        log.debug(
            "operation_succeeded", duration_ms=round((time.perf_counter() - started) * 1000, 2)
        )
        return result

    def _failed(
        self,
        operation: str,
        error: InfraError,
        attempt: int,
        started: float,
        log: Any,
    ) -> ApplicationError:
        """Count and log a failed attempt; the ``ApplicationError`` Temporal should see."""
        duration = time.perf_counter() - started
        delay = self._retry_delay(error, attempt)
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

    def _retry_delay(self, error: InfraError, attempt: int) -> float | None:
        if not error.retryable:
            return None
        backoff = self.policy.retry.delay(attempt, self._uniform())
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
