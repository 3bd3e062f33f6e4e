"""The outbox relay against a real PostgreSQL and a real Kafka-protocol broker.

Rows are enqueued with :func:`activities.outbox.enqueue` (the row format the relay reads); the
schema comes from ``activities.migrate`` (the ``pool`` fixture in this folder's conftest).
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Sequence
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaTimeoutError,
    RecordTooLargeError,
    TopicAuthorizationFailedError,
)

from activities.kafka import DedupingConsumer, EventPublisher
from activities.kafka_admin import create_topics
from activities.outbox import OutboxRelay, enqueue
from activities.postgres import PostgresIdempotencyStore
from activities.resilience.breaker import BreakerRegistry, BreakerState
from activities.settings import KafkaSettings
from contracts.errors import ConfigurationError
from contracts.events import EventEnvelope, new_envelope
from contracts.resilience import BreakerSettings
from contracts.topics import TOPICS_BY_NAME
from tests.activities.kafka_support import DEREGISTERED, REGISTERED, registered
from tests.fakes.fault_proxy import start_proxied_broker
from tests.support import wait_until
from workers.settings import OnexSettings

SECRET_TEXT = "kafka://admin:hunter2@broker.internal:9092 password=hunter2"


def deregistered() -> EventEnvelope:
    return new_envelope(DEREGISTERED, {"node_id": str(uuid.uuid4())}, correlation_id=uuid.uuid4())


async def enqueue_all(pool: Any, envelopes: Sequence[EventEnvelope]) -> None:
    """Insert the envelopes' outbox rows in one transaction (one NOTIFY)."""
    async with pool.acquire() as connection, connection.transaction():
        for envelope in envelopes:
            assert await enqueue(connection, envelope) is not None


async def outbox_rows(pool: Any) -> list[Any]:
    return list(
        await pool.fetch(
            "SELECT id, event_id, attempts, last_error, published_at FROM onex_outbox ORDER BY id"
        )
    )


async def topic_contents(kafka: KafkaSettings, topic: str, expected: int) -> list[Any]:
    """Every record of ``topic``: read until the end offsets, which also counts duplicates."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=kafka.bootstrap_servers, group_id=None, auto_offset_reset="earliest"
    )
    await consumer.start()
    try:
        partitions = [
            TopicPartition(kafka.topic_prefix + topic, p)
            for p in range(TOPICS_BY_NAME[topic].partitions)
        ]
        consumer.assign(partitions)
        await consumer.seek_to_beginning(*partitions)
        ends: dict[TopicPartition, int] = await consumer.end_offsets(partitions)
        total = sum(ends.values())
        assert total >= expected
        records: list[Any] = []

        async def at_end() -> bool:
            for batch in (await consumer.getmany(timeout_ms=100)).values():
                records.extend(batch)
            return len(records) >= total

        await wait_until(at_end, within=30, what=f"all records of {topic}")
        return records
    finally:
        await consumer.stop()


class FailingPublisher:
    """A publisher whose every publish raises ``error`` (as aiokafka would)."""

    def __init__(self, error: Exception) -> None:
        self.error = error
        self.calls = 0

    async def publish(
        self, topic: str, value: bytes, *, key: bytes | None, headers: list[tuple[str, bytes]]
    ) -> Any:
        self.calls += 1
        raise self.error


async def test_enqueue_writes_every_header_and_refuses_a_keyless_event(pool: Any) -> None:
    """enqueue is the one writer of outbox rows (the postgres handler calls it too): the row
    carries all three Kafka headers, a repeat is a no-op, and an event whose payload lacks the
    topic's key is refused with a ConfigurationError naming the caller's operation."""
    envelope = registered()
    async with pool.acquire() as connection:
        row_id = await enqueue(connection, envelope)
        assert row_id is not None
        assert await enqueue(connection, envelope) is None
        keyless = new_envelope(REGISTERED, {"service_name": "x"}, correlation_id=uuid.uuid4())
        with pytest.raises(ConfigurationError) as refused:
            await enqueue(connection, keyless, operation="upsert_node_and_enqueue")

    assert refused.value.context.operation == "upsert_node_and_enqueue"
    assert isinstance(refused.value.__cause__, ValueError)
    row = await pool.fetchrow("SELECT id, headers::text AS headers FROM onex_outbox")
    assert row["id"] == row_id
    assert json.loads(row["headers"]) == [
        ["correlation_id", str(envelope.correlation_id)],
        ["event_id", str(envelope.event_id)],
        ["event_type", REGISTERED],
    ]


async def test_drain_publishes_every_row_and_marks_it(
    settings: OnexSettings, publisher: EventPublisher, pool: Any
) -> None:
    """250 rows over two topics (three batches of 100) are published and marked published."""
    envelopes = [registered() for _ in range(200)] + [deregistered() for _ in range(50)]
    await enqueue_all(pool, envelopes)
    relay = OutboxRelay(pool, publisher)

    assert await relay.drain() == 250
    assert await relay.drain() == 0

    rows = await outbox_rows(pool)
    assert len(rows) == 250
    assert all(row["published_at"] is not None and row["attempts"] == 0 for row in rows)
    records = await topic_contents(settings.kafka, REGISTERED, 200)
    assert len(records) == 200
    by_id = {EventEnvelope.model_validate_json(r.value).event_id: r for r in records}
    assert set(by_id) == {e.event_id for e in envelopes[:200]}
    first = envelopes[0]
    assert by_id[first.event_id].key == first.key()
    assert dict(by_id[first.event_id].headers) == {
        "correlation_id": str(first.correlation_id).encode(),
        "event_id": str(first.event_id).encode(),
        "event_type": REGISTERED.encode(),
    }
    assert len(await topic_contents(settings.kafka, DEREGISTERED, 50)) == 50
    assert relay.totals.published == 250


@pytest.mark.parametrize(
    "error",
    [
        RecordTooLargeError(SECRET_TEXT),
        TopicAuthorizationFailedError(SECRET_TEXT),
        ValueError(SECRET_TEXT),
    ],
    ids=["record-too-large", "not-authorized", "unexpected"],
)
async def test_refused_row_is_dead_lettered_after_three_publishes(
    pool: Any, error: Exception
) -> None:
    """A publish the broker refuses counts: after 3 drains the row is a dead letter, whose
    reason names the kind of failure and the exception class, never the exception's text."""
    envelope = registered()
    await enqueue_all(pool, [envelope])
    publisher = FailingPublisher(error)
    relay = OutboxRelay(pool, publisher)

    for attempts in (1, 2):
        assert await relay.drain() == 0
        [row] = await outbox_rows(pool)
        assert row["attempts"] == attempts
        assert type(error).__name__ in row["last_error"]
        assert "hunter2" not in row["last_error"]
    assert await relay.drain() == 0

    assert await outbox_rows(pool) == []
    [dead] = await pool.fetch("SELECT * FROM onex_dead_letters")
    assert dead["event_id"] == envelope.event_id
    assert dead["attempts"] == 3
    assert dead["topic"] == REGISTERED
    assert dead["message_key"] == envelope.key()
    assert EventEnvelope.model_validate_json(dead["envelope"]) == envelope
    reason = dead["reason"]
    assert type(error).__name__ in reason
    for secret in ("hunter2", "admin", "broker.internal", "9092"):
        assert secret not in reason
    assert publisher.calls == 3
    assert relay.totals.dead_lettered == 1
    assert await relay.drain() == 0  # nothing left to try


@pytest.mark.parametrize(
    "error",
    [KafkaConnectionError(SECRET_TEXT), KafkaTimeoutError(SECRET_TEXT), ConnectionResetError()],
    ids=["connection", "timeout", "reset"],
)
async def test_transport_failures_never_dead_letter(pool: Any, error: Exception) -> None:
    """Kafka being down is not the record's fault: the row waits however many drains fail."""
    await enqueue_all(pool, [registered()])
    relay = OutboxRelay(pool, FailingPublisher(error))

    for _ in range(5):
        assert await relay.drain() == 0

    [row] = await outbox_rows(pool)
    assert row["attempts"] == 0
    assert row["published_at"] is None
    assert type(error).__name__ in row["last_error"]
    assert "hunter2" not in row["last_error"]
    assert await pool.fetchval("SELECT count(*) FROM onex_dead_letters") == 0
    assert relay.totals.deferred == 5


async def test_open_breaker_leaves_rows_untouched(
    settings: OnexSettings, publisher: EventPublisher, pool: Any
) -> None:
    """While a topic's breaker is open its rows are not tried nor counted; other topics go on,
    and the rows go out once the breaker closes."""
    waiting = [registered() for _ in range(5)]
    other = deregistered()
    await enqueue_all(pool, [*waiting, other])
    breaker = publisher.breaker(REGISTERED)
    for _ in range(3):
        breaker.record_failure()
    assert breaker.state is BreakerState.OPEN
    relay = OutboxRelay(pool, publisher, batch_size=2)

    assert await relay.drain() == 1  # only the other topic's row

    rows = {row["event_id"]: row for row in await outbox_rows(pool)}
    for envelope in waiting:
        row = rows[envelope.event_id]
        assert (row["attempts"], row["last_error"], row["published_at"]) == (0, None, None)
    assert rows[other.event_id]["published_at"] is not None
    assert breaker.snapshot().total_rejections == 1  # the topic was left out after one refusal

    breaker.reset()
    assert await relay.drain() == 5
    assert all(row["published_at"] is not None for row in await outbox_rows(pool))


async def test_two_relays_publish_each_row_exactly_once(settings: OnexSettings, pool: Any) -> None:
    """Two relays draining 500 rows at once, each with its own producer: SKIP LOCKED gives
    every row to one of them, so the topic holds 500 records with 500 distinct ids."""
    envelopes = [registered() for _ in range(500)]
    await enqueue_all(pool, envelopes)
    publishers = [EventPublisher(settings.kafka, BreakerRegistry()) for _ in range(2)]
    try:
        for publisher in publishers:
            await publisher.start()
        relays = [OutboxRelay(pool, publisher) for publisher in publishers]
        counts = await asyncio.gather(*(relay.drain() for relay in relays))
    finally:
        for publisher in publishers:
            await publisher.stop()

    assert sum(counts) == 500
    assert min(counts) > 0  # both relays really drained side by side
    records = await topic_contents(settings.kafka, REGISTERED, 500)
    ids = [EventEnvelope.model_validate_json(record.value).event_id for record in records]
    assert len(ids) == len(set(ids)) == 500
    assert set(ids) == {envelope.event_id for envelope in envelopes}
    assert await pool.fetchval("SELECT count(*) FROM onex_outbox WHERE published_at IS NULL") == 0


async def test_notify_wakes_the_running_relay(
    settings: OnexSettings, publisher: EventPublisher, pool: Any
) -> None:
    """With a 30 s poll interval, an inserted row is published within seconds: NOTIFY woke
    the relay, not the poll."""
    relay = OutboxRelay(pool, publisher, poll_interval=30.0)
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    try:

        async def listening() -> bool:
            if task.done():
                task.result()
            return relay.drains >= 1

        await wait_until(listening, within=10, what="the relay's first drain")
        envelope = registered()
        await enqueue_all(pool, [envelope])

        async def published() -> bool:
            return bool(
                await pool.fetchval(
                    "SELECT published_at IS NOT NULL FROM onex_outbox WHERE event_id = $1",
                    envelope.event_id,
                )
            )

        await wait_until(published, within=10, what="the row published after NOTIFY")
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=10)

    assert relay.drains == 2
    [record] = await topic_contents(settings.kafka, REGISTERED, 1)
    assert EventEnvelope.model_validate_json(record.value).event_id == envelope.event_id


_LISTENING_BACKEND = """
SELECT pid FROM pg_stat_activity
WHERE datname = current_database() AND query LIKE 'LISTEN%' AND pid <> pg_backend_pid()
"""


@pytest.mark.parametrize("dedicated", [True, False], ids=["dedicated", "pooled"])
async def test_relay_survives_its_listen_connection_being_terminated(
    settings: OnexSettings, publisher: EventPublisher, pool: Any, pg_dsn: str, dedicated: bool
) -> None:
    """The relay's LISTEN backend is killed (``pg_terminate_backend``): run() keeps going, LISTENs
    again on a new connection (its own via ``listen_connect``, else one from the pool), and a row
    inserted afterwards is published on its NOTIFY (the 30 s poll cannot be what published it).
    On stop, every connection the relay opened for LISTEN is closed."""
    opened: list[Any] = []

    async def listen_connect() -> Any:
        connection = await asyncpg.connect(pg_dsn)
        opened.append(connection)
        return connection

    options: dict[str, Any] = {"listen_connect": listen_connect} if dedicated else {}
    relay = OutboxRelay(pool, publisher, poll_interval=30.0, **options)
    stop = asyncio.Event()
    task = asyncio.create_task(relay.run(stop))
    pids: list[int] = []

    async def listening() -> bool:
        if task.done():
            task.result()  # raises what ended run()
        pid = await pool.fetchval(_LISTENING_BACKEND)
        if pid is None or pid in pids or relay.drains < len(pids) + 1:
            return False
        pids.append(pid)
        return True

    try:
        await wait_until(listening, within=10, what="the relay listening")
        assert await pool.fetchval("SELECT pg_terminate_backend($1)", pids[0])
        await wait_until(listening, within=10, what="the relay listening again")
        envelope = registered()
        await enqueue_all(pool, [envelope])

        async def published() -> bool:
            if task.done():
                task.result()
            return bool(
                await pool.fetchval(
                    "SELECT published_at IS NOT NULL FROM onex_outbox WHERE event_id = $1",
                    envelope.event_id,
                )
            )

        await wait_until(published, within=10, what="the row published after the reconnect")
        assert not task.done()
    finally:
        stop.set()
        await asyncio.wait_for(task, timeout=10)

    if dedicated:
        assert [connection.get_server_pid() for connection in opened] == pids
        assert all(connection.is_closed() for connection in opened)
    [record] = await topic_contents(settings.kafka, REGISTERED, 1)
    assert EventEnvelope.model_validate_json(record.value).event_id == envelope.event_id


async def test_events_enqueued_while_kafka_is_cut_are_all_delivered_after_restore(
    pool: Any,
) -> None:
    """The headline: 1000 events enqueued while a TCP proxy cuts Kafka off wait in the outbox
    (no attempt counted, nothing dead-lettered, the per-topic breakers open after 3 failures
    each), and after the restore the relay delivers all of them; the deduplicating consumer
    handles 1000 distinct events exactly once."""
    async with start_proxied_broker() as (bootstrap_servers, proxy):
        await create_topics(bootstrap_servers)
        kafka = KafkaSettings(
            bootstrap_servers=bootstrap_servers, request_timeout_ms=1000, delivery_timeout_ms=10_000
        )
        # open_seconds is short so that the test does not wait the default 20 s to probe.
        breaker_settings = BreakerSettings(failure_threshold=3, open_seconds=1.0)
        publisher = EventPublisher(kafka, BreakerRegistry(), breaker_settings=breaker_settings)
        await publisher.start()
        relay = OutboxRelay(pool, publisher, poll_interval=0.2)
        try:
            await proxy.cut()
            envelopes = [registered() for _ in range(700)] + [deregistered() for _ in range(300)]
            await enqueue_all(pool, envelopes)

            assert await relay.drain() == 0

            rows = await outbox_rows(pool)
            assert len(rows) == 1000
            assert all(row["published_at"] is None and row["attempts"] == 0 for row in rows)
            assert sum(row["last_error"] is not None for row in rows) == 6  # 3 per topic
            assert await pool.fetchval("SELECT count(*) FROM onex_dead_letters") == 0
            for topic in (REGISTERED, DEREGISTERED):
                snapshot = publisher.breaker(topic).snapshot()
                assert (snapshot.total_failures, snapshot.total_rejections) == (3, 1)
                assert snapshot.state is BreakerState.OPEN
            assert relay.totals.deferred == 6

            proxy.restore()
            stop = asyncio.Event()
            task = asyncio.create_task(relay.run(stop))
            try:

                async def outbox_empty() -> bool:
                    if task.done():
                        task.result()
                    return not await pool.fetchval(
                        "SELECT count(*) FROM onex_outbox WHERE published_at IS NULL"
                    )

                await wait_until(outbox_empty, within=60, what="the outbox drained after restore")
            finally:
                stop.set()
                await asyncio.wait_for(task, timeout=30)
        finally:
            await publisher.stop()

        handled: list[uuid.UUID] = []

        async def handle(envelope: EventEnvelope) -> None:
            handled.append(envelope.event_id)

        consumer = DedupingConsumer(
            kafka,
            [REGISTERED, DEREGISTERED],
            group_id=f"g-{uuid.uuid4().hex}",
            store=PostgresIdempotencyStore(pool),
        )
        stop = asyncio.Event()
        task = asyncio.create_task(consumer.run(handle, stop=stop))
        try:
            raw_total = 0
            for topic in (REGISTERED, DEREGISTERED):
                raw_total += len(await topic_contents(kafka, topic, 0))

            async def all_handled() -> bool:
                if task.done():
                    task.result()
                return consumer.stats.received >= raw_total

            await wait_until(all_handled, within=60, what="every record consumed")
        finally:
            stop.set()
            await task
            await consumer.stop()

    print(
        f"\nkafka cut/restore: enqueued=1000 raw_records={raw_total} "
        f"received={consumer.stats.received} handled={consumer.stats.handled} "
        f"duplicates={consumer.stats.duplicates} published_by_relay={relay.totals.published} "
        f"deferred_failures={relay.totals.deferred}"
    )
    assert raw_total >= 1000
    assert len(handled) == len(set(handled)) == 1000
    assert set(handled) == {envelope.event_id for envelope in envelopes}
    assert consumer.stats.duplicates == raw_total - 1000
