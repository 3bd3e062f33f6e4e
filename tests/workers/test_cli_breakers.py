"""``onex breakers list | open | close`` against a real Valkey and a live (in-process) worker:
the fleet view, forced opens rejected with the time left, and clear refusals (an unknown name,
a bad --for, Valkey down)."""

from __future__ import annotations

import asyncio
import json
import os
import sys
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from temporalio.exceptions import ApplicationError

from activities.resilience.boundary import ActivityBoundary
from activities.resilience.breaker import BreakerRegistry, BreakerState, Origin, StateChange
from activities.resilience.fleet import FleetBreakers
from activities.settings import ValkeySettings
from activities.valkey import connect_valkey
from contracts.errors import Transport
from contracts.resilience import default_policy
from tests.fakes.fault_proxy import FaultProxy
from tests.support import wait_until

ONEX = str(Path(sys.executable).parent / "onex")
NAME = "database:postgresql-primary"
DEADLINE = 15.0


@dataclass(frozen=True)
class Result:
    returncode: int
    stdout: str
    stderr: str


async def onex(env: dict[str, str], *args: str) -> Result:
    """Run the CLI without blocking the loop (the in-process worker keeps reporting)."""
    process = await asyncio.create_subprocess_exec(
        ONEX,
        *args,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    stdout, stderr = await asyncio.wait_for(process.communicate(), 120)
    return Result(process.returncode or 0, stdout.decode(), stderr.decode())


@dataclass
class LiveWorker:
    registry: BreakerRegistry
    heard: list[StateChange]
    env: dict[str, str]
    prefix: str


@pytest.fixture
async def live_worker(valkey_server: ValkeySettings) -> AsyncIterator[LiveWorker]:
    """A worker's breakers sharing state through Valkey under a prefix of their own, with
    one breaker used; and the environment that points the CLI at the same fleet."""
    prefix = f"onex:c{uuid.uuid4().hex[:10]}:"
    client = await connect_valkey(valkey_server)
    registry = BreakerRegistry()
    heard: list[StateChange] = []
    registry.add_listener(heard.append)
    registry.get(NAME, default_policy(Transport.DATABASE).circuit_breaker)
    fleet = FleetBreakers(client, registry, worker_id="worker-1", prefix=prefix)
    fleet.attach()
    stop = asyncio.Event()
    task = asyncio.create_task(fleet.run(stop))

    async def reported() -> bool:
        return await client.get(f"{prefix}breakers:worker:worker-1") is not None

    await wait_until(reported, within=DEADLINE, what="the worker's first report")
    env = {
        "ONEX_VALKEY__ADDRESS": valkey_server.address or "",
        "ONEX_VALKEY__KEY_PREFIX": prefix,
    }
    try:
        yield LiveWorker(registry, heard, env, prefix)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await client.aclose()


async def test_list_shows_each_workers_breakers(live_worker: LiveWorker) -> None:
    """The fleet view names the worker and its breaker with its state."""
    listed = await onex(live_worker.env, "breakers", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    view = json.loads(listed.stdout)
    rows = [(w["worker"], b["name"], b["state"]) for w in view["workers"] for b in w["breakers"]]
    assert ("worker-1", NAME, "closed") in rows, f"the live worker's breaker is missing: {view}"


async def test_a_forced_open_is_rejected_with_the_time_left_then_closed(
    live_worker: LiveWorker,
) -> None:
    """`open --for 10m --reason` makes the worker reject at once, its activity boundary telling
    Temporal to come back when the time is up; the event carries the reason; `close` ends it."""
    forced = await onex(
        live_worker.env, "breakers", "open", NAME, "--for", "10m", "--reason", "failover drill"
    )
    assert forced.returncode == 0, forced.stderr
    breaker = live_worker.registry.get(NAME, default_policy(Transport.DATABASE).circuit_breaker)

    async def opened() -> bool:
        return breaker.state is BreakerState.OPEN

    await wait_until(opened, within=DEADLINE, what="the forced open to reach the worker")
    change = live_worker.heard[-1]
    assert (change.reason, change.origin) == ("failover drill", Origin.OPERATOR)

    boundary = ActivityBoundary(
        transport=Transport.DATABASE,
        target="postgresql-primary",
        policy=default_policy(Transport.DATABASE),
        breakers=live_worker.registry,
    )
    calls = 0

    async def upsert(argument: str) -> str:
        nonlocal calls
        calls += 1
        return argument

    with pytest.raises(ApplicationError) as rejected:
        await boundary.wrap("upsert_node", upsert)("node-1")
    assert calls == 0, "a forced-open breaker must reject before the call"
    delay = rejected.value.next_retry_delay
    assert delay is not None, "the rejection must tell Temporal when to come back"
    assert 580 < delay.total_seconds() <= 600, "next_retry_delay is the time left (10m)"

    listed = json.loads((await onex(live_worker.env, "breakers", "list", "--json")).stdout)
    assert [(o["name"], o["forced"], o["reason"]) for o in listed["opens"]] == [
        (NAME, True, "failover drill")
    ]

    closed = await onex(live_worker.env, "breakers", "close", NAME)
    assert closed.returncode == 0, closed.stderr

    async def closed_again() -> bool:
        return breaker.state is BreakerState.CLOSED

    await wait_until(closed_again, within=DEADLINE, what="the close to reach the worker")


async def test_an_unknown_name_is_refused_naming_the_known_ones(live_worker: LiveWorker) -> None:
    """A typo exits 5 and lists the breakers the fleet knows."""
    refused = await onex(
        live_worker.env, "breakers", "open", "database:typo", "--for", "1m", "--reason", "x"
    )
    assert refused.returncode == 5, refused.stderr
    assert "no breaker named 'database:typo'" in refused.stderr
    assert NAME in refused.stderr, "the message should list the known breakers"


@pytest.mark.parametrize("bad", ["10", "ten minutes", "0m", "25h", "-5s", "1.5m"])
async def test_a_bad_duration_is_refused_with_the_accepted_format(bad: str) -> None:
    """--for must be a whole number and a unit; anything else exits 2 with the format."""
    refused = await onex({}, "breakers", "open", NAME, "--for", bad, "--reason", "x")
    assert refused.returncode == 2, refused.stderr
    assert "expected a whole number and a unit" in refused.stderr
    assert "10m" in refused.stderr, "the message should give an example of the format"


async def test_forcing_open_with_valkey_down_is_refused_saying_why(
    valkey_server: ValkeySettings,
) -> None:
    """With Valkey unreachable nothing can reach the workers: exit 6, and the message says
    so and that nothing changed."""
    host, port = valkey_server.host_port
    async with FaultProxy(host, port) as proxy:
        await proxy.cut()
        env = {"ONEX_VALKEY__ADDRESS": proxy.address, "ONEX_VALKEY__TIMEOUT": "1"}
        refused = await onex(env, "breakers", "open", NAME, "--for", "10m", "--reason", "x")
    assert refused.returncode == 6, refused.stderr
    assert "did not answer" in refused.stderr
    assert "nothing was changed" in refused.stderr


async def test_the_commands_need_valkey_configured() -> None:
    """Without ONEX_VALKEY__ADDRESS the commands exit 2 naming the variable."""
    refused = await onex({}, "breakers", "list")
    assert refused.returncode == 2, refused.stderr
    assert "Valkey is not configured: set ONEX_VALKEY__ADDRESS" in refused.stderr
