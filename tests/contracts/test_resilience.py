"""Resilience policies: per-transport defaults, contract overrides, and what Temporal receives."""

from __future__ import annotations

import dataclasses
from datetime import timedelta

import pytest
from pydantic import ValidationError

from contracts.errors import NON_RETRYABLE_ERROR_TYPES, Transport
from contracts.resilience import (
    DEFAULT_POLICY,
    ResiliencePolicy,
    RetrySettings,
    TimeoutSettings,
    default_policy,
    resolve_policy,
)

# SPEC §4.2: max attempts / initial / max delay / coefficient; breaker failures / open seconds.
# The attempt counts are what a step was once limited to; it is now limited in time (BUDGETS).
SPEC_TABLE = {
    Transport.DATABASE: ((3, 0.5, 30.0, 2.0), (5, 30.0)),
    Transport.KAFKA: ((5, 1.0, 60.0, 2.0), (3, 20.0)),
    Transport.CONSUL: ((3, 1.0, 30.0, 2.0), (3, 30.0)),
    Transport.VAULT: ((3, 0.1, 10.0, 2.0), (3, 60.0)),
    Transport.VALKEY: ((3, 0.2, 5.0, 2.0), (10, 30.0)),
    Transport.HTTP: ((3, 0.5, 30.0, 2.0), (5, 60.0)),
    Transport.RUNTIME: ((3, 1.0, 60.0, 2.0), (5, 60.0)),
}
# start_to_close / schedule_to_close (the step's budget) / heartbeat, in seconds.
BUDGETS = {
    Transport.DATABASE: (45.0, 150.0, 10.0),
    Transport.KAFKA: (35.0, 120.0, 10.0),
    Transport.CONSUL: (35.0, 120.0, 10.0),
    Transport.VAULT: (15.0, 90.0, 10.0),
    Transport.VALKEY: (15.0, 60.0, 10.0),
    Transport.HTTP: (45.0, 150.0, 10.0),
    Transport.RUNTIME: (60.0, 240.0, 10.0),
}


@pytest.mark.parametrize("transport", list(SPEC_TABLE), ids=str)
def test_transport_defaults_follow_the_spec_table(transport: Transport) -> None:
    """Each transport's defaults are the figures of SPEC §4.2, with half-open 1 probe / 2 ok;
    attempts are unlimited within the step's time budget."""
    policy = default_policy(transport)
    retry, breaker = SPEC_TABLE[transport]
    assert (
        policy.retry.initial_interval,
        policy.retry.max_interval,
        policy.retry.backoff_coefficient,
    ) == retry[1:]
    assert policy.retry.max_attempts == 0, "forward steps are bounded by time, not attempts"
    assert (policy.circuit_breaker.failure_threshold, policy.circuit_breaker.open_seconds) == (
        breaker
    )
    assert policy.circuit_breaker.half_open_max_calls == 1
    assert policy.circuit_breaker.success_threshold == 2
    assert policy.retry.jitter == 0.25


@pytest.mark.parametrize("transport", list(BUDGETS), ids=str)
def test_each_budget_covers_the_former_attempts_and_one_breaker_opening(
    transport: Transport,
) -> None:
    """A step's time budget is at least what its former attempt count could take at worst
    (every attempt to start-to-close, plus backoff), and at least one open window of its
    breaker plus one whole attempt; a lost attempt is noticed within the heartbeat timeout."""
    policy = default_policy(transport)
    timeouts = policy.timeouts
    assert (timeouts.start_to_close, timeouts.schedule_to_close, timeouts.heartbeat) == (
        BUDGETS[transport]
    ), "update BUDGETS together with contracts/resilience.py, the docs and the changelog"
    budget = timeouts.schedule_to_close
    assert budget is not None
    attempts = SPEC_TABLE[transport][0][0]
    worst = attempts * timeouts.start_to_close + sum(
        policy.retry.base_delay(n) for n in range(1, attempts)
    )
    if transport is not Transport.KAFKA:  # Kafka's budget is its delivery timeout (SPEC)
        assert budget >= worst, f"a slow backend would get less time than with {attempts} tries"
    assert budget >= policy.circuit_breaker.open_seconds + timeouts.start_to_close, (
        "a step must be able to outlive one opening of its breaker"
    )


def test_the_compiled_retry_policy_is_never_temporals_default() -> None:
    """Temporal gets a bounded budget (unlimited attempts within schedule-to-close), the same
    backoff numbers, the non-retryable types and a heartbeat timeout."""
    options = default_policy(Transport.KAFKA).activity_options()
    policy = options["retry_policy"]
    assert policy.maximum_attempts == 0, "unlimited attempts, bounded by schedule-to-close"
    assert policy.initial_interval == timedelta(seconds=1)
    assert policy.maximum_interval == timedelta(seconds=60)
    assert policy.backoff_coefficient == 2.0
    assert set(policy.non_retryable_error_types) == set(NON_RETRYABLE_ERROR_TYPES)
    assert options["start_to_close_timeout"] == timedelta(seconds=35)
    assert options["schedule_to_close_timeout"] == timedelta(seconds=120), "delivery timeout"
    assert options["heartbeat_timeout"] == timedelta(seconds=10)


def test_unlimited_attempts_without_a_time_budget_are_refused() -> None:
    """max_attempts 0 means unlimited: without schedule_to_close it would retry forever."""
    with pytest.raises(ValidationError, match="needs a time budget"):
        ResiliencePolicy(retry=RetrySettings(max_attempts=0), timeouts=TimeoutSettings())
    with pytest.raises(ValueError, match="needs a time budget"):
        resolve_policy(Transport.CONSUL, {"timeouts": {"schedule_to_close": None}})


def test_a_heartbeat_timeout_must_be_shorter_than_an_attempt() -> None:
    """A heartbeat timeout as long as start-to-close would never notice a lost attempt first."""
    with pytest.raises(ValidationError, match="heartbeat must be shorter"):
        TimeoutSettings(start_to_close=10.0, heartbeat=10.0)
    assert (
        "heartbeat_timeout"
        not in ResiliencePolicy(timeouts=TimeoutSettings(heartbeat=None)).activity_options()
    ), "no heartbeat timeout unless asked for"


def test_backoff_follows_the_retry_policy_temporal_runs_the_activity_with() -> None:
    """A compensation runs with a patient policy (a 5-minute cap): its delays follow that
    policy's intervals with the boundary's jitter, not the forward step's 30 s cap."""
    forward = default_policy(Transport.CONSUL).retry
    patient = dataclasses.replace(
        forward.retry_policy(), maximum_attempts=0, maximum_interval=timedelta(minutes=5)
    )
    followed = forward.following(patient)
    assert followed.max_interval == 300.0
    assert followed.jitter == forward.jitter
    assert followed.base_delay(9) == 256.0, "1 s doubling, not capped at 30 s"
    assert forward.base_delay(9) == 30.0
    assert forward.following(None) is forward, "no policy known: the boundary's own"


def test_a_contract_overrides_only_what_it_sets() -> None:
    """A partial resilience block changes its keys; every other value keeps the default."""
    policy = resolve_policy(
        Transport.CONSUL,
        {"retry": {"max_attempts": 6}, "circuit_breaker": {"failure_rate_threshold": 0.5}},
    )
    assert policy.retry.max_attempts == 6
    assert policy.retry.initial_interval == 1.0
    assert policy.circuit_breaker.failure_threshold == 3
    assert policy.circuit_breaker.failure_rate_threshold == 0.5


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"retries": {"max_attempts": 2}}, "unknown resilience section 'retries'"),
        ({"retry": {"max_attempts": -1}}, "greater than or equal to 0"),
        ({"retry": {"max_attempts": 3, "bogus": 1}}, "Extra inputs are not permitted"),
        ({"retry": {"initial_interval": 5, "max_interval": 1}}, "at least initial_interval"),
        ({"circuit_breaker": {"minimum_calls": 50, "window_size": 10}}, "cannot exceed"),
    ],
)
def test_bad_overrides_are_refused_with_the_reason(
    overrides: dict[str, dict[str, object]], message: str
) -> None:
    """An invalid resilience block fails validation and says what is wrong."""
    with pytest.raises((ValueError, ValidationError), match=message):
        resolve_policy(Transport.DATABASE, overrides)


# RETRY-9: default policy (1 s, base 2, 60 s cap), attempt -> (base, low, high).
RETRY_9 = [(1, 1, 0.75, 1.25), (2, 2, 1.5, 2.5), (3, 4, 3, 5), (4, 8, 6, 10),
           (5, 16, 12, 20), (6, 32, 24, 40), (7, 60, 45, 75), (9, 60, 45, 75)]  # fmt: skip


@pytest.mark.parametrize(("attempt", "base", "low", "high"), RETRY_9)
def test_backoff_sequence_and_jitter_band(
    attempt: int, base: float, low: float, high: float
) -> None:
    """Capped exponential delays, ±25 % jitter applied after the cap (a 60 s cap gives 45-75 s)."""
    retry = DEFAULT_POLICY.retry
    assert retry.base_delay(attempt) == base
    assert retry.delay(attempt, 0.0) == pytest.approx(low)
    assert retry.delay(attempt, 0.5) == pytest.approx(base)
    assert retry.delay(attempt, 1.0) == pytest.approx(high)


def test_the_aggressive_sequence() -> None:
    """RETRY-10: 0.1 s initial, base 3, 30 s cap."""
    retry = RetrySettings(initial_interval=0.1, backoff_coefficient=3.0, max_interval=30.0)
    assert [round(retry.base_delay(n), 3) for n in range(1, 8)] == [
        0.1, 0.3, 0.9, 2.7, 8.1, 24.3, 30.0,
    ]  # fmt: skip
