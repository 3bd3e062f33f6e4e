"""Helpers of the ingress, heartbeat, liveness and fleet-read tests: raw records, dead letters,
settings, a seeded fleet."""

from __future__ import annotations

import json
import time
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from activities.ingest import DEAD_LETTER_TOPIC
from activities.liveness import Beat, upsert_heartbeats
from activities.migrate import migrate
from workers.settings import IngressSettings, OnexSettings


def with_ingress(settings: OnexSettings, **changes: Any) -> OnexSettings:
    """The settings with a fresh consumer group and short intervals (plus ``changes``)."""
    group = f"g-{uuid.uuid4().hex[:8]}"
    ingress = IngressSettings(
        group_id=f"{group}-ingress",
        heartbeat_group_id=f"{group}-heartbeats",
        poll_timeout_ms=100,
        retry_delay=0.2,
        **changes,
    )
    return settings.model_copy(update={"ingress": ingress})


def introspection(node_id: uuid.UUID | None = None, **changes: Any) -> dict[str, Any]:
    """An introspection payload (schema version 1) for a valid node."""
    node = node_id or uuid.uuid4()
    payload: dict[str, Any] = {
        "schema_version": 1,
        "node_id": str(node),
        "node_type": "effect",
        "node_version": "1.2.3",
        "service_name": "ingress-test",
        "address": "127.0.0.1",
        "port": 8080,
        "tags": ["test"],
        "endpoints": {"health": "http://127.0.0.1:8080/health"},
        "metadata": {"team": "platform"},
    }
    payload.update(changes)
    return payload


def envelope(
    event_type: str,
    payload: dict[str, Any],
    *,
    event_id: uuid.UUID | None = None,
    correlation_id: uuid.UUID | None = None,
    timestamp: datetime | None = None,
) -> bytes:
    """An envelope as a node sends it (the correlation id only when given)."""
    data: dict[str, Any] = {
        "event_id": str(event_id or uuid.uuid4()),
        "event_type": event_type,
        "source": "test-node",
        "timestamp": (timestamp or datetime.now(UTC)).isoformat(),
        "payload": payload,
    }
    if correlation_id is not None:
        data["correlation_id"] = str(correlation_id)
    return json.dumps(data).encode()


async def publish_raw(
    settings: OnexSettings,
    topic: str,
    values: list[bytes],
    *,
    key: bytes | None = None,
    headers: list[tuple[str, bytes]] | None = None,
) -> None:
    """Send ``values`` as they are to catalog topic ``topic``."""
    producer = AIOKafkaProducer(bootstrap_servers=settings.kafka.bootstrap_servers)
    await producer.start()
    try:
        for value in values:
            await producer.send_and_wait(
                settings.kafka.topic_prefix + topic,
                value,
                key=key or uuid.uuid4().bytes,
                headers=headers or [],
            )
    finally:
        await producer.stop()


async def read_topic(settings: OnexSettings, topic: str, *, count: int, within: float) -> list[Any]:
    """The first ``count`` records of catalog topic ``topic`` (fewer if the deadline passes)."""
    consumer = AIOKafkaConsumer(
        settings.kafka.topic_prefix + topic,
        bootstrap_servers=settings.kafka.bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    records: list[Any] = []
    await consumer.start()
    try:
        deadline = time.monotonic() + within
        while len(records) < count and time.monotonic() < deadline:
            for batch in (await consumer.getmany(timeout_ms=200)).values():
                records.extend(batch)
    finally:
        await consumer.stop()
    return records


async def dead_letters(settings: OnexSettings, *, count: int, within: float = 30) -> list[Any]:
    return await read_topic(settings, DEAD_LETTER_TOPIC, count=count, within=within)


def header(record: Any, name: str) -> str | None:
    for key, value in record.headers or ():
        if key == name:
            return bytes(value).decode()
    return None


async def seed_fleet(pg_dsn: str) -> tuple[uuid.UUID, uuid.UUID]:
    """A migrated registry with two active nodes, one of them silent and marked unhealthy:
    their ids (alive, silent)."""
    alive, silent = uuid.uuid4(), uuid.uuid4()
    connection = await asyncpg.connect(pg_dsn)
    try:
        await migrate(connection)
        for node_id, name in ((alive, "alive"), (silent, "silent")):
            await connection.execute(
                "INSERT INTO onex_nodes (node_id, node_type, node_version, service_name, address,"
                " port) VALUES ($1, 'compute', '2.0.0', $2, '10.0.0.7', 9000)",
                node_id,
                name,
            )
        now = datetime.now(UTC)
        await upsert_heartbeats(
            connection,
            [Beat(alive, now, "ready"), Beat(silent, now - timedelta(seconds=500), "busy")],
        )
        await connection.execute(
            "UPDATE onex_node_liveness SET liveness = 'unhealthy' WHERE node_id = $1", silent
        )
    finally:
        await connection.close()
    return alive, silent
