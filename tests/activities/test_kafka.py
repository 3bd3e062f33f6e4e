"""The Kafka publisher, handler and deduplicating consumer against a real broker and database.

The broker is the embedded Kafka-protocol broker (``backends``); each test gets its own topic
prefix with the catalog created under it. Unreachable brokers are a closed local port.
"""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from aiokafka.errors import KafkaConnectionError
from temporalio.exceptions import ApplicationError

from activities.base import HandlerConfig, HandlerResources
from activities.kafka import (
    DedupingConsumer,
    EventPublisher,
    KafkaHandler,
    PublishResult,
    client_options,
)
from activities.postgres import PostgresIdempotencyStore
from activities.resilience.boundary import ActivityBoundary
from activities.resilience.breaker import BreakerRegistry, BreakerState, CircuitOpenError
from contracts.errors import Transport
from contracts.events import EventEnvelope, new_envelope
from contracts.resilience import default_policy
from tests.activities.kafka_support import DEREGISTERED, REGISTERED, registered, with_kafka
from tests.support import free_port, wait_until
from workers.settings import KafkaSettings, OnexSettings


def unreachable(settings: OnexSettings) -> OnexSettings:
    """Settings whose broker is a closed local port, with the shortest timeouts allowed."""
    return with_kafka(
        settings,
        bootstrap_servers=f"127.0.0.1:{free_port()}",
        request_timeout_ms=1000,
        delivery_timeout_ms=10_000,
    )


async def read_topic(kafka: KafkaSettings, topic: str, count: int, within: float = 20) -> list[Any]:
    """At least ``count`` records of ``topic`` (all partitions, from the start)."""
    consumer = AIOKafkaConsumer(
        kafka.topic_prefix + topic,
        bootstrap_servers=kafka.bootstrap_servers,
        group_id=None,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    records: list[Any] = []

    async def enough() -> bool:
        for batch in (await consumer.getmany(timeout_ms=100)).values():
            records.extend(batch)
        return len(records) >= count

    try:
        await wait_until(enough, within=within, what=f"{count} records on {topic}")
    finally:
        await consumer.stop()
    return records


async def test_publish_envelope_lands_on_its_topic_with_key_and_headers(
    settings: OnexSettings, publisher: EventPublisher
) -> None:
    """An envelope goes to its (prefixed) topic, keyed by node_id, with correlation headers."""
    node_id = uuid.uuid4()
    envelope = registered(node_id)

    record = await publisher.publish_envelope(envelope)

    assert record.topic == REGISTERED
    assert record.offset >= 0
    [message] = await read_topic(settings.kafka, REGISTERED, 1)
    assert message.topic == settings.kafka.topic_prefix + REGISTERED
    assert message.partition == record.partition
    assert message.key == str(node_id).encode()
    assert EventEnvelope.model_validate_json(message.value) == envelope
    assert dict(message.headers) == {
        "correlation_id": str(envelope.correlation_id).encode(),
        "event_id": str(envelope.event_id).encode(),
        "event_type": REGISTERED.encode(),
    }
    assert publisher.breaker(REGISTERED).state is BreakerState.CLOSED


async def test_handler_publish_through_the_activity_boundary(settings: OnexSettings) -> None:
    """kafka.publish behind the real boundary returns where the event went."""
    breakers = BreakerRegistry()
    handler = KafkaHandler(HandlerResources(settings=settings, breakers=breakers))
    policy = default_policy(Transport.KAFKA)
    await handler.initialize(
        HandlerConfig(
            handler_name="kafka", transport=Transport.KAFKA, operations=("publish",), policy=policy
        )
    )
    boundary = ActivityBoundary(
        transport=Transport.KAFKA,
        target="kafka",
        policy=policy,
        breakers=breakers,
        breaker_key=KafkaHandler.breaker_key,
    )
    publish = boundary.wrap("publish", handler.publish)
    envelope = registered()
    try:
        result = await publish(envelope)
    finally:
        await handler.shutdown()

    assert result == PublishResult(
        topic=REGISTERED,
        partition=result.partition,
        offset=result.offset,
        event_id=envelope.event_id,
    )
    [message] = await read_topic(settings.kafka, REGISTERED, 1)
    assert (message.partition, message.offset) == (result.partition, result.offset)
    assert handler.describe().target == "kafka"
    assert [b.name for b in breakers.snapshot()] == [f"kafka:{REGISTERED}"]


async def test_unreachable_broker_is_a_retryable_failure(backends: OnexSettings) -> None:
    """With no broker: start() raises the native error, initialize() only logs it, and each
    publish through the boundary fails as a retryable connection/timeout error."""
    settings = unreachable(backends)
    publisher = EventPublisher(settings.kafka, BreakerRegistry())
    with pytest.raises(KafkaConnectionError):
        await publisher.start()
    assert not publisher.started

    breakers = BreakerRegistry()
    handler = KafkaHandler(HandlerResources(settings=settings, breakers=breakers))
    policy = default_policy(Transport.KAFKA)
    config = HandlerConfig(
        handler_name="kafka", transport=Transport.KAFKA, operations=("publish",), policy=policy
    )
    await handler.initialize(config)  # the worker still starts while Kafka is away
    boundary = ActivityBoundary(
        transport=Transport.KAFKA,
        target="kafka",
        policy=policy,
        breakers=breakers,
        breaker_key=KafkaHandler.breaker_key,
    )
    publish = boundary.wrap("publish", handler.publish)
    try:
        with pytest.raises(ApplicationError) as caught:
            await publish(registered())
    finally:
        await handler.shutdown()

    error = caught.value
    assert error.type == "InfraConnectionError"  # the lazy start's KafkaConnectionError
    assert error.non_retryable is False
    assert error.next_retry_delay is not None
    assert settings.kafka.bootstrap_servers not in str(error)
    assert (
        breakers.get(f"kafka:{REGISTERED}", policy.circuit_breaker).snapshot().total_failures == 1
    )


async def test_breaker_per_topic_opens_after_three_failures(backends: OnexSettings) -> None:
    """Three transport failures on one topic open its breaker; another topic's stays closed,
    and the boundary turns the open breaker into a retryable InfraUnavailableError."""
    settings = unreachable(backends)
    breakers = BreakerRegistry()
    publisher = EventPublisher(settings.kafka, breakers)
    envelope = registered()
    try:
        for _ in range(3):
            with pytest.raises(KafkaConnectionError):
                await publisher.publish_envelope(envelope)
        assert publisher.breaker(REGISTERED).state is BreakerState.OPEN

        with pytest.raises(CircuitOpenError) as rejected:
            await publisher.publish_envelope(envelope)
        assert 0 < rejected.value.retry_after <= 20

        # The other topic still tries the broker (and fails on its own account).
        other = new_envelope(
            DEREGISTERED, {"node_id": str(uuid.uuid4())}, correlation_id=uuid.uuid4()
        )
        with pytest.raises(KafkaConnectionError):
            await publisher.publish_envelope(other)
        assert publisher.breaker(DEREGISTERED).state is BreakerState.CLOSED
        assert publisher.breaker(DEREGISTERED).snapshot().consecutive_failures == 1

        # The activity path shares the breaker: rejected without a network call.
        handler = KafkaHandler(
            HandlerResources(
                settings=settings, breakers=breakers, clients={"kafka.publisher": publisher}
            )
        )
        boundary = ActivityBoundary(
            transport=Transport.KAFKA,
            target="kafka",
            policy=default_policy(Transport.KAFKA),
            breakers=breakers,
            breaker_key=KafkaHandler.breaker_key,
        )
        with pytest.raises(ApplicationError) as caught:
            await boundary.wrap("publish", handler.publish)(envelope)
        assert caught.value.type == "InfraUnavailableError"
        assert caught.value.non_retryable is False
        assert caught.value.next_retry_delay is not None
        assert publisher.breaker(REGISTERED).snapshot().total_rejections == 2
    finally:
        await publisher.stop()


async def test_deduping_consumer_handles_each_event_once(
    settings: OnexSettings, publisher: EventPublisher, pool: Any
) -> None:
    """One envelope published 3 times and 2 others reach the handler once each; a record that
    is not an envelope is skipped; offsets are committed."""
    repeated = registered()
    others = [registered(), registered()]
    for envelope in [repeated, repeated, *others, repeated]:
        await publisher.publish_envelope(envelope)
    await publisher.publish(REGISTERED, b"not json", key=b"k", headers=[])

    handled: list[uuid.UUID] = []

    async def handle(envelope: EventEnvelope) -> None:
        handled.append(envelope.event_id)

    group = f"g-{uuid.uuid4().hex}"
    consumer = DedupingConsumer(
        settings.kafka, [REGISTERED], group_id=group, store=PostgresIdempotencyStore(pool)
    )
    stop = asyncio.Event()
    task = asyncio.create_task(consumer.run(handle, stop=stop))
    try:

        async def all_seen() -> bool:
            if task.done():
                task.result()  # surface a crash of the consumer at once
            return consumer.stats.received >= 6

        await wait_until(all_seen, within=30, what="6 records consumed")
    finally:
        stop.set()
        await task
        await consumer.stop()

    assert sorted(handled) == sorted([repeated.event_id, *(e.event_id for e in others)])
    assert (consumer.stats.handled, consumer.stats.duplicates, consumer.stats.skipped) == (3, 2, 1)
    rows = await pool.fetch(
        "SELECT message_id FROM onex_processed_messages WHERE domain = $1", group
    )
    assert len(rows) == 3


async def test_deduping_consumer_redelivers_after_a_failed_handle(
    settings: OnexSettings, publisher: EventPublisher, pool: Any
) -> None:
    """A handler failure forgets the event and rewinds, so the next run handles it."""
    envelope = registered()
    await publisher.publish_envelope(envelope)
    calls: list[uuid.UUID] = []

    async def flaky(event: EventEnvelope) -> None:
        calls.append(event.event_id)
        if len(calls) == 1:
            raise RuntimeError("first delivery fails")

    consumer = DedupingConsumer(
        settings.kafka,
        [REGISTERED],
        group_id=f"g-{uuid.uuid4().hex}",
        store=PostgresIdempotencyStore(pool),
    )
    stop = asyncio.Event()
    try:
        with pytest.raises(RuntimeError, match="first delivery fails"):
            await asyncio.wait_for(consumer.run(flaky, stop=stop), timeout=30)
        task = asyncio.create_task(consumer.run(flaky, stop=stop))

        async def handled() -> bool:
            return consumer.stats.handled == 1

        await wait_until(handled, within=20, what="the redelivered event handled")
        stop.set()
        await task
    finally:
        await consumer.stop()
    assert calls == [envelope.event_id, envelope.event_id]


async def test_consumer_rejects_topics_outside_the_catalog(settings: OnexSettings) -> None:
    """A consumer is only for catalog topics."""
    with pytest.raises(ValueError, match="not catalog topics"):
        DedupingConsumer(
            settings.kafka, ["orders.created"], group_id="g", store=PostgresIdempotencyStore(None)
        )


async def test_idempotency_store_has_one_winner_under_a_race(pool: Any) -> None:
    """50 concurrent check_and_record calls for one id: exactly one True; other domains apart."""
    store = PostgresIdempotencyStore(pool)
    message_id = uuid.uuid4()

    results = await asyncio.gather(
        *(store.check_and_record("registry", message_id, uuid.uuid4()) for _ in range(50))
    )

    assert results.count(True) == 1
    assert await store.check_and_record("other-domain", message_id) is True
    assert await store.check_and_record("registry", message_id) is False
    await store.discard("registry", message_id)
    assert await store.check_and_record("registry", message_id) is True


async def test_sasl_password_comes_from_the_secret_source(backends: OnexSettings) -> None:
    """With a SASL user, the password is resolved through the secret source, not settings."""
    asked: list[str] = []

    class Secrets:
        async def get_secret(self, name: str, *, required: bool = True) -> Any:
            asked.append(name)
            return "s3cr3t-from-vault"

        async def refresh(self, name: str) -> None:
            return None

    kafka = with_kafka(backends, sasl_username="onex").kafka
    options = await client_options(kafka, Secrets())
    assert asked == ["kafka.sasl.password"]
    assert options["security_protocol"] == "SASL_PLAINTEXT"
    assert options["sasl_mechanism"] == "PLAIN"
    assert options["sasl_plain_password"] == "s3cr3t-from-vault"
    assert options["sasl_plain_username"] == "onex"
