"""The worker host shares its breakers through Valkey when ONEX_VALKEY__ADDRESS is set: two
hosts, one open, both rejecting."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from temporalio.testing import WorkflowEnvironment

from activities.resilience.breaker import BreakerState, CircuitOpenError
from activities.settings import ValkeySettings
from contracts.resilience import BreakerSettings
from tests.support import wait_until
from tests.workers.test_host import NAMESPACES, write_contract
from workers.host import WorkerHost
from workers.settings import OnexSettings, WorkerSettings

NAME = "http:echo"
SETTINGS = BreakerSettings(failure_threshold=2, open_seconds=60.0)


@contextlib.asynccontextmanager
async def serving_host(
    temporal_env: WorkflowEnvironment, settings: OnexSettings
) -> AsyncIterator[WorkerHost]:
    host = WorkerHost(settings, temporal_env.client)
    await host.start()
    stop = asyncio.Event()
    serving = asyncio.create_task(host.run(stop))
    try:
        yield host
    finally:
        stop.set()
        await asyncio.wait_for(serving, 60)


async def test_hosts_with_valkey_share_their_breakers(
    temporal_env: WorkflowEnvironment, valkey_server: ValkeySettings, tmp_path: Path
) -> None:
    """Each host runs the fleet service (reported at start); a breaker that opens in one host
    rejects in the other, which never saw a failure."""
    contracts = tmp_path / "contracts"
    write_contract(contracts, "echo", "tests.plugins.echo:EchoHandler", "echo")
    valkey = valkey_server.model_copy(update={"key_prefix": f"onex:h{uuid.uuid4().hex[:8]}:"})

    def settings(identity: str) -> OnexSettings:
        return OnexSettings(
            valkey=valkey,
            worker=WorkerSettings(
                task_queue=f"tq-{uuid.uuid4()}",
                identity=identity,
                contract_paths=[contracts],
                allowed_namespaces=NAMESPACES,
                graceful_shutdown_timeout=10,
            ),
        )

    async with (
        serving_host(temporal_env, settings("host-1")) as first,
        serving_host(temporal_env, settings("host-2")) as second,
    ):
        assert "breaker fleet state (valkey)" in first.report.services
        for host in (first, second):
            await asyncio.wait_for(host.fleet.connected.wait(), 15)
        other = second.breakers.get(NAME, SETTINGS)
        breaker = first.breakers.get(NAME, SETTINGS)
        for _ in range(SETTINGS.failure_threshold):
            breaker.record_failure(breaker.acquire())

        async def rejected_there() -> bool:
            return other.state is BreakerState.OPEN

        await wait_until(rejected_there, within=15, what="the open to reach the second host")
        with pytest.raises(CircuitOpenError) as rejection:
            other.acquire()
        assert rejection.value.retry_after > 1.0, "the second host waits out the fleet's window"
