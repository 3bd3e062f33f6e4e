"""Heartbeats and liveness in the registry database (``onex_node_liveness``, migration 0005).

* :class:`HeartbeatConsumer` reads ``onex.node.heartbeat.published.v1`` in a consumer group and
  writes each fetched batch as **one** upsert (:func:`upsert_heartbeats`), then commits the
  batch's offsets. A heartbeat over :data:`~contracts.fleet.MAX_HEARTBEAT_BYTES`, or one that
  does not validate, goes raw to the dead-letter topic instead. If the database or the
  dead-letter publish fails, the batch is fetched again (nothing was committed), after a pause.
* :func:`upsert_heartbeats` is idempotent: ``last_seen`` (the heartbeat's own timestamp, capped
  at ``now()``) only ever moves forward, so a redelivered or out-of-order heartbeat changes
  nothing. A batch holding several heartbeats of one node keeps the newest.
* :func:`sweep` is the body of the ``postgres.sweep_liveness`` activity: in one transaction it
  marks active nodes silent for longer than the window ``unhealthy``, marks those heard from
  again ``healthy``, queues a ``liveness_lost`` / ``liveness_restored`` event for each in the
  outbox, and counts the nodes whose last heartbeat interval was off by more than the jitter.
  Under the optional silence policy (``deregister_after_seconds``) it also queues, once per
  silence, a shutdown event on the node's behalf for a node silent that long: the ingress
  then deregisters it through the per-node path, like any shutdown.
* :func:`read_nodes` is the one read of the fleet (registry rows joined with their liveness),
  used by ``onex nodes`` and the client helpers, which put the Valkey read-through cache
  (:mod:`activities.cache`) in front of it when Valkey is configured.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog

from activities.base import SecretSource
from activities.ingest import DeadLetters, rewind, start_group_consumer
from activities.outbox import enqueue
from activities.resilience.correlation import correlation_from_kafka_headers
from activities.resilience.sanitize import sanitize_exception
from activities.settings import KafkaSettings, PostgresSettings
from contracts.events import new_envelope
from contracts.fleet import (
    MAX_HEARTBEAT_BYTES,
    SCHEMA_VERSION,
    FleetState,
    Liveness,
    LivenessSweepInput,
    LivenessSweepResult,
    NodeView,
    Refusal,
    heartbeat,
    parse_envelope,
)
from contracts.topics import TopicName

__all__ = [
    "Beat",
    "HeartbeatConsumer",
    "HeartbeatStats",
    "read_fleet",
    "read_nodes",
    "sweep",
    "upsert_heartbeats",
]

logger = structlog.get_logger("onex.liveness")


@dataclass(frozen=True, slots=True)
class Beat:
    node_id: uuid.UUID
    seen: datetime
    state: str
    active_operations: int = 0


_UPSERT_HEARTBEATS = """
INSERT INTO onex_node_liveness AS l (node_id, last_seen, reported_state, active_operations)
SELECT b.node_id, LEAST(b.seen, now()), b.state, b.ops
FROM unnest($1::uuid[], $2::timestamptz[], $3::text[], $4::int[]) AS b(node_id, seen, state, ops)
ON CONFLICT (node_id) DO UPDATE SET
    last_seen = EXCLUDED.last_seen,
    reported_state = EXCLUDED.reported_state,
    active_operations = EXCLUDED.active_operations,
    last_interval_ms = (extract(epoch FROM EXCLUDED.last_seen - l.last_seen) * 1000)::bigint,
    heartbeats = l.heartbeats + 1,
    deregister_requested_at = NULL
WHERE l.last_seen < EXCLUDED.last_seen
"""


async def upsert_heartbeats(executor: Any, beats: Sequence[Beat]) -> int:
    """Record ``beats`` in one statement; how many rows moved forward (duplicates do not)."""
    newest: dict[uuid.UUID, Beat] = {}
    for beat in beats:
        kept = newest.get(beat.node_id)
        if kept is None or beat.seen > kept.seen:
            newest[beat.node_id] = beat
    if not newest:
        return 0
    rows = list(newest.values())
    status: str = await executor.execute(
        _UPSERT_HEARTBEATS,
        [b.node_id for b in rows],
        [b.seen for b in rows],
        [b.state for b in rows],
        [b.active_operations for b in rows],
    )
    return int(status.split()[-1])  # "INSERT 0 <count>"


_MARK_LOST = """
UPDATE onex_node_liveness l SET liveness = 'unhealthy', liveness_changed_at = now()
FROM onex_nodes n
WHERE n.node_id = l.node_id AND n.status = 'active' AND l.liveness = 'healthy'
  AND l.last_seen < now() - make_interval(secs => $1)
RETURNING l.node_id, l.last_seen, extract(epoch FROM now() - l.last_seen) AS silent_seconds
"""
_MARK_RESTORED = """
UPDATE onex_node_liveness l SET liveness = 'healthy', liveness_changed_at = now()
WHERE l.liveness = 'unhealthy' AND l.last_seen >= now() - make_interval(secs => $1)
RETURNING l.node_id, l.last_seen, 0.0::float8 AS silent_seconds
"""
_MARK_EXPIRED = """
UPDATE onex_node_liveness l SET deregister_requested_at = now()
FROM onex_nodes n
WHERE n.node_id = l.node_id AND n.status = 'active' AND l.deregister_requested_at IS NULL
  AND l.last_seen < now() - make_interval(secs => $1)
RETURNING l.node_id, n.node_type
"""
_COUNT = """
SELECT count(*) AS tracked,
       count(*) FILTER (WHERE l.liveness = 'unhealthy') AS unhealthy,
       count(*) FILTER (
           WHERE l.last_interval_ms IS NOT NULL AND abs(l.last_interval_ms - $1 * 1000) > $2 * 1000
       ) AS jittery
FROM onex_node_liveness l JOIN onex_nodes n USING (node_id)
WHERE n.status = 'active'
"""


async def sweep(
    connection: Any, request: LivenessSweepInput, correlation_id: uuid.UUID
) -> LivenessSweepResult:
    """Mark silent nodes unhealthy and returning ones healthy, with their events (in the
    caller's transaction)."""
    window = float(request.window_seconds)
    lost = await connection.fetch(_MARK_LOST, window)
    restored = await connection.fetch(_MARK_RESTORED, window)
    for rows, topic in (
        (lost, TopicName.REGISTRY_NODE_LIVENESS_LOST),
        (restored, TopicName.REGISTRY_NODE_LIVENESS_RESTORED),
    ):
        for row in rows:
            payload = {
                "node_id": str(row["node_id"]),
                "last_seen": row["last_seen"].isoformat(),
                "silent_seconds": round(float(row["silent_seconds"]), 3),
                "window_seconds": window,
            }
            await enqueue(
                connection,
                new_envelope(topic, payload, correlation_id=correlation_id),
                operation="sweep_liveness",
            )
    expired = []
    if request.deregister_after_seconds is not None:
        expired = await connection.fetch(_MARK_EXPIRED, float(request.deregister_after_seconds))
        for row in expired:
            # Through the ingress, as the node's own shutdown would: the per-node path, with
            # the event id as its Update id.
            payload = {
                "schema_version": SCHEMA_VERSION,
                "node_id": str(row["node_id"]),
                "node_type": row["node_type"],
                "reason": f"silent for over {request.deregister_after_seconds:g} s",
            }
            await enqueue(
                connection,
                new_envelope(
                    TopicName.NODE_SHUTDOWN_ANNOUNCED,
                    payload,
                    correlation_id=correlation_id,
                    source="onex-liveness",
                ),
                operation="sweep_liveness",
            )
    counts = await connection.fetchrow(
        _COUNT, float(request.expected_interval_seconds), float(request.jitter_seconds)
    )
    return LivenessSweepResult(
        lost=[row["node_id"] for row in lost],
        restored=[row["node_id"] for row in restored],
        tracked=counts["tracked"],
        unhealthy=counts["unhealthy"],
        jittery=counts["jittery"],
        deregistering=[row["node_id"] for row in expired],
    )


_READ_NODES = """
SELECT * FROM (
    SELECT n.node_id, n.node_type, n.node_version, n.service_name, n.address, n.port,
           n.endpoints, n.updated_at, l.last_seen, l.reported_state, l.last_interval_ms,
           COALESCE(l.liveness, 'unknown') AS liveness,
           CASE WHEN n.status = 'inactive' THEN 'inactive'
                WHEN l.liveness = 'unhealthy' THEN 'unhealthy'
                ELSE 'active' END AS state
    FROM onex_nodes n LEFT JOIN onex_node_liveness l USING (node_id)
    WHERE $1::uuid IS NULL OR n.node_id = $1
) AS fleet
WHERE $2::text IS NULL OR state = $2
ORDER BY service_name, node_id
LIMIT $3
"""


async def read_nodes(
    executor: Any,
    *,
    state: FleetState | None = None,
    node_id: uuid.UUID | None = None,
    limit: int = 10_000,
) -> list[NodeView]:
    """The registry's nodes with their liveness (one node with ``node_id``; by ``state``)."""
    rows = await executor.fetch(_READ_NODES, node_id, None if state is None else state.value, limit)
    views = []
    for row in rows:
        endpoints = row["endpoints"]
        interval = row["last_interval_ms"]
        views.append(
            NodeView(
                node_id=row["node_id"],
                node_type=row["node_type"],
                node_version=row["node_version"],
                service_name=row["service_name"],
                address=row["address"],
                port=row["port"],
                endpoints=json.loads(endpoints) if isinstance(endpoints, str) else endpoints,
                state=FleetState(row["state"]),
                liveness=Liveness(row["liveness"]),
                last_seen=row["last_seen"],
                reported_state=row["reported_state"],
                heartbeat_interval_seconds=None if interval is None else interval / 1000,
                updated_at=row["updated_at"],
            )
        )
    return views


# ---------------------------------------------------------------------------------------------
# The heartbeat consumer


@dataclass
class HeartbeatStats:
    """What the consumer did: records read, heartbeats written (moved forward), dead letters."""

    consumed: int = 0
    written: int = 0
    dead_lettered: int = 0
    batches: int = 0
    failures: int = 0


class HeartbeatConsumer:
    """Batched, idempotent heartbeat upserts; see the module docstring.

    ``pool`` returns the asyncpg pool (or anything with ``execute``) to write with.
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        pool: Callable[[], Awaitable[Any]],
        dead_letters: DeadLetters,
        *,
        group_id: str = "onex-heartbeats",
        max_records: int = 5000,
        poll_timeout_ms: int = 200,
        retry_seconds: float = 1.0,
        max_bytes: int = MAX_HEARTBEAT_BYTES,
    ) -> None:
        self.kafka = kafka
        self.pool = pool
        self.dead_letters = dead_letters
        self.group_id = group_id
        self.max_records = max_records
        self.poll_timeout_ms = poll_timeout_ms
        self.retry_seconds = retry_seconds
        self.max_bytes = max_bytes
        self.stats = HeartbeatStats()
        self._log = logger.bind(group_id=group_id)

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set (a background service of the worker or the ingress)."""
        consumer = await start_group_consumer(
            self.kafka, [TopicName.NODE_HEARTBEAT_PUBLISHED], group_id=self.group_id
        )
        try:
            while not stop.is_set():
                batches = await consumer.getmany(
                    timeout_ms=self.poll_timeout_ms, max_records=self.max_records
                )
                if not batches:
                    continue
                try:
                    await self._handle(consumer, batches)
                except Exception as exc:
                    # Nothing of the batch was committed: fetch it again after a pause.
                    self.stats.failures += 1
                    rewind(consumer, {tp: records[0].offset for tp, records in batches.items()})
                    self._log.warning(
                        "heartbeat_batch_failed",
                        records=sum(len(r) for r in batches.values()),
                        error=sanitize_exception(exc),
                        retry_in=self.retry_seconds,
                    )
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(stop.wait(), self.retry_seconds)
        finally:
            await consumer.stop()

    async def _handle(self, consumer: Any, batches: dict[Any, list[Any]]) -> None:
        beats: list[Beat] = []
        refused: list[tuple[Any, str]] = []
        for records in batches.values():
            for record in records:
                try:
                    envelope = parse_envelope(record.value, max_bytes=self.max_bytes)
                    beat = heartbeat(envelope)
                except Refusal as refusal:
                    refused.append((record, refusal.reason))
                    continue
                beats.append(
                    Beat(beat.node_id, envelope.timestamp, beat.state, beat.active_operations)
                )
        for record, reason in refused:
            await self.dead_letters.send(record, reason)
            self._log.warning(
                "heartbeat_dead_lettered",
                offset=record.offset,
                partition=record.partition,
                reason=reason,
                correlation_id=str(correlation_from_kafka_headers(record.headers) or ""),
            )
        written = await upsert_heartbeats(await self.pool(), beats)
        await consumer.commit({tp: records[-1].offset + 1 for tp, records in batches.items()})
        self.stats.batches += 1
        self.stats.consumed += sum(len(records) for records in batches.values())
        self.stats.written += written
        self.stats.dead_lettered += len(refused)


async def read_fleet(
    postgres: PostgresSettings,
    *,
    secrets: SecretSource | None = None,
    state: FleetState | None = None,
    node_id: uuid.UUID | None = None,
    limit: int = 10_000,
) -> list[NodeView]:
    """:func:`read_nodes` on a connection of its own (``onex nodes``, the client helpers).

    The one read of the fleet from outside a worker: the loader that ``get_node`` and
    ``list_nodes`` hand to the Valkey cache (:func:`workers.client.list_nodes`).
    """
    import asyncpg

    from activities.postgres import resolve_password

    password = await resolve_password(postgres, secrets)
    connection = await asyncpg.connect(
        postgres.dsn,
        password=None if password is None else password.get_secret_value(),
        timeout=postgres.connect_timeout,
        command_timeout=postgres.query_timeout,
    )
    try:
        return await read_nodes(connection, state=state, node_id=node_id, limit=limit)
    finally:
        await connection.close()
