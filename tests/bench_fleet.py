"""The fleet's breakers in figures: calls that reach a dead backend, and how fast an open spreads.

:func:`bench_fleet` (a section of ``make bench``) runs an outage twice, on a private
``valkey-server``: 4 worker processes each call a dead backend (a TCP server that counts every
connection and closes it at once) every few milliseconds for the whole outage, behind one
breaker each (threshold 3, short open window), first with their breakers shared through Valkey,
then per process. It reports the calls that reached the backend, in all and per open window
(arrivals grouped by the silences between them), and, for the shared run, how long one worker's
open took to reach the others (announcement to application, p50/p95; the processes share one
clock). Target: at most threshold + 1 calls per open window for the fleet.

A worker is this module run as ``python -m tests.bench_fleet --worker ...``; it prints one JSON
line and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

WORKERS = 4
THRESHOLD = 3
OPEN_SECONDS = 0.5
OUTAGE_SECONDS = 6.0
CALL_INTERVAL = 0.01
START_DELAY = 3.0  # seconds for the workers to start and subscribe before the outage


# -- one worker process ------------------------------------------------------------------------


async def _worker(args: argparse.Namespace) -> dict[str, object]:
    from activities.resilience.breaker import BreakerRegistry, CircuitOpenError
    from activities.resilience.fleet import FleetBreakers, OpenRecord
    from activities.settings import ValkeySettings
    from activities.valkey import connect_valkey
    from contracts.resilience import BreakerSettings

    registry = BreakerRegistry()
    breaker = registry.get(
        "http:dead-backend",
        BreakerSettings(failure_threshold=THRESHOLD, open_seconds=OPEN_SECONDS),
    )
    latencies: list[float] = []

    def heard(record: OpenRecord) -> None:
        if record.action == "open" and record.worker != args.worker_id:
            latencies.append(time.time() - record.sent_at)

    stop = asyncio.Event()
    service = None
    client = None
    if args.shared:
        client = await connect_valkey(ValkeySettings(address=args.valkey))
        fleet = FleetBreakers(
            client, registry, worker_id=args.worker_id, prefix=args.prefix, heard=heard
        )
        fleet.attach()
        service = asyncio.create_task(fleet.run(stop))
        await asyncio.wait_for(fleet.connected.wait(), 30)

    async def dead_call() -> None:
        reader, writer = await asyncio.open_connection("127.0.0.1", args.backend)
        try:
            if not await reader.read(1):
                raise ConnectionResetError("the backend closed the connection")
        finally:
            writer.close()

    await asyncio.sleep(max(0.0, args.start_at - time.time()))
    calls = rejected = failed = 0
    deadline = args.start_at + OUTAGE_SECONDS
    while time.time() < deadline:
        calls += 1
        try:
            await breaker.call(dead_call)
        except CircuitOpenError:
            rejected += 1
        except OSError:
            failed += 1
        await asyncio.sleep(CALL_INTERVAL)
    stop.set()
    if service is not None:
        await service
    if client is not None:
        await client.aclose()
    return {"calls": calls, "rejected": rejected, "failed": failed, "latencies": latencies}


# -- the benchmark -----------------------------------------------------------------------------


class _DeadBackend:
    """Accepts a connection, notes when, and closes it: every call through it fails."""

    def __init__(self) -> None:
        self.arrivals: list[float] = []
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._accepted, "127.0.0.1", 0)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.arrivals.append(time.time())
        writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()


def _windows(arrivals: list[float]) -> list[int]:
    """Arrivals grouped into open windows: a silence of half a window starts a new one."""
    counts: list[int] = []
    last = None
    for arrival in sorted(arrivals):
        if last is None or arrival - last > OPEN_SECONDS / 2:
            counts.append(0)
        counts[-1] += 1
        last = arrival
    return counts


def _percentile(samples: list[float], share: float) -> float:
    if not samples:
        return float("nan")
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(share * len(ordered)))]


async def _outage(valkey: str, *, shared: bool) -> tuple[dict[str, object], list[float]]:
    backend = _DeadBackend()
    port = await backend.start()
    prefix = f"onex:bench{uuid.uuid4().hex[:8]}:"
    start_at = time.time() + START_DELAY
    processes = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "tests.bench_fleet",
            "--worker-id",
            f"w{index}",
            "--valkey",
            valkey,
            "--backend",
            str(port),
            "--prefix",
            prefix,
            "--start-at",
            repr(start_at),
            *(["--shared"] if shared else []),
            stdout=asyncio.subprocess.PIPE,
            cwd=Path(__file__).resolve().parent.parent,
        )
        for index in range(WORKERS)
    ]
    reports = []
    try:
        for process in processes:
            stdout, _ = await asyncio.wait_for(process.communicate(), START_DELAY + 120)
            if process.returncode != 0:
                raise RuntimeError(f"a bench worker exited with {process.returncode}")
            reports.append(json.loads(stdout.decode().strip().splitlines()[-1]))
    finally:
        for process in processes:
            if process.returncode is None:
                process.kill()
        await backend.stop()
    windows = _windows(backend.arrivals)
    latencies = [sample for report in reports for sample in report["latencies"]]
    return (
        {
            "calls_reaching_backend": len(backend.arrivals),
            "calls_made": sum(report["calls"] for report in reports),
            "open_windows": len(windows),
            "first_window_calls": windows[0] if windows else 0,
            "max_calls_per_window": max(windows, default=0),
            "mean_calls_per_window": round(statistics.mean(windows), 2) if windows else 0,
        },
        latencies,
    )


async def bench_fleet() -> dict[str, object]:
    """The outage with shared breakers, then with per-process ones (see the module doc)."""
    from tests.conftest import isolated_settings
    from workers.devstack import DevStack, ServiceName

    settings = isolated_settings(Path(tempfile.mkdtemp(prefix="onex-bench-fleet-")))
    stack = DevStack(settings, services=[ServiceName.VALKEY])
    await stack.up()
    try:
        valkey = f"127.0.0.1:{settings.dev.valkey_port}"
        shared, latencies = await _outage(valkey, shared=True)
        per_process, _ = await _outage(valkey, shared=False)
    finally:
        stack.down(purge=True)
    return {
        "workers": WORKERS,
        "threshold": THRESHOLD,
        "open_seconds": OPEN_SECONDS,
        "outage_seconds": OUTAGE_SECONDS,
        "call_interval_ms": CALL_INTERVAL * 1000,
        "fleet_shared": shared,
        "per_process": per_process,
        "target_max_calls_per_window_fleet": THRESHOLD + 1,
        "open_propagation_ms": {
            "samples": len(latencies),
            "p50": round(_percentile(latencies, 0.5) * 1000, 2),
            "p95": round(_percentile(latencies, 0.95) * 1000, 2),
        },
    }


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker-id")
    parser.add_argument("--valkey")
    parser.add_argument("--backend", type=int)
    parser.add_argument("--prefix")
    parser.add_argument("--start-at", type=float)
    parser.add_argument("--shared", action="store_true")
    return parser.parse_args()


if __name__ == "__main__":
    arguments = _parse()
    if arguments.worker_id:
        with contextlib.suppress(KeyboardInterrupt):
            print(json.dumps(asyncio.run(_worker(arguments))))
    else:
        print(json.dumps(asyncio.run(bench_fleet()), indent=2))
