"""Breaker listeners: transitions are logged, exported as metrics, and shaped as events."""

from __future__ import annotations

import structlog
from temporalio.runtime import MetricBuffer, Runtime, TelemetryConfig

from activities.resilience.breaker import (
    BreakerState,
    CircuitBreaker,
    MetricsListener,
    StateChange,
    log_state_change,
)
from contracts.resilience import BreakerSettings


def _trip(breaker: CircuitBreaker) -> None:
    breaker.record_failure(breaker.acquire())


def test_transitions_are_logged_with_warning_on_open() -> None:
    """Opening is a warning; closing again is info; both name the breaker and the states."""
    breaker = CircuitBreaker(
        "kafka:onex.registry.node.registered.v1",
        BreakerSettings(failure_threshold=1),
        listeners=[log_state_change],
    )
    with structlog.testing.capture_logs() as logs:
        _trip(breaker)
        breaker.reset()
    assert [(log["log_level"], log["previous_state"], log["new_state"]) for log in logs] == [
        ("warning", "closed", "open"),
        ("info", "open", "closed"),
    ]
    assert logs[0]["breaker"] == "kafka:onex.registry.node.registered.v1"


def test_transitions_are_exported_through_the_temporal_runtime() -> None:
    """The metrics listener feeds the runtime's meter: a transition counter and a state gauge."""
    buffer = MetricBuffer(1000)
    runtime = Runtime(telemetry=TelemetryConfig(metrics=buffer))
    breaker = CircuitBreaker(
        "consul:dc1",
        BreakerSettings(failure_threshold=1),
        listeners=[MetricsListener(runtime.metric_meter)],
    )
    _trip(breaker)
    updates = buffer.retrieve_updates()
    by_name = {update.metric.name: update for update in updates}
    assert by_name["onex_circuit_breaker_state"].value == 2
    assert by_name["onex_circuit_breaker_state"].attributes["breaker"] == "consul:dc1"
    transition = by_name["onex_circuit_breaker_transitions"]
    assert (transition.value, transition.attributes["to"]) == (1, "open")


def test_a_state_change_is_the_event_payload() -> None:
    """The payload has exactly the fields of onex.infra.circuit_breaker.state_changed.v1."""
    change = StateChange("db:primary", BreakerState.CLOSED, BreakerState.OPEN, 5, 30.0)
    assert change.payload() == {
        "service_name": "db:primary",
        "previous_state": "closed",
        "new_state": "open",
        "failure_count": 5,
        "reset_timeout_seconds": 30.0,
    }


def test_a_failing_listener_is_logged_and_does_not_break_the_call() -> None:
    """A listener's exception is logged; the transition stands and later listeners still run."""
    heard: list[StateChange] = []

    def broken(change: StateChange) -> None:
        raise RuntimeError("listener bug")

    breaker = CircuitBreaker(
        "x", BreakerSettings(failure_threshold=1), listeners=[broken, heard.append]
    )
    with structlog.testing.capture_logs() as logs:
        _trip(breaker)
    assert breaker.state is BreakerState.OPEN
    assert len(heard) == 1
    assert logs[0]["event"] == "circuit_breaker_listener_failed"
