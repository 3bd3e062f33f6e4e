"""``heartbeats`` in ``make bench``: can the heartbeat consumer keep up with the fleet?

On a private PostgreSQL and Kafka broker (the embedded stack's, on free ports), one
:class:`~activities.liveness.HeartbeatConsumer` runs while each round publishes one heartbeat
for each of 10,000 nodes; a round's time runs from its first publish until the consumer has
written (upserted and committed) the last of them, so it is end to end and includes the
producer. A first round, not counted, warms up (the consumer joins its group then). The need
is 10,000 nodes at one heartbeat per 30 s: 333 heartbeats/s. ``headroom`` is the median rate
over that need (target: above 1, with room to spare).
"""

from __future__ import annotations

import asyncio
import json
import statistics
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
from aiokafka import AIOKafkaProducer

from activities.ingest import DeadLetters
from activities.kafka import EventPublisher
from activities.kafka_admin import create_topics
from activities.liveness import HeartbeatConsumer
from activities.migrate import migrate_dsn
from activities.resilience.breaker import BreakerRegistry
from contracts.topics import TopicName
from tests.conftest import isolated_settings
from workers.devstack import DevStack, ServiceName
from workers.logging import configure_logging

NODES = 10_000
ROUNDS = 3
NEEDED_PER_SECOND = NODES / 30


async def bench_heartbeats() -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="onex-bench-hb-") as state:
        settings = isolated_settings(Path(state))
        stack = DevStack(settings, services=[ServiceName.POSTGRES, ServiceName.KAFKA])
        await stack.up()
        try:
            configure_logging("error")
            await migrate_dsn(settings.postgres.dsn)
            await create_topics(settings.kafka.bootstrap_servers, prefix="")
            pool = await asyncpg.create_pool(settings.postgres.dsn, min_size=1, max_size=2)
            try:
                return await _measure(settings.kafka, pool)
            finally:
                await pool.close()
        finally:
            stack.down(purge=True)


async def _measure(kafka: Any, pool: Any) -> dict[str, object]:
    publisher = EventPublisher(kafka, BreakerRegistry())

    async def get_pool() -> Any:
        return pool

    consumer = HeartbeatConsumer(
        kafka, get_pool, DeadLetters(publisher, group_id="bench-heartbeats"), group_id="bench"
    )
    stop = asyncio.Event()
    consuming = asyncio.create_task(consumer.run(stop))
    producer = AIOKafkaProducer(bootstrap_servers=kafka.bootstrap_servers, linger_ms=5)
    await producer.start()
    nodes = [str(uuid.uuid4()) for _ in range(NODES)]
    rates: list[float] = []
    try:
        for index in range(ROUNDS + 1):
            target = consumer.stats.consumed + NODES
            started = time.perf_counter()
            await _publish_round(producer, nodes)
            while consumer.stats.consumed < target:
                if consuming.done():
                    consuming.result()  # the consumer failed: raise its error
                await asyncio.sleep(0.005)
            if index:  # the first round is a warm-up: it includes joining the group
                rates.append(NODES / (time.perf_counter() - started))
    finally:
        stop.set()
        await asyncio.gather(consuming, return_exceptions=True)
        await producer.stop()
        await publisher.stop()
    median = statistics.median(rates)
    return {
        "nodes": NODES,
        "rounds": ROUNDS,
        "heartbeats_per_second": round(median, 1),
        "rounds_per_second": [round(rate, 1) for rate in rates],
        "needed_per_second": round(NEEDED_PER_SECOND, 1),
        "headroom": round(median / NEEDED_PER_SECOND, 1),
        "batches": consumer.stats.batches,
        "rows_written": consumer.stats.written,
    }


async def _publish_round(producer: AIOKafkaProducer, nodes: list[str]) -> None:
    timestamp = datetime.now(UTC).isoformat()
    deliveries = []
    for node_id in nodes:
        value = json.dumps(
            {
                "event_id": str(uuid.uuid4()),
                "event_type": TopicName.NODE_HEARTBEAT_PUBLISHED.value,
                "source": "bench",
                "timestamp": timestamp,
                "payload": {"schema_version": 1, "node_id": node_id, "state": "ready"},
            }
        ).encode()
        deliveries.append(
            await producer.send(
                TopicName.NODE_HEARTBEAT_PUBLISHED.value, value, key=node_id.encode()
            )
        )
    await asyncio.gather(*deliveries)


if __name__ == "__main__":
    print(json.dumps(asyncio.run(bench_heartbeats()), indent=2))
