"""Heartbeats and liveness on the real PostgreSQL and broker: idempotent batched upserts,
oversized or invalid heartbeats refused to the dead-letter topic, the sweep's marks and
events."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest

from activities.ingest import DeadLetters
from activities.kafka import EventPublisher
from activities.liveness import Beat, HeartbeatConsumer, read_nodes, sweep, upsert_heartbeats
from activities.migrate import migrate
from activities.resilience.breaker import BreakerRegistry
from activities.settings import KafkaSettings
from contracts.fleet import MAX_HEARTBEAT_BYTES, FleetState, Liveness, LivenessSweepInput
from contracts.topics import TopicName
from tests.fleet_support import dead_letters, envelope, header, publish_raw, with_ingress
from tests.support import wait_until
from workers.settings import OnexSettings

HEARTBEAT = TopicName.NODE_HEARTBEAT_PUBLISHED


@pytest.fixture
async def connection(pg_dsn: str) -> AsyncIterator[Any]:
    conn = await asyncpg.connect(pg_dsn)
    await migrate(conn)
    try:
        yield conn
    finally:
        await conn.close()


async def _register(connection: Any, node_id: uuid.UUID, *, status: str = "active") -> None:
    await connection.execute(
        "INSERT INTO onex_nodes (node_id, node_type, node_version, service_name, address, port,"
        " status) VALUES ($1, 'effect', '1.0.0', 'svc', '127.0.0.1', 8080, $2)",
        node_id,
        status,
    )


async def _row(connection: Any, node_id: uuid.UUID) -> Any:
    return await connection.fetchrow("SELECT * FROM onex_node_liveness WHERE node_id = $1", node_id)


async def test_an_out_of_order_or_repeated_heartbeat_never_moves_last_seen_back(
    connection: Any,
) -> None:
    """The newest heartbeat wins: an older one arriving later, or the same one again, changes
    nothing; a batch with several heartbeats of one node keeps the newest; the interval
    between the last two is kept for the jitter count."""
    node_id = uuid.uuid4()
    now = datetime.now(UTC)
    early, late = now - timedelta(seconds=60), now - timedelta(seconds=30)
    assert await upsert_heartbeats(connection, [Beat(node_id, early, "ready")]) == 1
    assert await upsert_heartbeats(connection, [Beat(node_id, late, "busy")]) == 1
    assert await upsert_heartbeats(connection, [Beat(node_id, early, "stale")]) == 0
    assert await upsert_heartbeats(connection, [Beat(node_id, late, "busy")]) == 0
    row = await _row(connection, node_id)
    assert row["last_seen"] == late, "an out-of-order heartbeat must not move last_seen back"
    assert row["reported_state"] == "busy"
    assert row["last_interval_ms"] == 30_000
    other = uuid.uuid4()
    batch = [Beat(other, late, "b"), Beat(other, early, "a"), Beat(node_id, early, "x")]
    assert await upsert_heartbeats(connection, batch) == 1
    assert (await _row(connection, other))["reported_state"] == "b"


async def test_a_heartbeat_from_the_future_is_capped_at_now(connection: Any) -> None:
    """A node with a clock ahead cannot make itself look alive for longer than it is."""
    node_id = uuid.uuid4()
    await upsert_heartbeats(
        connection, [Beat(node_id, datetime.now(UTC) + timedelta(hours=1), "r")]
    )
    row = await _row(connection, node_id)
    assert row["last_seen"] <= datetime.now(UTC) + timedelta(seconds=5)


async def test_the_sweep_marks_silent_nodes_unhealthy_and_back_with_events(
    connection: Any,
) -> None:
    """A node silent past the window becomes unhealthy, with a liveness_lost event in the
    outbox; a second sweep changes nothing; a fresh heartbeat makes the next sweep mark it
    healthy with liveness_restored. Inactive nodes are not swept; jitter is counted."""
    silent, alive, gone = uuid.uuid4(), uuid.uuid4(), uuid.uuid4()
    for node_id in (silent, alive):
        await _register(connection, node_id)
    await _register(connection, gone, status="inactive")
    now = datetime.now(UTC)
    old = now - timedelta(seconds=200)
    await upsert_heartbeats(
        connection,
        [
            Beat(silent, old, "r"),
            Beat(gone, old, "r"),
            Beat(alive, now - timedelta(seconds=61), "r"),
        ],
    )
    await upsert_heartbeats(connection, [Beat(alive, now, "r")])  # a 61 s gap: jittery
    request = LivenessSweepInput(window_seconds=90, expected_interval_seconds=30, jitter_seconds=15)

    first = await sweep(connection, request, uuid.uuid4())
    again = await sweep(connection, request, uuid.uuid4())
    await upsert_heartbeats(connection, [Beat(silent, datetime.now(UTC), "r")])
    back = await sweep(connection, request, uuid.uuid4())

    assert first.lost == [silent], "only the active node silent past the window is lost"
    assert (first.tracked, first.unhealthy, first.jittery) == (2, 1, 1)
    assert again.lost == [], "a repeat sweep must change nothing"
    assert again.restored == [], "a repeat sweep must change nothing"
    assert back.restored == [silent]
    events = await connection.fetch("SELECT topic, envelope FROM onex_outbox ORDER BY id")
    assert [row["topic"] for row in events] == [
        TopicName.REGISTRY_NODE_LIVENESS_LOST,
        TopicName.REGISTRY_NODE_LIVENESS_RESTORED,
    ]
    payload = json.loads(events[0]["envelope"])["payload"]
    assert payload["node_id"] == str(silent)
    assert payload["silent_seconds"] > 90
    views = {view.node_id: view for view in await read_nodes(connection)}
    assert views[silent].liveness is Liveness.HEALTHY
    assert views[gone].state is FleetState.INACTIVE
    assert await read_nodes(connection, state=FleetState.UNHEALTHY) == []


async def test_the_consumer_writes_heartbeats_and_refuses_oversized_ones(
    backends: OnexSettings, connection: Any, topic_prefix: str
) -> None:
    """Heartbeats on Kafka reach the table in batches; one over 10 KB and one that is not a
    heartbeat go raw to the dead-letter topic with the reason; the consumer keeps going."""
    settings = with_ingress(
        backends.model_copy(
            update={
                "kafka": KafkaSettings(
                    bootstrap_servers=backends.kafka.bootstrap_servers, topic_prefix=topic_prefix
                )
            }
        )
    )
    nodes = [uuid.uuid4() for _ in range(20)]
    beats = [envelope(HEARTBEAT, {"schema_version": 1, "node_id": str(n)}) for n in nodes]
    oversized = envelope(
        HEARTBEAT,
        {"schema_version": 1, "node_id": str(uuid.uuid4()), "pad": "x" * MAX_HEARTBEAT_BYTES},
    )
    wrong = envelope(HEARTBEAT, {"schema_version": 1, "node_id": "not-a-uuid"})
    await publish_raw(settings, HEARTBEAT, [*beats, oversized, wrong])
    publisher = EventPublisher(settings.kafka, BreakerRegistry())

    async def pool() -> Any:
        return connection

    consumer = HeartbeatConsumer(
        settings.kafka,
        pool,
        DeadLetters(publisher, group_id=settings.ingress.heartbeat_group_id),
        group_id=settings.ingress.heartbeat_group_id,
        poll_timeout_ms=100,
    )
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(stop))
    try:

        async def all_seen() -> bool:
            return consumer.stats.consumed >= len(beats) + 2

        await wait_until(all_seen, within=60, what="every heartbeat to be consumed")
        letters = await dead_letters(settings, count=2)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)
        await publisher.stop()
    count = await connection.fetchval(
        "SELECT count(*) FROM onex_node_liveness WHERE node_id = ANY($1::uuid[])", nodes
    )
    assert count == len(nodes), "every valid heartbeat must be written"
    assert await connection.fetchval("SELECT count(*) FROM onex_node_liveness") == len(nodes)
    reasons = sorted(header(record, "dlq_reason") or "" for record in letters)
    assert len(reasons) == 2, f"expected the two refused heartbeats as dead letters: {reasons}"
    assert any("over the limit" in reason for reason in reasons)
    assert any("node_id" in reason for reason in reasons)
    assert consumer.stats.dead_lettered == 2


async def test_the_silence_policy_asks_once_for_a_deregistration(connection: Any) -> None:
    """With ``deregister_after_seconds``, a node silent that long gets one shutdown event in
    the outbox (for the ingress to deregister it); the next sweep asks nothing more; a new
    heartbeat clears the request, so a later silence asks again."""
    node_id = uuid.uuid4()
    await _register(connection, node_id)
    await upsert_heartbeats(
        connection, [Beat(node_id, datetime.now(UTC) - timedelta(seconds=700), "r")]
    )
    request = LivenessSweepInput(window_seconds=90, deregister_after_seconds=600)
    first = await sweep(connection, request, uuid.uuid4())
    again = await sweep(connection, request, uuid.uuid4())
    await upsert_heartbeats(connection, [Beat(node_id, datetime.now(UTC), "r")])
    row = await _row(connection, node_id)
    assert first.deregistering == [node_id]
    assert again.deregistering == [], "one request per silence, not one per sweep"
    assert row["deregister_requested_at"] is None, "a heartbeat clears the request"
    shutdowns = await connection.fetch(
        "SELECT envelope FROM onex_outbox WHERE topic = $1", TopicName.NODE_SHUTDOWN_ANNOUNCED
    )
    assert len(shutdowns) == 1
    payload = json.loads(shutdowns[0]["envelope"])["payload"]
    assert payload["node_id"] == str(node_id)
    assert payload["node_type"] == "effect"
    assert payload["schema_version"] == 1
