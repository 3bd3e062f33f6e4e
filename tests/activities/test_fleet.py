"""Breakers the fleet shares through a real Valkey: opens reach every worker, failures count
fleet-wide, one probe per half-open window, operators' forced opens, and the per-process
fallback while Valkey is away (logged once, and a gauge)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
import structlog
from temporalio.runtime import MetricBuffer, Runtime, TelemetryConfig

from activities.resilience.breaker import (
    BreakerRegistry,
    BreakerState,
    CircuitBreaker,
    CircuitOpenError,
    Origin,
    StateChange,
)
from activities.resilience.fleet import FleetBreakers, fleet_keys
from activities.settings import ValkeySettings
from activities.valkey import connect_valkey
from contracts.resilience import BreakerSettings
from tests.fakes.fault_proxy import FaultProxy
from tests.support import wait_until

NAME = "database:postgresql-primary"
SETTINGS = BreakerSettings(failure_threshold=3, open_seconds=30.0)
DEADLINE = 15.0  # generous: the machine is shared; the benchmark reports the real figures


@dataclass
class Worker:
    """One worker's breakers and its coordinator, running against Valkey."""

    registry: BreakerRegistry
    fleet: FleetBreakers
    heard: list[StateChange] = field(default_factory=list)

    def breaker(self, settings: BreakerSettings = SETTINGS) -> CircuitBreaker:
        return self.registry.get(NAME, settings)


@contextlib.asynccontextmanager
async def running_worker(
    settings: ValkeySettings,
    prefix: str,
    worker_id: str,
    *,
    meter_buffer: MetricBuffer | None = None,
) -> AsyncIterator[Worker]:
    client = await connect_valkey(settings)
    registry = BreakerRegistry()
    meter = None
    if meter_buffer is not None:
        meter = Runtime(telemetry=TelemetryConfig(metrics=meter_buffer)).metric_meter
    fleet = FleetBreakers(client, registry, worker_id=worker_id, prefix=prefix, meter=meter)
    worker = Worker(registry, fleet)
    registry.add_listener(worker.heard.append)
    fleet.attach()
    stop = asyncio.Event()
    task = asyncio.create_task(fleet.run(stop))
    try:
        yield worker
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await client.aclose()


@pytest.fixture
def prefix() -> str:
    return f"onex:t{uuid.uuid4().hex[:10]}:"


@contextlib.asynccontextmanager
async def connected_workers(
    settings: ValkeySettings, prefix: str, count: int
) -> AsyncIterator[list[Worker]]:
    async with contextlib.AsyncExitStack() as stack:
        workers = [
            await stack.enter_async_context(running_worker(settings, prefix, f"w{index}"))
            for index in range(count)
        ]
        for worker in workers:
            await asyncio.wait_for(worker.fleet.connected.wait(), DEADLINE)
        yield workers


def fail(breaker: CircuitBreaker, times: int = 1) -> None:
    for _ in range(times):
        breaker.record_failure(breaker.acquire())


async def until_state(worker: Worker, state: BreakerState, what: str) -> None:
    async def reached() -> bool:
        return worker.breaker().state is state

    await wait_until(reached, within=DEADLINE, what=what)


async def test_one_workers_open_reaches_the_others(
    valkey_server: ValkeySettings, prefix: str
) -> None:
    """A breaker that opens in one worker opens in every other one, even where it was never
    used, and they reject with the time left in the fleet's window."""
    async with connected_workers(valkey_server, prefix, 3) as (first, second, third):
        second.breaker()  # the third has not used this breaker yet
        fail(first.breaker(), SETTINGS.failure_threshold)
        await until_state(second, BreakerState.OPEN, "the open to reach the second worker")

        async def third_has_it() -> bool:
            return third.registry._pending_opens.get(NAME) is not None

        await wait_until(third_has_it, within=DEADLINE, what="the open to reach the third")
        with pytest.raises(CircuitOpenError) as rejected:
            third.breaker().acquire()
        assert 0 < rejected.value.retry_after <= SETTINGS.open_seconds, (
            "a worker that never used the breaker must still reject for the fleet's window"
        )


async def test_failures_count_across_the_fleet(valkey_server: ValkeySettings, prefix: str) -> None:
    """Two failures in one worker and one in another reach the threshold of three: the fleet
    opens, though no single worker saw three."""
    async with connected_workers(valkey_server, prefix, 2) as (first, second):
        fail(first.breaker(), 2)
        fail(second.breaker(), 1)
        await until_state(first, BreakerState.OPEN, "the fleet-wide count to open the first")
        await until_state(second, BreakerState.OPEN, "the fleet-wide count to open the second")


async def test_a_success_after_failures_starts_the_fleet_count_again(
    valkey_server: ValkeySettings, prefix: str
) -> None:
    """Failures separated by a success are not consecutive: the fleet count is reset."""
    async with connected_workers(valkey_server, prefix, 2) as (first, second):
        counter = fleet_keys(prefix, NAME).failures
        fail(first.breaker(), 2)

        async def first_counted() -> bool:
            return bool(await first.fleet.client.get(counter) == "2")

        await wait_until(first_counted, within=DEADLINE, what="the first worker's failures")
        first.breaker().record_success(first.breaker().acquire())

        async def reset() -> bool:
            return await first.fleet.client.get(counter) is None

        await wait_until(reset, within=DEADLINE, what="the success to reset the fleet count")
        fail(second.breaker(), 2)

        async def counted() -> bool:
            return bool(await first.fleet.client.get(counter) == "2")

        await wait_until(counted, within=DEADLINE, what="the second worker's failures counted")
        assert first.breaker().state is BreakerState.CLOSED, "2 + 2 with a success between"
        assert second.breaker().state is BreakerState.CLOSED, "2 + 2 with a success between"


async def test_the_fleet_sends_one_probe_per_half_open_window(
    valkey_server: ValkeySettings, prefix: str
) -> None:
    """Once the window passed, one worker gets the probe lock; the other is rejected until
    that probe ends; its failure re-opens the breaker everywhere."""
    short = BreakerSettings(failure_threshold=1, open_seconds=0.5)
    async with connected_workers(valkey_server, prefix, 2) as (first, second):
        fail(first.breaker(short))
        second.breaker(short)
        await until_state(second, BreakerState.OPEN, "the open to reach the second worker")
        await until_state(first, BreakerState.HALF_OPEN, "the first's window to pass")
        await until_state(second, BreakerState.HALF_OPEN, "the second's window to pass")

        async def admitted() -> bool:
            try:
                return await first.breaker(short).admit(probe_seconds=20.0)
            except CircuitOpenError:
                return False  # the fleet's key outlived the local window by a few ms

        await wait_until(admitted, within=DEADLINE, what="the first worker's probe")
        with pytest.raises(CircuitOpenError) as rejected:
            await second.breaker(short).admit(probe_seconds=20.0)
        assert rejected.value.retry_after > 1.0, "rejected until the other probe must end"
        assert second.breaker(short).snapshot().half_open_in_flight == 0, "its slot is freed"

        first.breaker(short).record_failure(probe=True)
        assert first.breaker(short).state is BreakerState.OPEN

        async def reopened() -> bool:
            return bool(await second.fleet.client.pttl(fleet_keys(prefix, NAME).open) > 0)

        await wait_until(reopened, within=DEADLINE, what="the failed probe to re-open the key")
        with pytest.raises(CircuitOpenError):
            await second.breaker(short).admit(probe_seconds=20.0)


async def test_a_probe_success_closes_the_fleet(valkey_server: ValkeySettings, prefix: str) -> None:
    """The prober's success closes its breaker, and the close reaches the other workers."""
    short = BreakerSettings(failure_threshold=1, open_seconds=0.5, success_threshold=1)
    async with connected_workers(valkey_server, prefix, 2) as (first, second):
        fail(first.breaker(short))
        second.breaker(short)
        await until_state(second, BreakerState.OPEN, "the open to reach the second worker")
        await until_state(first, BreakerState.HALF_OPEN, "the window to pass")

        async def probed() -> bool:
            try:
                return await first.breaker(short).admit(probe_seconds=20.0)
            except CircuitOpenError:
                return False

        await wait_until(probed, within=DEADLINE, what="the probe to be admitted")
        first.breaker(short).record_success(probe=True)
        assert first.breaker(short).state is BreakerState.CLOSED
        await until_state(second, BreakerState.CLOSED, "the close to reach the second worker")


async def test_a_new_worker_learns_the_opens_in_force(
    valkey_server: ValkeySettings, prefix: str
) -> None:
    """A worker that starts while a breaker is open (it missed the announcement) opens it."""
    async with connected_workers(valkey_server, prefix, 1) as (first,):
        fail(first.breaker(), SETTINGS.failure_threshold)

        async def stored() -> bool:
            return bool(await first.fleet.client.pttl(fleet_keys(prefix, NAME).open) > 0)

        await wait_until(stored, within=DEADLINE, what="the open key to be written")
        async with connected_workers(valkey_server, prefix, 1) as (late,):
            assert late.breaker().state is BreakerState.OPEN, "resynchronized on connect"


async def test_an_operators_open_is_rejected_everywhere_with_its_reason(
    valkey_server: ValkeySettings, prefix: str
) -> None:
    """A forced open rejects in every worker with the time left, is announced with the
    operator's reason, survives a worker's own close, and an operator's close ends it."""
    async with connected_workers(valkey_server, prefix, 2) as (first, second):
        first.breaker()
        second.breaker()
        assert await first.fleet.publish_open(
            NAME, 600.0, reason="failover drill", origin=Origin.OPERATOR, forced=True
        )
        await until_state(second, BreakerState.OPEN, "the forced open to reach the worker")
        with pytest.raises(CircuitOpenError) as rejected:
            second.breaker().acquire()
        assert 590 < rejected.value.retry_after <= 600, "retry_after is the time left"
        change = second.heard[-1]
        assert (change.new_state, change.reason, change.origin) == (
            BreakerState.OPEN,
            "failover drill",
            Origin.OPERATOR,
        )
        assert change.payload()["reason"] == "failover drill", "the event carries the reason"
        assert second.breaker().snapshot().reason == "failover drill"

        assert not await second.fleet.publish_close(NAME), "a worker's close keeps a forced open"
        assert await second.fleet.client.pttl(fleet_keys(prefix, NAME).open) > 0

        await first.fleet.publish_close(NAME, reason="drill over", origin=Origin.OPERATOR)
        await until_state(second, BreakerState.CLOSED, "the operator's close to reach it")
        assert second.heard[-1].reason == "drill over"


async def test_with_valkey_down_breakers_fall_back_to_per_process_state(
    valkey_server: ValkeySettings, prefix: str
) -> None:
    """Valkey unreachable: each breaker still opens on its own failures and probes on its own;
    the fallback is logged once and the gauge reads 1; when Valkey is back, 0 again."""
    host, port = valkey_server.host_port
    buffer = MetricBuffer(1000)
    async with FaultProxy(host, port) as proxy:
        await proxy.cut()
        settings = valkey_server.model_copy(update={"address": proxy.address, "timeout": 0.5})
        with structlog.testing.capture_logs() as logs:
            async with running_worker(settings, prefix, "w0", meter_buffer=buffer) as worker:

                async def degraded() -> bool:
                    return worker.fleet.degraded

                await wait_until(degraded, within=DEADLINE, what="the fallback to be noticed")
                short = BreakerSettings(failure_threshold=2, open_seconds=0.2)
                breaker = worker.breaker(short)
                fail(breaker, 2)
                assert breaker.state is BreakerState.OPEN, "local state still opens the breaker"
                await until_state(worker, BreakerState.HALF_OPEN, "the local window to pass")
                assert await breaker.admit(probe_seconds=5.0), "the probe goes ahead locally"
                breaker.record_failure(probe=True)
                gauge = [
                    update.value
                    for update in buffer.retrieve_updates()
                    if update.metric.name == "onex_circuit_breaker_fleet_degraded"
                ]
                assert gauge[-1:] == [1], "the degraded gauge reads 1 while Valkey is away"

                proxy.restore()

                async def restored() -> bool:
                    return not worker.fleet.degraded

                await wait_until(restored, within=DEADLINE, what="Valkey to be used again")
                gauge = [
                    update.value
                    for update in buffer.retrieve_updates()
                    if update.metric.name == "onex_circuit_breaker_fleet_degraded"
                ]
                assert gauge[-1:] == [0], "the gauge reads 0 once Valkey is back"
    events = [entry["event"] for entry in logs]
    assert events.count("breaker_fleet_degraded") == 1, (
        f"the fallback must be logged once, not per call: {events}"
    )
    assert events.count("breaker_fleet_restored") == 1


class _Spy:
    """A coordinator that records what the breaker tells it."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def failed(self, breaker: CircuitBreaker) -> None:
        self.calls.append("failed")

    def recovered(self, breaker: CircuitBreaker) -> None:
        self.calls.append("recovered")

    async def admit_probe(self, breaker: CircuitBreaker, probe_seconds: float) -> None:
        self.calls.append("admit_probe")

    def probe_ended(self, breaker: CircuitBreaker) -> None:
        self.calls.append("probe_ended")


async def test_a_closed_breakers_successes_never_reach_the_coordinator() -> None:
    """The hot path stays free of I/O: successes while closed tell the fleet nothing; a
    failure, the success after it, and a probe's admission and end do."""
    spy = _Spy()
    clock = [0.0]
    breaker = CircuitBreaker("x", SETTINGS, clock=lambda: clock[0], coordinator=spy)

    async def ok() -> None:
        return None

    for _ in range(100):
        await breaker.call(ok)
        async with breaker.guard():
            pass
    assert spy.calls == [], "a closed breaker's success must not touch the coordinator"
    fail(breaker)
    breaker.record_success(breaker.acquire())
    assert spy.calls == ["failed", "recovered"]
    fail(breaker, SETTINGS.failure_threshold)
    clock[0] = SETTINGS.open_seconds + 1
    probe = await breaker.admit()
    breaker.record_success(probe)
    assert spy.calls[-2:] == ["admit_probe", "probe_ended"]
