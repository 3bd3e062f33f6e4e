"""Circuit breaker transitions, rules and concurrency, driven by a fake clock (no sleeps)."""

from __future__ import annotations

import asyncio
import contextlib
import random
import threading

import pytest

from activities.resilience.breaker import (
    BreakerRegistry,
    BreakerState,
    CircuitBreaker,
    CircuitOpenError,
    StateChange,
)
from contracts.resilience import BreakerSettings
from tests.support import wait_until


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


def make(clock: FakeClock, **settings: object) -> tuple[CircuitBreaker, list[StateChange]]:
    changes: list[StateChange] = []
    breaker = CircuitBreaker(
        "db:primary",
        BreakerSettings.model_validate(
            {"failure_threshold": 3, "open_seconds": 30, "success_threshold": 2, **settings}
        ),
        clock=clock,
        listeners=[changes.append],
    )
    return breaker, changes


def fail(breaker: CircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        breaker.record_failure(breaker.acquire())


def succeed(breaker: CircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        breaker.record_success(breaker.acquire())


def test_closed_until_the_failure_threshold(clock: FakeClock) -> None:
    """N-1 consecutive failures keep it closed; the Nth opens it and the listener hears it."""
    breaker, changes = make(clock)
    fail(breaker, 2)
    assert breaker.state is BreakerState.CLOSED
    fail(breaker)
    assert breaker.state is BreakerState.OPEN
    assert changes == [StateChange("db:primary", BreakerState.CLOSED, BreakerState.OPEN, 3, 30.0)]


def test_a_success_resets_the_consecutive_count(clock: FakeClock) -> None:
    """Failures must be consecutive: a success in between starts the count again."""
    breaker, _ = make(clock)
    fail(breaker, 2)
    succeed(breaker)
    fail(breaker, 2)
    assert breaker.state is BreakerState.CLOSED


def test_open_rejects_with_the_time_left(clock: FakeClock) -> None:
    """While open, calls are refused at once with the exact time until a probe is allowed."""
    breaker, _ = make(clock)
    fail(breaker, 3)
    clock.advance(12.5)
    with pytest.raises(CircuitOpenError) as rejected:
        breaker.acquire()
    assert rejected.value.retry_after == pytest.approx(17.5)
    assert breaker.snapshot().total_rejections == 1
    assert breaker.open_until == pytest.approx(1030.0)


def test_half_open_after_the_open_time_then_closes_after_m_successes(clock: FakeClock) -> None:
    """After open_seconds one probe goes through; two probe successes close the breaker."""
    breaker, changes = make(clock)
    fail(breaker, 3)
    clock.advance(30)
    assert breaker.state is BreakerState.HALF_OPEN
    succeed(breaker)
    assert breaker.snapshot().state is BreakerState.HALF_OPEN
    succeed(breaker)
    assert breaker.state is BreakerState.CLOSED
    assert [(c.previous_state, c.new_state) for c in changes] == [
        (BreakerState.CLOSED, BreakerState.OPEN),
        (BreakerState.OPEN, BreakerState.HALF_OPEN),
        (BreakerState.HALF_OPEN, BreakerState.CLOSED),
    ]


def test_any_probe_failure_reopens_for_a_full_open_time(clock: FakeClock) -> None:
    """A failing probe re-opens the breaker, and the open time starts again from then."""
    breaker, _ = make(clock)
    fail(breaker, 3)
    clock.advance(30)
    succeed(breaker)
    fail(breaker)
    assert breaker.state is BreakerState.OPEN
    assert breaker.open_until == pytest.approx(clock.now + 30)


def test_half_open_admits_only_n_probes_at_a_time(clock: FakeClock) -> None:
    """Beyond half_open_max_calls concurrent probes, calls are rejected until one finishes."""
    breaker, _ = make(clock, half_open_max_calls=2)
    fail(breaker, 3)
    clock.advance(30)
    first, second = breaker.acquire(), breaker.acquire()
    assert first
    assert second
    with pytest.raises(CircuitOpenError):
        breaker.acquire()
    breaker.record_success(first)
    assert breaker.acquire() is True


def test_a_cancelled_probe_frees_its_slot(clock: FakeClock) -> None:
    """A probe that ends without an outcome does not hold the half-open slot forever."""
    breaker, _ = make(clock)
    fail(breaker, 3)
    clock.advance(30)
    breaker.release(breaker.acquire())
    assert breaker.acquire() is True


def test_late_results_of_calls_admitted_while_closed_change_nothing(clock: FakeClock) -> None:
    """A call started before the breaker opened and finishing after it neither closes it
    nor restarts its open time."""
    breaker, _ = make(clock)
    late_ok, late_fail = breaker.acquire(), breaker.acquire()
    fail(breaker, 3)
    opened_until = breaker.open_until
    clock.advance(5)
    breaker.record_success(late_ok)
    breaker.record_failure(late_fail)
    assert breaker.state is BreakerState.OPEN
    assert breaker.open_until == opened_until


def test_failure_rate_over_the_sliding_window(clock: FakeClock) -> None:
    """With a rate rule, alternating failures trip it once the window has its minimum calls."""
    breaker, _ = make(
        clock,
        failure_threshold=100,
        failure_rate_threshold=0.5,
        window_size=10,
        minimum_calls=6,
    )
    for _ in range(2):
        succeed(breaker)
        fail(breaker)
    assert breaker.state is BreakerState.CLOSED, "4 calls are below the minimum of 6"
    succeed(breaker)
    fail(breaker)
    assert breaker.state is BreakerState.OPEN, "3 failures in 6 calls is a 50% rate"


def test_the_window_forgets_old_calls(clock: FakeClock) -> None:
    """Only the last window_size calls count: old failures slide out."""
    breaker, _ = make(
        clock, failure_threshold=100, failure_rate_threshold=0.5, window_size=4, minimum_calls=4
    )
    fail(breaker)
    succeed(breaker, 3)
    fail(breaker)  # window: ok ok ok fail -> 25%
    assert breaker.state is BreakerState.CLOSED
    assert (breaker.snapshot().window_calls, breaker.snapshot().window_failures) == (4, 1)


def test_slow_calls_count_as_failures(clock: FakeClock) -> None:
    """A success slower than slow_call_seconds is recorded as a failure."""
    breaker, _ = make(clock, slow_call_seconds=2.0)
    for _ in range(3):
        breaker.record_success(breaker.acquire(), duration=2.5)
    assert breaker.state is BreakerState.OPEN


async def test_call_counts_exceptions_and_measures_slowness(clock: FakeClock) -> None:
    """The call helper records exceptions as failures and timed successes by duration."""
    breaker, _ = make(clock, slow_call_seconds=1.0)

    async def slow() -> str:
        clock.advance(1.5)
        return "late"

    async def broken() -> None:
        raise ConnectionRefusedError

    assert await breaker.call(slow) == "late"
    with pytest.raises(ConnectionRefusedError):
        await breaker.call(broken)
    assert breaker.snapshot().consecutive_failures == 2


def test_reset_closes_and_forgets(clock: FakeClock) -> None:
    """An operator's reset closes an open breaker at once."""
    breaker, changes = make(clock)
    fail(breaker, 3)
    breaker.reset()
    assert breaker.state is BreakerState.CLOSED
    assert breaker.snapshot().consecutive_failures == 0
    assert changes[-1].new_state is BreakerState.CLOSED


def test_registry_keeps_one_breaker_per_dependency(clock: FakeClock) -> None:
    """Kafka topics (or Consul datacenters) get separate breakers; the same key, the same one."""
    registry = BreakerRegistry(clock=clock)
    settings = BreakerSettings(failure_threshold=1)
    orders = registry.get("kafka:orders", settings)
    assert registry.get("kafka:orders", settings) is orders
    fail(orders)
    assert registry.get("kafka:nodes", settings).state is BreakerState.CLOSED
    assert [s.state for s in registry.snapshot()] == [BreakerState.CLOSED, BreakerState.OPEN]
    registry.reset("kafka:orders")
    assert orders.state is BreakerState.CLOSED


async def test_counters_add_up_under_many_concurrent_calls(clock: FakeClock) -> None:
    """Thousands of interleaved asyncio calls: successes + failures + rejections == calls."""
    breaker, _ = make(clock, failure_threshold=1000)
    rng = random.Random(7)
    outcomes = [rng.random() < 0.3 for _ in range(5000)]

    async def one(failing: bool) -> None:
        async def work() -> None:
            await asyncio.sleep(0)
            if failing:
                raise ConnectionResetError

        with contextlib.suppress(ConnectionResetError):
            await breaker.call(work)

    await asyncio.gather(*(one(failing) for failing in outcomes))
    snapshot = breaker.snapshot()
    assert snapshot.total_failures == sum(outcomes)
    assert snapshot.total_successes == len(outcomes) - sum(outcomes)
    assert snapshot.total_rejections == 0


def test_counters_add_up_across_threads(clock: FakeClock) -> None:
    """The lock keeps counters exact when threads record at the same time."""
    breaker, _ = make(clock, failure_threshold=1000)

    def worker() -> None:
        for index in range(2000):
            probe = breaker.acquire()
            if index % 4 == 0:
                breaker.record_failure(probe)
            else:
                breaker.record_success(probe)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    snapshot = breaker.snapshot()
    assert (snapshot.total_failures, snapshot.total_successes) == (8 * 500, 8 * 1500)


async def test_half_open_never_admits_more_than_n_concurrent_probes(clock: FakeClock) -> None:
    """Many callers racing a half-open breaker: at most N probes are ever in flight at once."""
    breaker, _ = make(clock, half_open_max_calls=3, success_threshold=100)
    fail(breaker, 3)
    clock.advance(30)
    in_flight = 0
    peak = 0
    release = asyncio.Event()

    async def probe() -> None:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await release.wait()
        in_flight -= 1

    async def caller() -> str:
        try:
            await breaker.call(probe)
        except CircuitOpenError:
            return "rejected"
        return "probed"

    tasks = [asyncio.create_task(caller()) for _ in range(200)]

    async def every_caller_answered_or_probing() -> bool:
        return sum(task.done() for task in tasks) + in_flight == len(tasks)

    await wait_until(every_caller_answered_or_probing, within=10, what="all 200 calls to arrive")
    release.set()
    results = await asyncio.gather(*tasks)
    assert peak == 3
    assert results.count("probed") == 3
    assert results.count("rejected") == 197


async def test_guard_counts_only_what_the_predicate_calls_a_failure(clock: FakeClock) -> None:
    """``guard(is_failure=...)``: an exception the predicate accepts is a failure, any other
    one is a success (the dependency answered); both propagate unchanged."""
    breaker, _ = make(clock)

    def transport(exc: Exception) -> bool:
        return isinstance(exc, ConnectionError)

    with pytest.raises(ValueError, match="refused record"):
        async with breaker.guard(is_failure=transport):
            raise ValueError("refused record")
    assert breaker.snapshot().total_successes == 1, "an excluded exception must count as success"
    for _ in range(3):
        with pytest.raises(ConnectionResetError):
            async with breaker.guard(is_failure=transport):
                raise ConnectionResetError
    assert breaker.state is BreakerState.OPEN, "3 transport failures must open the breaker"
    with pytest.raises(CircuitOpenError):
        async with breaker.guard(is_failure=transport):
            raise AssertionError("an open breaker must not admit the call")


async def test_guard_frees_the_probe_slot_of_a_cancelled_call(clock: FakeClock) -> None:
    """A probe cancelled inside the guard records no outcome and frees its half-open slot, so
    the next call is admitted as a probe instead of being rejected."""
    breaker, _ = make(clock, half_open_max_calls=1)
    fail(breaker, 3)
    clock.advance(30)
    entered = asyncio.Event()

    async def probe() -> None:
        async with breaker.guard():
            entered.set()
            await asyncio.Event().wait()  # until cancelled

    task = asyncio.create_task(probe())
    await entered.wait()
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task
    snapshot = breaker.snapshot()
    assert (snapshot.half_open_in_flight, snapshot.total_failures) == (0, 3), (
        "a cancelled probe must release its slot and record nothing: see BreakerGuard.__aexit__"
    )
    async with breaker.guard():
        pass
    assert breaker.snapshot().total_successes == 1


def test_a_rejection_behind_a_probe_in_flight_waits_until_the_probe_must_have_ended(
    clock: FakeClock,
) -> None:
    """Half-open with its probe in flight: a rejection says to come back when the probe must
    have ended (its bound, the attempt's start-to-close), not within a second; a probe past
    its bound is about to end, so then it is a second. Without a bound, one open window."""
    breaker, _ = make(clock)
    fail(breaker, 3)
    clock.advance(30)
    probe = breaker.acquire(probe_seconds=35.0)
    assert probe, "the first call after the open window is the probe"
    clock.advance(5)
    with pytest.raises(CircuitOpenError) as rejected:
        breaker.acquire(probe_seconds=35.0)
    assert rejected.value.retry_after == pytest.approx(30.0), (
        "a rejection must wait for the probe's end, or the caller spends attempts on refusals"
    )
    clock.advance(31)
    with pytest.raises(CircuitOpenError) as late:
        breaker.acquire()
    assert late.value.retry_after == pytest.approx(1.0)
    breaker.record_failure(probe)  # re-opens: the open window rules again
    clock.advance(30)
    unbounded = breaker.acquire()
    with pytest.raises(CircuitOpenError) as rejected_again:
        breaker.acquire()
    assert rejected_again.value.retry_after == pytest.approx(30.0), "one open window"
    breaker.record_success(unbounded)
