"""Resilience policies: retries, timeouts and circuit breakers, per transport (SPEC §4.2).

A handler contract's ``resilience`` block may set any subset of these values; the rest come from
the defaults of its transport. :func:`resolve_policy` merges the two, and
:meth:`ResiliencePolicy.activity_options` compiles the result into the keyword arguments of
``workflow.execute_activity``: a Temporal ``RetryPolicy`` (never Temporal's default, which
retries forever), the activity timeouts and the non-retryable error types.

Temporal's ``RetryPolicy`` has no jitter, so activities compute each retry's delay themselves
with :meth:`RetrySettings.delay` and send it as ``next_retry_delay``; the policy carries the same
numbers as the fallback Temporal uses when an activity cannot say (a timeout, a crashed worker).

Forward steps are bounded by time, not by attempts (``max_attempts`` 0: unlimited within
``timeouts.schedule_to_close``): a worker that crashes or restarts costs an attempt, and that
must not count against the backend. Activities heartbeat (``timeouts.heartbeat``), so a lost
attempt is noticed within seconds rather than after its whole start-to-close.

This module is pure and deterministic: workflows import it.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import timedelta
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator
from temporalio.common import RetryPolicy

from contracts.errors import NON_RETRYABLE_ERROR_TYPES, Transport

PositiveSeconds = Annotated[float, Field(gt=0)]

RESULT_ATTEMPT_KEY = "_onex_attempt"
"""Where the activity boundary adds Temporal's attempt number to a result that is an object.

A workflow cannot see on which attempt an activity succeeded, so the boundary says so in the
result; the workflow takes the key out before it keeps or passes on the result (result models
forbid extra keys). Results recorded before the key existed lack it: one attempt is assumed.
"""
RESULT_ATTEMPT_WORKFLOWS = frozenset({"OperationWorkflow"})
"""The workflow types that read ``RESULT_ATTEMPT_KEY``; any other caller gets the plain result."""


class _Policy(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class RetrySettings(_Policy):
    """Capped exponential backoff with symmetric jitter."""

    max_attempts: Annotated[int, Field(ge=0, le=10)] = 3
    """Attempts in all; 0 means unlimited, bounded by ``timeouts.schedule_to_close``."""
    initial_interval: Annotated[float, Field(ge=0.01, le=60)] = 1.0
    max_interval: Annotated[float, Field(ge=0.1, le=300)] = 60.0
    backoff_coefficient: Annotated[float, Field(ge=1.0, le=4.0)] = 2.0
    jitter: Annotated[float, Field(ge=0.0, le=0.5)] = 0.25

    @model_validator(mode="after")
    def _max_not_below_initial(self) -> RetrySettings:
        if self.max_interval < self.initial_interval:
            raise ValueError("max_interval must be at least initial_interval")
        return self

    def base_delay(self, attempt: int) -> float:
        """The delay after failed attempt ``attempt`` (1-based), before jitter."""
        exponent = max(attempt, 1) - 1
        return min(self.initial_interval * self.backoff_coefficient**exponent, self.max_interval)

    def delay(self, attempt: int, unit: float) -> float:
        """The jittered delay after failed attempt ``attempt``; ``unit`` is uniform in [0, 1).

        The cap applies before the jitter, so a 60 s cap yields 45..75 s with jitter 0.25: the
        jitter exists to spread retries of many workflows apart, which a re-cap would undo at
        the cap, where the herd is largest.
        """
        return self.base_delay(attempt) * (1.0 + self.jitter * (2.0 * unit - 1.0))

    def following(self, policy: RetryPolicy | None) -> RetrySettings:
        """These settings (their jitter) with the intervals of ``policy``, when there is one.

        ``policy`` is the retry policy Temporal runs an activity with: a compensation or an
        event write is scheduled with a patient one (see ``workflows.operation``), and its
        backoff must follow that policy, not the forward step's shorter cap. No validation:
        the policy is what Temporal will do, whatever its figures.
        """
        if policy is None:
            return self
        initial = policy.initial_interval.total_seconds()
        # Temporal's own default cap is 100 times the initial interval.
        maximum = (policy.maximum_interval or policy.initial_interval * 100).total_seconds()
        return self.model_copy(
            update={
                "max_attempts": policy.maximum_attempts,
                "initial_interval": initial,
                "max_interval": max(maximum, initial),
                "backoff_coefficient": policy.backoff_coefficient,
            }
        )

    def retry_policy(self) -> RetryPolicy:
        return RetryPolicy(
            initial_interval=timedelta(seconds=self.initial_interval),
            backoff_coefficient=self.backoff_coefficient,
            maximum_interval=timedelta(seconds=self.max_interval),
            maximum_attempts=self.max_attempts,
            non_retryable_error_types=list(NON_RETRYABLE_ERROR_TYPES),
        )


class BreakerSettings(_Policy):
    """When a circuit breaker opens, and how it closes again.

    It opens after ``failure_threshold`` consecutive transport failures or, when
    ``failure_rate_threshold`` is set, when that share of the last ``window_size`` calls failed
    (once at least ``minimum_calls`` were made). A call slower than ``slow_call_seconds`` counts
    as a failure. After ``open_seconds`` it admits ``half_open_max_calls`` probes at a time;
    ``success_threshold`` consecutive probe successes close it, any probe failure re-opens it.
    """

    failure_threshold: Annotated[int, Field(ge=1, le=1000)] = 5
    success_threshold: Annotated[int, Field(ge=1, le=100)] = 2
    open_seconds: Annotated[float, Field(gt=0, le=3600)] = 60.0
    half_open_max_calls: Annotated[int, Field(ge=1, le=100)] = 1
    failure_rate_threshold: Annotated[float, Field(gt=0, le=1)] | None = None
    window_size: Annotated[int, Field(ge=1, le=10_000)] = 20
    minimum_calls: Annotated[int, Field(ge=1, le=10_000)] = 10
    slow_call_seconds: PositiveSeconds | None = None

    @model_validator(mode="after")
    def _minimum_fits_window(self) -> BreakerSettings:
        if self.minimum_calls > self.window_size:
            raise ValueError("minimum_calls cannot exceed window_size")
        return self


class TimeoutSettings(_Policy):
    """Activity timeouts: each attempt, all attempts together (None: no overall limit), and the
    longest silence between two heartbeats before Temporal declares the attempt lost (None: no
    heartbeat; the boundary heartbeats three times per ``heartbeat`` while a call runs)."""

    start_to_close: PositiveSeconds = 60.0
    schedule_to_close: PositiveSeconds | None = None
    heartbeat: PositiveSeconds | None = 10.0

    @model_validator(mode="after")
    def _heartbeat_within_attempt(self) -> TimeoutSettings:
        if self.heartbeat is not None and self.heartbeat >= self.start_to_close:
            raise ValueError(
                "heartbeat must be shorter than start_to_close, or it never detects anything"
            )
        return self


class ResiliencePolicy(_Policy):
    retry: RetrySettings = RetrySettings()
    circuit_breaker: BreakerSettings = BreakerSettings()
    timeouts: TimeoutSettings = TimeoutSettings()

    @model_validator(mode="after")
    def _bounded(self) -> ResiliencePolicy:
        if self.retry.max_attempts == 0 and self.timeouts.schedule_to_close is None:
            raise ValueError(
                "retry.max_attempts 0 (unlimited) needs a time budget: set "
                "timeouts.schedule_to_close, or give max_attempts a number"
            )
        return self

    def activity_options(self) -> dict[str, Any]:
        """Keyword arguments for ``workflow.execute_activity`` (retry policy and timeouts)."""
        timeouts = self.timeouts
        options: dict[str, Any] = {
            "retry_policy": self.retry.retry_policy(),
            "start_to_close_timeout": timedelta(seconds=timeouts.start_to_close),
        }
        if timeouts.schedule_to_close is not None:
            options["schedule_to_close_timeout"] = timedelta(seconds=timeouts.schedule_to_close)
        if timeouts.heartbeat is not None:
            options["heartbeat_timeout"] = timedelta(seconds=timeouts.heartbeat)
        return options


def _policy(
    retry: tuple[int, float, float, float],
    breaker: tuple[int, float],
    start_to_close: float,
    schedule_to_close: float | None = None,
) -> ResiliencePolicy:
    attempts, initial, maximum, coefficient = retry
    failures, open_seconds = breaker
    return ResiliencePolicy(
        retry=RetrySettings(
            max_attempts=attempts,
            initial_interval=initial,
            max_interval=maximum,
            backoff_coefficient=coefficient,
        ),
        circuit_breaker=BreakerSettings(failure_threshold=failures, open_seconds=open_seconds),
        timeouts=TimeoutSettings(
            start_to_close=start_to_close, schedule_to_close=schedule_to_close
        ),
    )


# Start-to-close covers the backend's own per-call timeouts (DB connect 10 s + query 30 s,
# Kafka request 30 s, Consul 30 s, HTTP connect 10 s + read 30 s) with a margin.
#
# Attempts are unlimited (0) within schedule-to-close, the step's budget in time. Each budget
# is at least what the former attempt counts could take at worst (SPEC §4.2's attempts, each
# running to start-to-close, plus their backoff), and at least one breaker open window plus one
# whole attempt, so that a step outlives one opening of its breaker. Kafka's is its delivery
# timeout (120 s). See docs/decisions.md.
DEFAULT_POLICY = _policy(
    (0, 1.0, 60.0, 2.0), (5, 60.0), start_to_close=60.0, schedule_to_close=240.0
)
TRANSPORT_DEFAULTS: dict[Transport, ResiliencePolicy] = {
    Transport.DATABASE: _policy(
        (0, 0.5, 30.0, 2.0), (5, 30.0), start_to_close=45.0, schedule_to_close=150.0
    ),
    Transport.KAFKA: _policy(
        (0, 1.0, 60.0, 2.0), (3, 20.0), start_to_close=35.0, schedule_to_close=120.0
    ),
    Transport.CONSUL: _policy(
        (0, 1.0, 30.0, 2.0), (3, 30.0), start_to_close=35.0, schedule_to_close=120.0
    ),
    Transport.VAULT: _policy(
        (0, 0.1, 10.0, 2.0), (3, 60.0), start_to_close=15.0, schedule_to_close=90.0
    ),
    # A cache and a coordination store: short attempts, since every caller degrades without it.
    Transport.VALKEY: _policy(
        (0, 0.2, 5.0, 2.0), (10, 30.0), start_to_close=15.0, schedule_to_close=60.0
    ),
    Transport.HTTP: _policy(
        (0, 0.5, 30.0, 2.0), (5, 60.0), start_to_close=45.0, schedule_to_close=150.0
    ),
}


def default_policy(transport: Transport) -> ResiliencePolicy:
    return TRANSPORT_DEFAULTS.get(transport, DEFAULT_POLICY)


def resolve_policy(
    transport: Transport, overrides: Mapping[str, Mapping[str, Any]] | None = None
) -> ResiliencePolicy:
    """The transport's defaults with a contract's (partial) ``resilience`` block laid over them."""
    merged = default_policy(transport).model_dump()
    for section, values in (overrides or {}).items():
        if section not in merged:
            raise ValueError(
                f"unknown resilience section {section!r}; expected one of {sorted(merged)}"
            )
        merged[section] = {**merged[section], **values}
    return ResiliencePolicy.model_validate(merged)
