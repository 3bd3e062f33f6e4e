"""The Kafka publisher, handler and deduplicating consumer against a real broker and database.

The broker is the embedded Kafka-protocol broker (``backends``); each test gets its own topic
prefix with the catalog created under it. Unreachable brokers are a closed local port.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.errors import KafkaConnectionError, NodeNotReadyError
from pydantic import SecretStr
from temporalio.exceptions import ApplicationError

from activities.base import HandlerConfig, HandlerResources
from activities.kafka import (
    DedupingConsumer,
    EventPublisher,
    KafkaHandler,
    PublishResult,
    client_options,
)
from activities.kafka_admin import create_topics
from activities.postgres import PostgresIdempotencyStore
from activities.resilience.boundary import ActivityBoundary
from activities.resilience.breaker import BreakerRegistry, BreakerState, CircuitOpenError
from activities.settings import KafkaSettings, SecretsSettings
from activities.vault import SecretResolver
from contracts.errors import Transport
from contracts.events import EventEnvelope, new_envelope
from contracts.resilience import default_policy
from tests.activities.kafka_support import DEREGISTERED, REGISTERED, registered, with_kafka
from tests.fakes import planted
from tests.fakes.fault_proxy import start_proxied_broker
from tests.support import free_port, wait_until
from workers.settings import OnexSettings


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
    handler, publish = await guarded_handler(settings, breakers)
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
    # initialize() succeeds: the worker still starts while Kafka is away.
    handler, publish = await guarded_handler(settings, breakers)
    policy = default_policy(Transport.KAFKA)
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
        _, publish = await guarded_handler(
            settings, breakers, clients={"kafka.publisher": publisher}
        )
        with pytest.raises(ApplicationError) as caught:
            await publish(envelope)
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
    """A handler failure records nothing and rewinds, so the next run handles it."""
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


REPO = Path(__file__).resolve().parents[2]


async def _consumer_process(
    settings: OnexSettings, pg_dsn: str, group: str, mode: str
) -> asyncio.subprocess.Process:
    """``tests/activities/consumer_process.py`` in a process of its own."""
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.activities.consumer_process",
        "--bootstrap",
        settings.kafka.bootstrap_servers,
        "--prefix",
        settings.kafka.topic_prefix,
        "--group",
        group,
        "--dsn",
        pg_dsn,
        "--mode",
        mode,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def _line(process: asyncio.subprocess.Process, within: float) -> str:
    """The process's next line on standard output; its standard error if it exited instead."""
    assert process.stdout is not None
    assert process.stderr is not None
    line = await asyncio.wait_for(process.stdout.readline(), within)
    if not line:
        await process.wait()
        error = (await process.stderr.read()).decode(errors="replace")
        raise AssertionError(f"the consumer exited {process.returncode}: {error[-2000:]}")
    return line.decode().strip()


async def test_a_consumer_killed_before_recording_loses_nothing(
    settings: OnexSettings, publisher: EventPublisher, pool: Any, pg_dsn: str
) -> None:
    """A consumer process is killed (SIGKILL) while its handler runs, after a message was
    delivered and before the handler returned, so before the message could be recorded as
    processed. Restarted in the same group, the consumer handles that message and the other
    one: nothing is lost (recording before handling would have lost the first for good, its
    redelivery skipped as a duplicate), each effect happens once and both are recorded."""
    first, second = registered(), registered()
    for envelope in (first, second):
        await publisher.publish_envelope(envelope)
    await pool.execute("CREATE TABLE consumer_effects (event_id uuid NOT NULL)")
    group = f"g-{uuid.uuid4().hex}"

    stalled = await _consumer_process(settings, pg_dsn, group, "stall")
    try:
        # The two may sit on different partitions: whichever comes first is the one cut short.
        assert await _line(stalled, within=60) in {
            f"handling {first.event_id}",
            f"handling {second.event_id}",
        }
    finally:
        stalled.send_signal(signal.SIGKILL)
        await stalled.wait()
    assert stalled.returncode == -signal.SIGKILL
    recorded = "SELECT message_id FROM onex_processed_messages WHERE domain = $1"
    assert await pool.fetch(recorded, group) == [], "recorded before the handler returned"

    restarted = await _consumer_process(settings, pg_dsn, group, "handle")
    try:
        # The killed member holds the partitions until its session times out (10 s).
        handled = {await _line(restarted, within=60) for _ in range(2)}
        assert handled == {f"handled {first.event_id}", f"handled {second.event_id}"}

        async def both_recorded() -> bool:
            return len(await pool.fetch(recorded, group)) == 2

        await wait_until(both_recorded, within=10, what="both messages recorded as processed")
    finally:
        if restarted.returncode is None:
            restarted.send_signal(signal.SIGTERM)
        await asyncio.wait_for(restarted.wait(), 30)
    assert restarted.returncode == 0
    effects = await pool.fetch("SELECT event_id FROM consumer_effects")
    assert sorted(row["event_id"] for row in effects) == sorted([first.event_id, second.event_id])
    assert {row["message_id"] for row in await pool.fetch(recorded, group)} == {
        first.event_id,
        second.event_id,
    }


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
    assert await store.is_processed("registry", message_id) is True
    assert await store.is_processed("registry", uuid.uuid4()) is False


async def test_sasl_password_comes_from_the_secret_source(backends: OnexSettings) -> None:
    """With a SASL user, the password is resolved through the secret source, not settings."""
    asked: list[str] = []

    class Secrets:
        async def get_secret(self, name: str, *, required: bool = True) -> Any:
            asked.append(name)
            return planted.SASL_PASSWORD

        async def refresh(self, name: str) -> None:
            return None

    kafka = with_kafka(backends, sasl_username="onex").kafka
    options = await client_options(kafka, Secrets())
    assert asked == ["kafka.sasl.password"]
    assert options["security_protocol"] == "SASL_PLAINTEXT"
    assert options["sasl_mechanism"] == "PLAIN"
    assert options["sasl_plain_password"] == planted.SASL_PASSWORD
    assert options["sasl_plain_username"] == "onex"


async def test_sasl_password_falls_back_to_settings_when_the_store_lacks_it(
    backends: OnexSettings,
) -> None:
    """A secret resolver with no source for ``kafka.sasl.password`` (as in a worker whose
    secrets live in settings) is asked without ``required``: the settings' password is used,
    no SecretResolutionError."""
    resolver = SecretResolver(SecretsSettings(env_fallback=False))
    kafka = with_kafka(
        backends, sasl_username="onex", sasl_password=SecretStr("from-settings-pw")
    ).kafka

    options = await client_options(kafka, resolver)

    assert options["sasl_plain_username"] == "onex"
    assert options["sasl_plain_password"] == "from-settings-pw"
    assert resolver.stats().misses == 1


# -- error classes through a fault proxy: timeout, not found, breaker recovery ----------------


class FakeClock:
    """A monotonic clock for the breakers, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def fast_kafka(bootstrap_servers: str) -> KafkaSettings:
    """Settings for a private broker, with the shortest timeouts allowed (1 s request, 10 s
    delivery)."""
    return KafkaSettings(
        bootstrap_servers=bootstrap_servers, request_timeout_ms=1000, delivery_timeout_ms=10_000
    )


async def guarded_handler(
    settings: OnexSettings, breakers: BreakerRegistry, *, clients: dict[str, Any] | None = None
) -> tuple[KafkaHandler, Callable[[EventEnvelope], Awaitable[PublishResult]]]:
    """A KafkaHandler (its own publisher unless ``clients`` has one), and its publish behind
    the boundary as the worker builds it (per-topic breakers from ``breakers``)."""
    policy = default_policy(Transport.KAFKA)
    handler = KafkaHandler(
        HandlerResources(settings=settings.kafka, breakers=breakers, clients=clients or {})
    )
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
    return handler, boundary.wrap("publish", handler.publish)


def failure_causes(logs: list[Any]) -> list[str]:
    """The native exception class of each failure the boundary logged."""
    return [entry["cause"] for entry in logs if entry["event"] == "operation_failed"]


async def test_slow_broker_is_a_retryable_timeout() -> None:
    """Timeout: the broker answers, but 3 s late (a FaultProxy delay on every byte), and the
    producer's request timeout is 1 s. The publish through the boundary gives up after about
    1 s, before the late answer could arrive, as a retryable InfraTimeoutError with a retry
    delay, and the timeout counts against the topic's breaker.

    What aiokafka raises, as observed: once the producer has the topic's metadata and a
    connection (the first publish, at full speed), the produce request times out client-side
    and aiokafka reports it as the produce error RequestTimedOutError (not KafkaTimeoutError);
    the classifier maps it to InfraTimeoutError. (A producer that never reached the broker
    fails the connection handshake instead, NodeNotReadyError: InfraUnavailableError.)
    """
    breakers = BreakerRegistry()
    async with start_proxied_broker() as (bootstrap, proxy):
        await create_topics(bootstrap)
        handler, publish = await guarded_handler(
            OnexSettings(kafka=fast_kafka(bootstrap)), breakers
        )
        try:
            await publish(registered())  # metadata and a broker connection, at full speed
            proxy.set_delay(3)
            with (
                structlog.testing.capture_logs() as logs,
                pytest.raises(ApplicationError) as caught,
            ):
                await publish(registered())
        finally:
            proxy.set_delay(0)
            await handler.shutdown(10)

    error = caught.value
    assert error.type == "InfraTimeoutError"
    assert error.non_retryable is False
    assert error.next_retry_delay is not None
    # The request timed out (not a late answer 3 s later): the 1 s request timeout applied.
    assert failure_causes(logs) == ["RequestTimedOutError"]
    assert bootstrap not in str(error)
    breaker = breakers.get(f"kafka:{REGISTERED}", default_policy(Transport.KAFKA).circuit_breaker)
    snapshot = breaker.snapshot()
    assert (snapshot.state, snapshot.total_successes, snapshot.total_failures) == (
        BreakerState.CLOSED,
        1,
        1,
    )


async def test_topic_missing_on_the_broker_is_a_non_retryable_configuration_error(
    backends: OnexSettings,
) -> None:
    """Not found: the catalog topic does not exist on the broker, and cannot be created there.

    The embedded broker (tansu) creates a topic on the first produce to it (checked: a
    publish under a prefix for which create_topics was never called succeeds), so a valid
    name that was never created is never "not found" here. A name the broker cannot have is:
    under a prefix with a space, the broker answers each metadata request with INVALID_TOPIC
    for it and never lists it, and aiokafka gives up after request_timeout_ms with
    UnknownTopicOrPartitionError, as it does against a Kafka broker with topic auto-creation
    off. A catalog topic missing on the broker is a deployment problem: the classifier makes
    it a ConfigurationError, so the boundary fails non-retryable without a retry delay, and
    the topic's breaker counts the broker's answer as a success (the broker is up).
    """
    prefix = f"no such {uuid.uuid4().hex[:8]}."
    settings = with_kafka(
        backends, topic_prefix=prefix, request_timeout_ms=1000, delivery_timeout_ms=10_000
    )
    breakers = BreakerRegistry()
    handler, publish = await guarded_handler(settings, breakers)
    try:
        with structlog.testing.capture_logs() as logs, pytest.raises(ApplicationError) as caught:
            await publish(registered())
    finally:
        await handler.shutdown(10)

    error = caught.value
    assert error.type == "ConfigurationError"
    assert error.non_retryable is True
    assert error.next_retry_delay is None
    assert failure_causes(logs) == ["UnknownTopicOrPartitionError"]
    assert prefix not in str(error)
    breaker = breakers.get(f"kafka:{REGISTERED}", default_policy(Transport.KAFKA).circuit_breaker)
    snapshot = breaker.snapshot()
    assert (snapshot.state, snapshot.total_successes, snapshot.total_failures) == (
        BreakerState.CLOSED,
        1,
        0,
    )
    admin = AIOKafkaAdminClient(bootstrap_servers=backends.kafka.bootstrap_servers)
    await admin.start()
    try:
        topics = await admin.list_topics()
    finally:
        await admin.close()
    assert REGISTERED in {topic.removeprefix(settings.kafka.topic_prefix) for topic in topics}
    assert prefix + REGISTERED not in topics, "the broker created the topic after all"


async def test_breaker_per_topic_recovers_after_its_open_time() -> None:
    """Breaker recovery: the proxy to the broker is cut, three publishes fail
    (NodeNotReadyError after the 1 s request timeout, a transport failure) and the topic's
    breaker opens. It keeps rejecting without a network call until open_seconds (20 s, on a
    fake clock) have passed; then, with the proxy restored, it is half-open, the first probe
    success leaves it half-open (success_threshold 2) and the second closes it."""
    settings = default_policy(Transport.KAFKA).circuit_breaker
    assert (settings.failure_threshold, settings.open_seconds) == (3, 20)
    assert settings.success_threshold == 2
    clock = FakeClock()
    async with start_proxied_broker() as (bootstrap, proxy):
        await create_topics(bootstrap)
        publisher = EventPublisher(fast_kafka(bootstrap), BreakerRegistry(clock=clock))
        breaker = publisher.breaker(REGISTERED)
        try:
            await publisher.publish_envelope(registered())
            await proxy.cut()
            for _ in range(3):
                with pytest.raises(NodeNotReadyError):
                    await publisher.publish_envelope(registered())
            assert breaker.state is BreakerState.OPEN

            clock.now += settings.open_seconds - 1
            with pytest.raises(CircuitOpenError) as rejected:  # the breaker, not the broker
                await publisher.publish_envelope(registered())
            assert rejected.value.retry_after == pytest.approx(1.0)

            proxy.restore()
            clock.now += 1.5
            assert breaker.state is BreakerState.HALF_OPEN
            first = await publisher.publish_envelope(registered())
            assert breaker.state is BreakerState.HALF_OPEN
            second = await publisher.publish_envelope(registered())
            assert breaker.state is BreakerState.CLOSED
        finally:
            await publisher.stop()

    assert first.topic == second.topic == REGISTERED
    assert first.offset >= 0
    assert second.offset >= 0
    snapshot = breaker.snapshot()
    assert (snapshot.total_failures, snapshot.total_rejections, snapshot.total_successes) == (
        3,
        1,
        3,
    )
    assert snapshot.consecutive_failures == 0
