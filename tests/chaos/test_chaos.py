"""The chaos runner's short profile, on every test run: worker kills, a Temporal restart,
PostgreSQL and Kafka outages and Consul errors while operations overlap on shared nodes."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.timeout(420)
def test_the_short_chaos_profile_loses_nothing() -> None:
    """A seeded short run ends with every invariant held (exit 0): no lost or duplicated
    effect, no half-done node, every queued event on Kafka, the planted secret nowhere; and
    the faults it reports were really injected, cuts during compensations included."""
    seed = int(os.environ.get("ONEX_CHAOS_SEED", "0")) or random.SystemRandom().randrange(1, 10**6)
    done = subprocess.run(
        [sys.executable, "-m", "tests.chaos", "--profile", "short", "--seed", str(seed)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=400,
        check=False,
    )
    assert done.stdout.strip(), (
        f"seed {seed}: the runner printed no figures:\n{done.stderr[-3000:]}"
    )
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert done.returncode == 0, (
        f"seed {seed}: invariants broke: {figures['problems']}; replay with "
        f"`python -m tests.chaos --profile short --seed {seed}`\n{done.stderr[-3000:]}"
    )
    injected = figures["injected"]
    assert injected["worker_kill"] >= 6
    assert injected["temporal_restart"] >= 1
    assert injected["postgres_outage"] >= 1
    assert injected["kafka_outage"] >= 1
    for backend, outages in figures["outages"].items():
        assert outages["during_compensations"] >= 1, (
            f"seed {seed}: no {backend} outage overlapped a compensation: {outages}"
        )
    assert (figures["lost_effects"], figures["duplicated_effects"], figures["half_done_nodes"]) == (
        0,
        0,
        0,
    )
    assert (
        figures["events"]["distinct_on_kafka"]
        >= figures["events"]["queued"] - figures["events"]["dead_letters"]
    )
