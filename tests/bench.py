"""Performance figures, measured against baselines run side by side in the same process.

``make bench`` prints one JSON object. Figures are ratios against a baseline measured in the same
run and interleaved with ours (alternating rounds, medians), so a noisy shared machine moves both
sides alike. Nothing here asserts a figure: targets are read by people, in the issue notes.

* ``breaker``: per-call overhead of a closed circuit breaker with its failure-rate window on,
  against ``aiobreaker`` and ``circuitbreaker`` guarding the same no-op coroutine.
  Target: ours <= 0.5x aiobreaker's overhead.
* ``register_node``: throughput and p50/p95 latency of register_node on a private embedded
  stack (real PostgreSQL and Kafka; Consul disabled, so its step is skipped), against a bare
  Temporal workflow with the same activity shape (5 no-op activities: 1, 2 in parallel, 2),
  in alternating rounds on the same server and worker process.
  Targets: throughput >= 0.85x bare, p50 latency <= 1.2x bare.
* ``encryption``: the cost of the payload codec, side by side: encode + decode of a
  register_node operation input through the plaintext converter and through the encrypting one
  (alternating rounds, medians), per payload, and per operation: times the number of payloads a
  register_node history carries (counted in the committed golden history).
"""

from __future__ import annotations

import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import timedelta
from pathlib import Path

import aiobreaker
import circuitbreaker
from temporalio.converter import DataConverter
from temporalio.worker import Worker

from activities.resilience.breaker import CircuitBreaker
from contracts.resilience import BreakerSettings
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


# -- register_node against a bare workflow of the same shape -------------------------------


WORKFLOWS_PER_ROUND = 60
CONCURRENCY = 12
OPERATION_ROUNDS = 3


async def _round(start_one: Callable[[], Awaitable[object]]) -> tuple[float, list[float]]:
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


def _percentile(samples: list[float], fraction: float) -> float:
    ordered = sorted(samples)
    return ordered[min(len(ordered) - 1, int(fraction * len(ordered)))]


async def bench_register_node() -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="onex-bench-") as state:
        settings = isolated_settings(Path(state))
        settings = settings.model_copy(update={"worker": WorkerSettings(task_queue="bench-onex")})
        stack = DevStack(settings)
        await stack.up()
        try:
            return await _measure(settings)
        finally:
            stack.down(purge=True)


async def _measure(settings: OnexSettings) -> dict[str, object]:
    configure_logging("error")
    client = await connect(settings)
    host = WorkerHost(settings, client, workflows=WORKFLOWS)
    await host.start()
    stop = asyncio.Event()
    serving = asyncio.create_task(host.run(stop))
    operations = Operations.load(settings)
    try:
        async with Worker(
            client, task_queue="bench-bare", workflows=[BareShapeWorkflow], activities=[bare_noop]
        ):

            async def ours() -> object:
                return await register_node(
                    client, register_request(), settings=settings, operations=operations
                )

            async def bare() -> object:
                payload = register_request().model_dump(mode="json")
                return await client.execute_workflow(
                    BareShapeWorkflow.run,
                    payload,
                    id=f"bench-bare-{uuid.uuid4()}",
                    task_queue="bench-bare",
                )

            await _round(ours)  # warm-up: connections, caches, the sandbox's imports
            await _round(bare)
            results: dict[str, list[tuple[float, list[float]]]] = {"ours": [], "bare": []}
            for index in range(OPERATION_ROUNDS):
                order = [("ours", ours), ("bare", bare)]
                for name, start_one in order if index % 2 == 0 else reversed(order):
                    results[name].append(await _round(start_one))
    finally:
        stop.set()
        await serving

    def summary(name: str) -> dict[str, float]:
        throughput = statistics.median(round_[0] for round_ in results[name])
        latencies = [sample for round_ in results[name] for sample in round_[1]]
        return {
            "throughput_per_s": round(throughput, 2),
            "p50_ms": round(_percentile(latencies, 0.5) * 1000, 1),
            "p95_ms": round(_percentile(latencies, 0.95) * 1000, 1),
        }

    ours_summary, bare_summary = summary("ours"), summary("bare")
    return {
        "workflows_per_round": WORKFLOWS_PER_ROUND,
        "concurrency": CONCURRENCY,
        "rounds": OPERATION_ROUNDS,
        "shape": "5 activities: 1, then 2 in parallel, then 2",
        "ours": ours_summary,
        "bare": bare_summary,
        "throughput_ratio": round(
            ours_summary["throughput_per_s"] / bare_summary["throughput_per_s"], 3
        ),
        "p50_ratio": round(ours_summary["p50_ms"] / bare_summary["p50_ms"], 3),
        "p95_ratio": round(ours_summary["p95_ms"] / bare_summary["p95_ms"], 3),
        "targets": {"throughput_ratio": ">= 0.85", "p50_ratio": "<= 1.2"},
    }


async def main() -> dict[str, object]:
    return {
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "breaker": await bench_breaker(),
        "encryption": await bench_encryption(),
        "register_node": await bench_register_node(),
        "heartbeats": await bench_heartbeats(),
        "fleet": await bench_fleet(),
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main()), indent=2))
