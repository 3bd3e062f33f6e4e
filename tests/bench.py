"""Performance figures, measured against baselines run side by side in the same process.

``make bench`` prints one JSON object. Figures are ratios against a baseline measured in the same
run and interleaved with ours (alternating rounds, medians), so a noisy shared machine moves both
sides alike. Nothing here asserts a figure: targets are read by people, in the issue notes.

* ``breaker``: per-call overhead of a closed circuit breaker with its failure-rate window on,
  against ``aiobreaker`` and ``circuitbreaker`` guarding the same no-op coroutine.
  Target: ours <= 0.5x aiobreaker's overhead.
"""

from __future__ import annotations

import asyncio
import json
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from datetime import timedelta

import aiobreaker
import circuitbreaker

from activities.resilience.breaker import CircuitBreaker
from contracts.resilience import BreakerSettings

CALLS_PER_ROUND = 20_000
ROUNDS = 15


async def _noop() -> None:
    return None


async def _time_calls(call: Callable[[], Awaitable[object]], calls: int) -> float:
    started = time.perf_counter_ns()
    for _ in range(calls):
        await call()
    return (time.perf_counter_ns() - started) / calls


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
    for call in variants.values():  # warm-up
        await _time_calls(call, 2_000)

    per_call: dict[str, list[float]] = {name: [] for name in variants}
    for round_index in range(ROUNDS):
        names = list(variants)
        if round_index % 2:
            names.reverse()
        for name in names:
            per_call[name].append(await _time_calls(variants[name], CALLS_PER_ROUND))

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


async def main() -> dict[str, object]:
    return {
        "python": sys.version.split()[0],
        "machine": platform.machine(),
        "breaker": await bench_breaker(),
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(main()), indent=2))
