"""Performance figures, measured against baselines run side by side in the same process.

``make bench`` prints one JSON object (and each section's duration on standard error). Figures
are ratios against a baseline measured in the same run and interleaved with ours (alternating
rounds, medians), so a noisy shared machine moves both sides alike. Nothing here asserts a
figure: each section prints its targets beside its figures, for people to read.

* ``breaker``: per-call overhead of a closed circuit breaker with its failure-rate window on,
  against ``aiobreaker`` and ``circuitbreaker`` guarding the same no-op coroutine.
  Target: ours <= 0.5x aiobreaker's overhead.
* ``encryption``: the cost of the payload codec, side by side: encode + decode of a
  register_node operation input through the plaintext converter and through the encrypting one
  (alternating rounds, medians), per payload, and per operation: times the number of payloads a
  register_node history carries (counted in the committed golden history).
* ``register_node``: register_node on a private embedded stack (real PostgreSQL and Kafka;
  Consul disabled, so its step is skipped) against two baselines on the same server and worker
  process: the *floor*, a hand-written unsandboxed workflow running the same two activities in
  one parallel round with no events; and the *bare* workflow with no-op activities in the old
  4-round shape (1, 2 in parallel, 2), kept for comparison with earlier runs. p50/p95 at
  concurrency 1 (ours and floor), throughput and latency at concurrency 12 (all three), and
  ours' client-observed duration against the server's (history timestamps).
  Targets: p50 <= 1.3x floor, throughput >= 0.7x floor, client/server <= 1.15; against bare,
  throughput >= 0.85x, p50 <= 1.2x.
* ``worker``: ``onex worker`` as its own process: exec to its first poll, resident memory idle
  and while serving register_node at concurrency 12.
* ``outbox_relay``: the relay against the stack's PostgreSQL and Kafka: events/s draining
  10,000 rows, and commit -> acknowledged publish p50/p95 woken by LISTEN/NOTIFY.
  Targets: >= 2,000 events/s, p50 <= 20 ms.

The stack is started once (by the first section that needs it) and removed at the end. Another
section is a function returning its figures, added to :data:`SECTIONS` (a module of its own is
fine: import it here).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

import aiobreaker
import asyncpg
import circuitbreaker
from temporalio import workflow
from temporalio.client import Client
from temporalio.converter import DataConverter
from temporalio.worker import Worker

from activities.kafka import EventPublisher
from activities.outbox import OutboxRelay, enqueue
from activities.resilience.breaker import BreakerRegistry, CircuitBreaker
from contracts.events import EventEnvelope, new_envelope
from contracts.node import node_workflow_id
from contracts.resilience import BreakerSettings
from contracts.topics import TopicName
from tests.bench_fleet import bench_fleet
from tests.bench_heartbeats import bench_heartbeats
from tests.builders import register_request
from tests.conftest import isolated_settings
from tests.sample_workflows import BareShapeWorkflow, bare_noop
from workers.client import Operations, connect, register_node
from workers.devstack import DevStack
from workers.host import WorkerHost
from workers.logging import configure_logging
from workers.settings import OnexSettings, WorkerSettings
from workflows import WORKFLOWS

CALLS_PER_ROUND = 20_000
ROUNDS = 15


async def _noop() -> None:
    return None


async def _time_calls(call: Callable[[], Awaitable[object]], calls: int) -> float:
    started = time.perf_counter_ns()
    for _ in range(calls):
        await call()
    return (time.perf_counter_ns() - started) / calls


async def _side_by_side(
    variants: dict[str, Callable[[], Awaitable[object]]], *, warm_up: int, calls: int
) -> dict[str, list[float]]:
    """Per-call seconds of each variant, ROUNDS times, in alternating order (so drift on a
    shared machine falls on every variant alike), after a warm-up."""
    for call in variants.values():
        await _time_calls(call, warm_up)
    per_call: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(ROUNDS):
        names = list(variants)
        if round_index % 2:
            names.reverse()
        for name in names:
            per_call[name].append(await _time_calls(variants[name], calls))
    return per_call


async def bench_breaker() -> dict[str, object]:
    ours = CircuitBreaker(
        "bench",
        BreakerSettings(failure_threshold=5, failure_rate_threshold=0.5, window_size=100),
    )
    theirs_aio = aiobreaker.CircuitBreaker(fail_max=5, timeout_duration=timedelta(seconds=60))
    theirs_cb = circuitbreaker.CircuitBreaker(failure_threshold=5, recovery_timeout=60)
    guarded_cb = theirs_cb(_noop)

    variants: dict[str, Callable[[], Awaitable[object]]] = {
        "bare": _noop,
        "ours": lambda: ours.call(_noop),
        "aiobreaker": lambda: theirs_aio.call_async(_noop),
        "circuitbreaker": guarded_cb,
    }
    per_call = await _side_by_side(variants, warm_up=2_000, calls=CALLS_PER_ROUND)

    bare = statistics.median(per_call["bare"])
    overhead = {
        name: max(statistics.median(samples) - bare, 0.0)
        for name, samples in per_call.items()
        if name != "bare"
    }
    return {
        "calls_per_round": CALLS_PER_ROUND,
        "rounds": ROUNDS,
        "bare_call_ns": round(bare, 1),
        "overhead_ns": {name: round(value, 1) for name, value in overhead.items()},
        "ratio_vs_aiobreaker": round(overhead["ours"] / overhead["aiobreaker"], 3),
        "ratio_vs_circuitbreaker": round(overhead["ours"] / overhead["circuitbreaker"], 3),
        "target_ratio_vs_aiobreaker": 0.5,
    }


# -- the payload codec: the same conversion with and without encryption ----------------------

CODEC_CALLS_PER_ROUND = 2_000


def _payloads_per_operation() -> int:
    """Payloads (inputs, results, failures, memo) in the golden register_node history."""
    history = (Path(__file__).parent / "histories" / "register_success.json").read_text()
    return history.count('"metadata"')


async def bench_encryption() -> dict[str, object]:
    from contracts.operations_io import OperationInput
    from tests.workflows.scenarios import CORRELATION_ID, plan, request
    from workers.codec import PayloadKey, PayloadKeyring
    from workers.converter import DATA_CONVERTER, encrypted_converter

    value = OperationInput(
        plan=plan(), request=request().model_dump(mode="json"), correlation_id=CORRELATION_ID
    )
    converters = {
        "plaintext": DATA_CONVERTER,
        "encrypted": encrypted_converter(PayloadKeyring((PayloadKey.generate("bench"),))),
    }

    def round_trip(converter: DataConverter) -> Callable[[], Awaitable[object]]:
        async def call() -> object:
            return await converter.decode(await converter.encode([value]), [OperationInput])

        return call

    variants = {name: round_trip(converter) for name, converter in converters.items()}
    per_call = await _side_by_side(variants, warm_up=200, calls=CODEC_CALLS_PER_ROUND)
    plaintext = statistics.median(per_call["plaintext"])
    encrypted = statistics.median(per_call["encrypted"])
    overhead = max(encrypted - plaintext, 0.0)
    payloads = _payloads_per_operation()
    size = len((await converters["plaintext"].encode([value]))[0].data)
    return {
        "payload_bytes": size,
        "calls_per_round": CODEC_CALLS_PER_ROUND,
        "rounds": ROUNDS,
        "round_trip_us": {
            "plaintext": round(plaintext / 1000, 2),
            "encrypted": round(encrypted / 1000, 2),
        },
        "overhead_per_payload_us": round(overhead / 1000, 2),
        "payloads_per_register_node": payloads,
        "overhead_per_operation_us": round(overhead * payloads / 1000, 1),
        "ratio": round(encrypted / plaintext, 3),
    }


# -- the embedded stack the register_node, worker and relay sections share ------------------


class _BenchStack:
    """One private embedded stack (Temporal, PostgreSQL, Kafka) for the sections that need one,
    started on first use and removed when ``main`` ends."""

    def __init__(self) -> None:
        self._state: tempfile.TemporaryDirectory[str] | None = None
        self._dev: DevStack | None = None
        self.settings: OnexSettings | None = None

    async def up(self) -> OnexSettings:
        if self.settings is None:
            self._state = tempfile.TemporaryDirectory(prefix="onex-bench-")
            settings = isolated_settings(Path(self._state.name))
            settings = settings.model_copy(
                update={"worker": WorkerSettings(task_queue="bench-onex")}
            )
            self._dev = DevStack(settings)
            await self._dev.up()
            self.settings = settings
        return self.settings

    def down(self) -> None:
        if self._dev is not None:
            self._dev.down(purge=True)
        if self._state is not None:
            self._state.cleanup()
        self._dev = self._state = self.settings = None


STACK = _BenchStack()


# -- register_node against the floor and against a bare workflow of the same shape ----------


@workflow.defn(name="BenchFloorWorkflow", sandboxed=False)
class FloorWorkflow:
    """The floor: register_node's effects written by hand, as a user would without us.

    The same two activities (Consul's registration, PostgreSQL's upsert, served by the same
    worker) in one parallel round; no events, no saga, no per-node queue, no sandbox.
    """

    @workflow.run
    async def run(self, request: dict[str, Any], activity_queue: str) -> list[dict[str, Any]]:
        options: dict[str, Any] = {
            "task_queue": activity_queue,
            "start_to_close_timeout": timedelta(seconds=30),
            "result_type": dict,
        }
        return list(
            await asyncio.gather(
                workflow.execute_activity("consul.register_service", request, **options),
                workflow.execute_activity("postgres.upsert_node", request, **options),
            )
        )


WORKFLOWS_PER_ROUND = 60
CONCURRENCY = 12
OPERATION_ROUNDS = 3
SEQUENTIAL_CALLS = 20  # per round at concurrency 1
SEQUENTIAL_ROUNDS = 3

Start = Callable[[], Awaitable[object]]


async def _round(start_one: Start) -> tuple[float, list[float]]:
    """Run WORKFLOWS_PER_ROUND workflows, CONCURRENCY at a time: (throughput, latencies)."""
    semaphore = asyncio.Semaphore(CONCURRENCY)
    latencies: list[float] = []

    async def one() -> None:
        async with semaphore:
            began = time.perf_counter()
            await start_one()
            latencies.append(time.perf_counter() - began)

    began = time.perf_counter()
    await asyncio.gather(*(one() for _ in range(WORKFLOWS_PER_ROUND)))
    return WORKFLOWS_PER_ROUND / (time.perf_counter() - began), latencies


async def _sequential(start_one: Start) -> tuple[float, list[float]]:
    """SEQUENTIAL_CALLS workflows one after the other: (throughput, latencies)."""
    latencies = []
    for _ in range(SEQUENTIAL_CALLS):
        began = time.perf_counter()
        await start_one()
        latencies.append(time.perf_counter() - began)
    return len(latencies) / sum(latencies), latencies


async def _alternating(
    variants: dict[str, Start], run_round: Callable[[Start], Awaitable[tuple[float, list[float]]]]
) -> dict[str, tuple[list[float], list[float]]]:
    """Rounds of each variant in alternating order: (per-round throughputs, all latencies)."""
    results: dict[str, tuple[list[float], list[float]]] = {name: ([], []) for name in variants}
    rounds = SEQUENTIAL_ROUNDS if run_round is _sequential else OPERATION_ROUNDS
    for index in range(rounds):
        names = list(variants) if index % 2 == 0 else list(reversed(variants))
        for name in names:
            throughput, latencies = await run_round(variants[name])
            results[name][0].append(throughput)
            results[name][1].extend(latencies)
    return results


def _percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def _summary(throughputs: list[float], latencies: list[float]) -> dict[str, float]:
    return {
        "throughput_per_s": round(statistics.median(throughputs), 2),
        "p50_ms": _ms(_percentile(latencies, 0.5)),
        "p95_ms": _ms(_percentile(latencies, 0.95)),
    }


def _ratio(ours: float, theirs: float) -> float:
    return round(ours / theirs, 3) if theirs else float("nan")


async def _server_seconds(client: Client, workflow_id: str, *, until_update: bool) -> float:
    """Start to close from the history's timestamps (``until_update``: to the Update's end,
    for the node workflow, which stays open after answering)."""
    history = await client.get_workflow_handle(workflow_id).fetch_history()
    first = history.events[0].event_time.ToDatetime()
    for event in history.events:
        if until_update and event.HasField("workflow_execution_update_completed_event_attributes"):
            return (event.event_time.ToDatetime() - first).total_seconds()
    return (history.events[-1].event_time.ToDatetime() - first).total_seconds()


async def bench_register_node() -> dict[str, object]:
    """register_node against the floor (c=1 and c=12) and the bare same-shape workflow (c=12),
    all on one server and one worker process, in alternating rounds."""
    settings = await STACK.up()
    configure_logging("error")
    client = await connect(settings)
    host = WorkerHost(settings, client, workflows=WORKFLOWS)
    await host.start()
    stop = asyncio.Event()
    serving = asyncio.create_task(host.run(stop))
    operations = Operations.load(settings)
    queue = settings.worker.task_queue
    served: list[tuple[float, str, str]] = []  # (client seconds, node workflow, operation)
    floors: list[tuple[float, str]] = []
    try:
        async with (
            Worker(
                client,
                task_queue="bench-bare",
                workflows=[BareShapeWorkflow],
                activities=[bare_noop],
            ),
            Worker(client, task_queue="bench-floor", workflows=[FloorWorkflow]),
        ):

            async def ours() -> object:
                request = register_request()
                began = time.perf_counter()
                result = await register_node(
                    client, request, settings=settings, operations=operations
                )
                elapsed = time.perf_counter() - began
                served.append((elapsed, node_workflow_id(request.node_id), result.workflow_id))
                return result

            async def floor() -> object:
                workflow_id = f"bench-floor-{uuid.uuid4()}"
                began = time.perf_counter()
                result = await client.execute_workflow(
                    FloorWorkflow.run,
                    args=[register_request().model_dump(mode="json"), queue],
                    id=workflow_id,
                    task_queue="bench-floor",
                )
                floors.append((time.perf_counter() - began, workflow_id))
                return result

            async def bare() -> object:
                return await client.execute_workflow(
                    BareShapeWorkflow.run,
                    register_request().model_dump(mode="json"),
                    id=f"bench-bare-{uuid.uuid4()}",
                    task_queue="bench-bare",
                )

            for warm_up in (ours, floor, bare):  # connections, caches, the sandbox's imports
                await _round(warm_up)
            served.clear()
            floors.clear()
            single = await _alternating({"ours": ours, "floor": floor}, _sequential)
            sampled, floor_sampled = list(served), list(floors)
            loaded = await _alternating({"ours": ours, "floor": floor, "bare": bare}, _round)
            node_server = [
                await _server_seconds(client, node, until_update=True) for _, node, _ in sampled
            ]
            operation_server = [
                await _server_seconds(client, op, until_update=False) for _, _, op in sampled
            ]
            floor_server = [
                await _server_seconds(client, wf, until_update=False) for _, wf in floor_sampled
            ]
    finally:
        stop.set()
        await serving

    c1 = {name: _summary(*single[name]) for name in single}
    c12 = {name: _summary(*loaded[name]) for name in loaded}
    client_p50 = statistics.median(seconds for seconds, _, _ in sampled)
    server_p50 = statistics.median(node_server)
    return {
        "shape": "ours: register_node (node workflow, operation workflow, events); floor: the "
        "same 2 activities in one parallel round, unsandboxed, no events; bare: 5 no-op "
        "activities in ours' old shape (1, 2 in parallel, 2)",
        "concurrency_1": {
            "calls_per_round": SEQUENTIAL_CALLS,
            "rounds": SEQUENTIAL_ROUNDS,
            **c1,
            "p50_ratio_vs_floor": _ratio(c1["ours"]["p50_ms"], c1["floor"]["p50_ms"]),
            "p95_ratio_vs_floor": _ratio(c1["ours"]["p95_ms"], c1["floor"]["p95_ms"]),
        },
        "concurrency_12": {
            "workflows_per_round": WORKFLOWS_PER_ROUND,
            "rounds": OPERATION_ROUNDS,
            **c12,
            "throughput_ratio_vs_floor": _ratio(
                c12["ours"]["throughput_per_s"], c12["floor"]["throughput_per_s"]
            ),
            "throughput_ratio": _ratio(
                c12["ours"]["throughput_per_s"], c12["bare"]["throughput_per_s"]
            ),
            "p50_ratio": _ratio(c12["ours"]["p50_ms"], c12["bare"]["p50_ms"]),
            "p95_ratio": _ratio(c12["ours"]["p95_ms"], c12["bare"]["p95_ms"]),
        },
        "client_vs_server": {
            "client_p50_ms": _ms(client_p50),
            "server_p50_ms": _ms(server_p50),
            "server_is": "node workflow start to its submit Update's completion (history)",
            "operation_workflow_p50_ms": _ms(statistics.median(operation_server)),
            "floor_client_p50_ms": _ms(statistics.median(s for s, _ in floor_sampled)),
            "floor_server_p50_ms": _ms(statistics.median(floor_server)),
            "ratio": _ratio(client_p50, server_p50),
        },
        "targets": {
            "p50_ratio_vs_floor": "<= 1.3",
            "throughput_ratio_vs_floor": ">= 0.7",
            "client_vs_server.ratio": "<= 1.15",
            "throughput_ratio (vs bare)": ">= 0.85",
            "p50_ratio (vs bare)": "<= 1.2",
        },
    }


# -- the worker process: start-up to its first poll, resident memory under load -------------

WORKER_QUEUE = "bench-worker"
STARTUP_DEADLINE = 120.0


def _rss_kib(pid: int, field: str = "VmRSS") -> int:
    """A process's resident memory (``VmHWM``: its peak), from /proc."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    return 0


def _worker_environment(settings: OnexSettings) -> dict[str, str]:
    return {
        **{key: value for key, value in os.environ.items() if not key.startswith("ONEX_")},
        "ONEX_DEV__STATE_DIR": str(settings.dev.state_dir),
        "ONEX_TEMPORAL__PORT": str(settings.temporal.port),
        "ONEX_POSTGRES__PORT": str(settings.postgres.port),
        "ONEX_KAFKA__BOOTSTRAP_SERVERS": settings.kafka.bootstrap_servers,
        "ONEX_WORKER__TASK_QUEUE": WORKER_QUEUE,
        "ONEX_WORKER__GRACEFUL_SHUTDOWN_TIMEOUT": "5",
    }


async def _first_poll(stderr: asyncio.StreamReader) -> bool:
    """Read the worker's log lines until it says it polls (``worker_started``)."""
    while line := await stderr.readline():
        if b"worker_started" in line:
            return True
    return False


async def bench_worker() -> dict[str, object]:
    """``onex worker`` as a process of its own: from exec to its first poll, then its memory
    idle and while it serves register_node at concurrency 12."""
    settings = await STACK.up()
    onex = Path(sys.executable).parent / "onex"
    began = time.perf_counter()
    process = await asyncio.create_subprocess_exec(
        str(onex),
        "worker",
        env=_worker_environment(settings),
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stderr is not None
    try:
        polling = await asyncio.wait_for(_first_poll(process.stderr), STARTUP_DEADLINE)
        startup = time.perf_counter() - began
        drain = asyncio.create_task(_discard(process.stderr))
        if not polling:
            return {"error": f"the worker exited ({await process.wait()}) before polling"}
        idle = _rss_kib(process.pid)
        client = await connect(settings)
        queue_settings = settings.model_copy(
            update={"worker": WorkerSettings(task_queue=WORKER_QUEUE)}
        )
        operations = Operations.load(settings)
        samples: list[int] = []

        async def sample(done: asyncio.Event) -> None:
            while not done.is_set():
                samples.append(_rss_kib(process.pid))
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), 0.1)

        async def ours() -> object:
            return await register_node(
                client, register_request(), settings=queue_settings, operations=operations
            )

        done = asyncio.Event()
        sampler = asyncio.create_task(sample(done))
        throughputs = [(await _round(ours))[0] for _ in range(2)]
        done.set()
        await sampler
        peak = _rss_kib(process.pid, "VmHWM")
    finally:
        if process.returncode is None:
            process.send_signal(signal.SIGTERM)
            await process.wait()
    drain.cancel()
    return {
        "startup_to_first_poll_s": round(startup, 2),
        "rss_idle_mib": round(idle / 1024, 1),
        "rss_under_load_p50_mib": round(statistics.median(samples) / 1024, 1),
        "rss_peak_mib": round(peak / 1024, 1),
        "load": f"register_node, {CONCURRENCY} at a time, 2 rounds of {WORKFLOWS_PER_ROUND}",
        "throughput_per_s": round(statistics.median(throughputs), 2),
    }


async def _discard(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


# -- the outbox relay: draining a backlog, and commit -> publish on LISTEN/NOTIFY -----------

BACKLOG = 10_000
NOTIFY_SAMPLES = 200


class _TimedPublisher:
    """The real publisher, noting when each event's publish was acknowledged."""

    def __init__(self, publisher: EventPublisher) -> None:
        self.publisher = publisher
        self.acked: dict[str, float] = {}
        self.arrived = asyncio.Event()

    async def publish(
        self, topic: str, value: bytes, *, key: bytes | None, headers: list[tuple[str, bytes]]
    ) -> Any:
        record = await self.publisher.publish(topic, value, key=key, headers=headers)
        self.acked[dict(headers)["event_id"].decode()] = time.perf_counter()
        self.arrived.set()
        return record


def _event(index: int) -> EventEnvelope:
    node_id = str(uuid.uuid4())
    return new_envelope(
        TopicName.REGISTRY_WORKFLOW_STARTED,
        {"node_id": node_id, "workflow_id": f"bench-{index}", "operation": "register_node"},
        correlation_id=uuid.uuid4(),
    )


async def bench_outbox_relay() -> dict[str, object]:
    """The relay the worker runs, against the stack's PostgreSQL and Kafka: events/s draining
    a backlog of BACKLOG rows, then commit -> acknowledged publish, one event at a time, woken
    by NOTIFY (the fallback poll is set far away, so only a notification wakes it)."""
    settings = await STACK.up()
    postgres = settings.postgres
    pool = await asyncpg.create_pool(postgres.dsn, min_size=2, max_size=4)
    publisher = _TimedPublisher(EventPublisher(settings.kafka, BreakerRegistry()))
    await publisher.publisher.start()
    try:
        relay = OutboxRelay(pool, publisher)
        await relay.drain()  # whatever the earlier sections left
        async with pool.acquire() as connection, connection.transaction():
            for index in range(BACKLOG):
                await enqueue(connection, _event(index))
        began = time.perf_counter()
        published = 0
        while published < BACKLOG:
            drained = await relay.drain()
            if not drained:
                break
            published += drained
        drain_seconds = time.perf_counter() - began

        listening = OutboxRelay(
            pool,
            publisher,
            listen_connect=lambda: asyncpg.connect(postgres.dsn),
            poll_interval=3600.0,
        )
        stop = asyncio.Event()
        running = asyncio.create_task(listening.run(stop))
        await asyncio.sleep(0.5)  # its first drain and LISTEN (a bench, not a test)
        latencies = []
        for index in range(NOTIFY_SAMPLES):
            envelope = _event(index)
            async with pool.acquire() as connection:
                await enqueue(connection, envelope)  # autocommit: committed on return
            committed = time.perf_counter()
            while str(envelope.event_id) not in publisher.acked:
                publisher.arrived.clear()
                await asyncio.wait_for(publisher.arrived.wait(), 30)
            latencies.append(publisher.acked[str(envelope.event_id)] - committed)
        stop.set()
        await running
    finally:
        await publisher.publisher.stop()
        await pool.close()
    return {
        "backlog_rows": BACKLOG,
        "drained": published,
        "batch_size": relay.batch_size,
        "events_per_s": round(published / drain_seconds),
        "commit_to_publish_samples": NOTIFY_SAMPLES,
        "commit_to_publish_p50_ms": _ms(_percentile(latencies, 0.5)),
        "commit_to_publish_p95_ms": _ms(_percentile(latencies, 0.95)),
        "targets": {"events_per_s": ">= 2000", "commit_to_publish_p50_ms": "<= 20"},
    }


# -- the sections, in order (each returns its figures; add a section by adding it here) -----

SECTIONS: dict[str, Callable[[], Awaitable[dict[str, object]]]] = {
    "breaker": bench_breaker,
    "encryption": bench_encryption,
    "register_node": bench_register_node,
    "worker": bench_worker,
    "outbox_relay": bench_outbox_relay,
    "heartbeats": bench_heartbeats,
    "fleet": bench_fleet,
}


async def main() -> dict[str, object]:
    figures: dict[str, object] = {
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
    }
    try:
        for name, section in SECTIONS.items():
            began = time.perf_counter()
            figures[name] = await section()
            print(f"bench: {name} took {time.perf_counter() - began:.0f} s", file=sys.stderr)
    finally:
        STACK.down()
    return figures


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main()), indent=2))
