"""Resilience policies: per-transport defaults, contract overrides, and what Temporal receives."""

from __future__ import annotations

from datetime import timedelta

import pytest
from pydantic import ValidationError

from contracts.errors import NON_RETRYABLE_ERROR_TYPES, Transport
from contracts.resilience import (
    DEFAULT_POLICY,
    RetrySettings,
    default_policy,
    resolve_policy,
)

# SPEC §4.2: max attempts / initial / max delay / coefficient; breaker failures / open seconds.
SPEC_TABLE = {
    Transport.DATABASE: ((3, 0.5, 30.0, 2.0), (5, 30.0)),
    Transport.KAFKA: ((5, 1.0, 60.0, 2.0), (3, 20.0)),
    Transport.CONSUL: ((3, 1.0, 30.0, 2.0), (3, 30.0)),
    Transport.VAULT: ((3, 0.1, 10.0, 2.0), (3, 60.0)),
    Transport.HTTP: ((3, 0.5, 30.0, 2.0), (5, 60.0)),
    Transport.RUNTIME: ((3, 1.0, 60.0, 2.0), (5, 60.0)),
}


@pytest.mark.parametrize("transport", list(SPEC_TABLE), ids=str)
def test_transport_defaults_follow_the_spec_table(transport: Transport) -> None:
    """Each transport's defaults are the figures of SPEC §4.2, with half-open 1 probe / 2 ok."""
    policy = default_policy(transport)
    retry, breaker = SPEC_TABLE[transport]
    assert (
        policy.retry.max_attempts,
        policy.retry.initial_interval,
        policy.retry.max_interval,
        policy.retry.backoff_coefficient,
    ) == retry
    assert (policy.circuit_breaker.failure_threshold, policy.circuit_breaker.open_seconds) == (
        breaker
    )
    assert policy.circuit_breaker.half_open_max_calls == 1
    assert policy.circuit_breaker.success_threshold == 2
    assert policy.retry.jitter == 0.25


def test_the_compiled_retry_policy_is_never_temporals_default() -> None:
    """Temporal gets bounded attempts, the same backoff numbers and the non-retryable types."""
    options = default_policy(Transport.KAFKA).activity_options()
    policy = options["retry_policy"]
    assert policy.maximum_attempts == 5, "0 would mean unlimited"
    assert policy.initial_interval == timedelta(seconds=1)
    assert policy.maximum_interval == timedelta(seconds=60)
    assert policy.backoff_coefficient == 2.0
    assert set(policy.non_retryable_error_types) == set(NON_RETRYABLE_ERROR_TYPES)
    assert options["start_to_close_timeout"] == timedelta(seconds=35)
    assert options["schedule_to_close_timeout"] == timedelta(seconds=120), "delivery timeout"


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
        ({"retry": {"max_attempts": 0}}, "greater than or equal to 1"),
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
