"""Kafka: the event publisher, the ``kafka`` handler, and the consumer helper (SPEC §5).

* :class:`EventPublisher` owns one ``AIOKafkaProducer`` (``acks="all"``; idempotence, request
  timeout, client id and SASL/PLAIN from :class:`~activities.settings.KafkaSettings`). Every publish
  passes through a circuit breaker **per topic** (``kafka:<catalog topic>`` in the process's
  :class:`~activities.resilience.breaker.BreakerRegistry`, default settings 3 failures / 20 s).
  Only transport failures (connection, timeout, unavailable, as decided by
  :func:`~activities.resilience.classify.classify`) count against a breaker; the native exception
  is re-raised for the caller to classify, and an open breaker raises
  :class:`~activities.resilience.breaker.CircuitOpenError` without touching the network.
  Catalog topic names are prefixed with ``KafkaSettings.topic_prefix`` on the wire.
* The producer is started lazily: :meth:`EventPublisher.start` may fail when the broker is down
  (``AIOKafkaProducer.start`` bootstraps the cluster metadata), and :class:`KafkaHandler` only
  logs that at ``initialize``, so a worker still starts while Kafka is away. The next publish
  tries to start it again, inside the topic's breaker: the failure surfaces as the native
  ``KafkaConnectionError``, which the activity boundary maps to a retryable
  ``InfraConnectionError``.
* A publish is bounded: aiokafka waits at most ``request_timeout_ms`` for topic metadata and
  expires an undelivered batch after ``request_timeout_ms``; ``delivery_timeout_ms`` bounds the
  whole call on top of that (``TimeoutError``, classified as ``InfraTimeoutError``). A message
  whose wait timed out may still be delivered later: delivery is at least once and consumers
  dedupe on ``event_id``.
* :class:`KafkaHandler` is the ``kafka`` handler: one operation, ``publish(envelope)``. Its
  activity boundary guards each call with the topic's breaker, so the handler publishes with
  ``breaker=False`` (one breaker per topic, each call counted once). The worker must build the
  boundary with ``breaker_key=KafkaHandler.breaker_key``; without it the boundary falls back to
  one breaker for the whole target (``kafka:kafka``).
* :class:`DedupingConsumer` consumes catalog topics in a consumer group with manual commits,
  skips what it cannot parse, and calls the handler for each ``event_id`` not yet processed
  (an :class:`IdempotencyStore` such as ``activities.postgres.PostgresIdempotencyStore``
  remembers them). A message is recorded as processed only after its handler returned: a
  crash in between delivers it again (at least once), never loses it.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import structlog
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from pydantic import BaseModel, ConfigDict, ValidationError

from activities.base import (
    HandlerBase,
    HandlerConfig,
    HandlerResources,
    SecretSource,
    secret_or_setting,
)
from activities.resilience.breaker import BreakerRegistry, CircuitBreaker
from activities.resilience.classify import classify
from activities.resilience.correlation import correlation_scope, kafka_headers
from activities.resilience.sanitize import register_secret, sanitize_exception, sanitize_text
from activities.settings import KafkaSettings
from contracts.errors import ErrorContext, Transport
from contracts.events import EventEnvelope
from contracts.resilience import BreakerSettings, default_policy
from contracts.topics import TOPICS_BY_NAME

__all__ = [
    "EVENT_PUBLISHER",
    "SASL_PASSWORD_SECRET",
    "DedupingConsumer",
    "EventPublisher",
    "IdempotencyStore",
    "KafkaHandler",
    "PublishResult",
    "PublishedRecord",
    "client_options",
    "envelope_headers",
]

logger = structlog.get_logger("onex.kafka")

CONSUMER_MIN_REQUEST_MS = 40_000  # aiokafka's consumer default, above its 10 s session timeout
SASL_PASSWORD_SECRET = "kafka.sasl.password"  # noqa: S105 - a logical secret name, not a secret
EVENT_PUBLISHER = "kafka.event_publisher"
"""The name under which :class:`KafkaHandler` offers its :class:`EventPublisher` to peers."""


@dataclass(frozen=True, slots=True)
class PublishedRecord:
    """Where the broker stored a record (the fields of aiokafka's ``RecordMetadata`` we use)."""

    topic: str
    partition: int
    offset: int


def envelope_headers(envelope: EventEnvelope) -> list[tuple[str, bytes]]:
    """The Kafka headers of an envelope: correlation id, event id and event type."""
    return [
        *kafka_headers(envelope.correlation_id),
        ("event_id", str(envelope.event_id).encode()),
        ("event_type", envelope.event_type.encode()),
    ]


async def client_options(kafka: KafkaSettings, secrets: SecretSource | None) -> dict[str, Any]:
    """Client options shared by producers and consumers: identity, timeouts and SASL/PLAIN."""
    options: dict[str, Any] = {
        "bootstrap_servers": kafka.bootstrap_servers,
        "client_id": kafka.client_id,
        "request_timeout_ms": kafka.request_timeout_ms,
    }
    if kafka.sasl_username:
        secret = await secret_or_setting(secrets, SASL_PASSWORD_SECRET, kafka.sasl_password)
        password = None if secret is None else secret.get_secret_value()
        register_secret(password)  # scrubbed from any text that reaches a log
        options.update(
            security_protocol="SASL_PLAINTEXT",
            sasl_mechanism="PLAIN",
            sasl_plain_username=kafka.sasl_username,
            sasl_plain_password=password,
        )
    return options


class EventPublisher:
    """One producer for the process, with a circuit breaker per topic.

    ``breakers`` should be the worker's registry, shared with the activity boundaries, so that
    the outbox relay and the ``kafka.publish`` activity see the same state for a topic.
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        breakers: BreakerRegistry,
        *,
        secrets: SecretSource | None = None,
        breaker_settings: BreakerSettings | None = None,
    ) -> None:
        self.kafka = kafka
        self.breakers = breakers
        self.breaker_settings = breaker_settings or default_policy(Transport.KAFKA).circuit_breaker
        self._secrets = secrets
        self._producer: Any = None
        self._lock = asyncio.Lock()
        self._delivery_timeout = kafka.delivery_timeout_ms / 1000

    @property
    def started(self) -> bool:
        return self._producer is not None

    def breaker(self, topic: str) -> CircuitBreaker:
        """The breaker guarding ``topic`` (a catalog name, without the prefix)."""
        return self.breakers.get(f"{Transport.KAFKA.value}:{topic}", self.breaker_settings)

    async def start(self) -> None:
        """Connect the producer; raises the native error (the producer is not kept) on failure."""
        async with self._lock:
            await self._start_locked()

    async def _start_locked(self) -> Any:
        if self._producer is not None:
            return self._producer
        producer = AIOKafkaProducer(
            acks="all",
            enable_idempotence=self.kafka.enable_idempotence,
            **await client_options(self.kafka, self._secrets),
        )
        try:
            await producer.start()
        except BaseException:
            await _quietly_stop(producer)
            raise
        self._producer = producer
        logger.info("kafka_producer_started", client_id=self.kafka.client_id)
        return producer

    async def stop(self) -> None:
        """Flush what is pending and close the producer (idempotent)."""
        async with self._lock:
            producer, self._producer = self._producer, None
        if producer is not None:
            await producer.stop()
            logger.info("kafka_producer_stopped", client_id=self.kafka.client_id)

    async def publish(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None,
        headers: list[tuple[str, bytes]],
        breaker: bool = True,
    ) -> PublishedRecord:
        """Send one record to catalog topic ``topic`` and wait for the broker's acknowledgement.

        Raises :class:`CircuitOpenError` while the topic's breaker is open, else the native
        exception of a failed publish. ``breaker=False`` is for callers that already guard the
        call with the same breaker (the activity boundary of :class:`KafkaHandler`).
        """
        if not breaker:
            return await self._send(topic, value, key, headers)
        context = ErrorContext(transport=Transport.KAFKA, operation="publish", target=topic)

        def transport_failure(exc: Exception) -> bool:
            # The broker answering (e.g. refusing the record) says it is up.
            return classify(exc, context).transport_failure

        async with self.breaker(topic).guard(is_failure=transport_failure):
            return await self._send(topic, value, key, headers)

    async def publish_envelope(
        self, envelope: EventEnvelope, *, breaker: bool = True
    ) -> PublishedRecord:
        """Publish an envelope to its topic, keyed by its topic's key field, with its headers."""
        return await self.publish(
            envelope.event_type,
            envelope.model_dump_json().encode(),
            key=envelope.key(),
            headers=envelope_headers(envelope),
            breaker=breaker,
        )

    async def _send(
        self, topic: str, value: bytes, key: bytes | None, headers: list[tuple[str, bytes]]
    ) -> PublishedRecord:
        producer = self._producer
        if producer is None:
            async with self._lock:
                producer = await self._start_locked()
        async with asyncio.timeout(self._delivery_timeout):
            delivery = await producer.send(
                self.kafka.topic_prefix + topic, value, key=key, headers=headers
            )
            metadata = await delivery
        return PublishedRecord(topic=topic, partition=metadata.partition, offset=metadata.offset)


async def _quietly_stop(client: Any) -> None:
    """Close a client that failed to start (it holds sockets and tasks until closed)."""
    try:
        await client.stop()
    except Exception as exc:  # closing a half-started client: nothing useful to report upward
        logger.debug("kafka_client_stop_failed", error=sanitize_exception(exc))


# ---------------------------------------------------------------------------------------------
# The handler


class PublishResult(BaseModel):
    """Where the event went: the catalog topic, its partition and offset."""

    model_config = ConfigDict(frozen=True)

    topic: str
    partition: int
    offset: int
    event_id: uuid.UUID


class KafkaHandler(HandlerBase):
    """The ``kafka`` handler: publishes event envelopes (one attempt per activity attempt).

    It uses the process's shared :class:`EventPublisher` (``resources.clients["kafka.publisher"]``)
    when the composition root made one, else its own, started at ``initialize`` (a broker that
    is down is only logged there) and stopped at ``shutdown``. It lends the publisher to the
    other handlers (:meth:`offers`), so the outbox relay publishes through the same breakers.
    """

    transport = Transport.KAFKA
    settings_type = KafkaSettings
    secret_names = (SASL_PASSWORD_SECRET,)
    CLIENT_KEY = "kafka.publisher"

    def __init__(self, resources: HandlerResources[KafkaSettings]) -> None:
        super().__init__(resources)
        self._settings = resources.settings
        self._publisher: EventPublisher | None = None
        self._owns_publisher = False

    @property
    def target(self) -> str:
        return "kafka"

    @staticmethod
    def breaker_key(envelope: EventEnvelope, *_args: Any, **_kwargs: Any) -> str:
        """The boundary's breaker key for a publish: its topic (breaker ``kafka:<topic>``)."""
        return envelope.event_type

    @property
    def publisher(self) -> EventPublisher:
        if self._publisher is None:
            shared = self.resources.clients.get(self.CLIENT_KEY)
            if shared is not None:
                self._publisher = shared
            else:
                policy = self.config.policy if self.config else default_policy(Transport.KAFKA)
                self._publisher = EventPublisher(
                    self._settings,
                    self.resources.breakers,
                    secrets=self.resources.secrets,
                    breaker_settings=policy.circuit_breaker,
                )
                self._owns_publisher = True
        return self._publisher

    def offers(self) -> Mapping[str, object]:
        return {EVENT_PUBLISHER: self.publisher}

    async def initialize(self, config: HandlerConfig) -> None:
        await super().initialize(config)
        publisher = self.publisher
        if not self._owns_publisher:
            return
        try:
            await publisher.start()
        except Exception as exc:
            # Kafka being down must not stop the worker: the first publish starts it again.
            logger.warning(
                "kafka_unavailable_at_start",
                error=sanitize_text(classify(exc, self._context("initialize")).message),
            )

    async def shutdown(self, timeout_seconds: float = 30.0) -> None:
        if self._owns_publisher and self._publisher is not None:
            try:
                async with asyncio.timeout(timeout_seconds):
                    await self._publisher.stop()  # flushes what is in flight
            except TimeoutError:
                logger.warning("kafka_producer_stop_timed_out", timeout_seconds=timeout_seconds)

    async def publish(self, envelope: EventEnvelope) -> PublishResult:
        """Publish one envelope to its catalog topic (one attempt; raises on failure)."""
        record = await self.publisher.publish_envelope(envelope, breaker=False)
        return PublishResult(
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            event_id=envelope.event_id,
        )

    def _context(self, operation: str) -> ErrorContext:
        return ErrorContext(transport=self.transport, operation=operation, target=self.target)


# ---------------------------------------------------------------------------------------------
# Consuming


@runtime_checkable
class IdempotencyStore(Protocol):
    """Remembers processed messages; exactly one recorder gets True for a (domain, id) pair."""

    async def is_processed(self, domain: str, message_id: uuid.UUID) -> bool: ...

    async def check_and_record(
        self, domain: str, message_id: uuid.UUID, correlation_id: uuid.UUID | None = None
    ) -> bool: ...


Handle = Callable[[EventEnvelope], Awaitable[None]]


@dataclass
class ConsumerStats:
    """What a :class:`DedupingConsumer` saw: raw records, handled, duplicates, unparsable."""

    received: int = 0
    handled: int = 0
    duplicates: int = 0
    skipped: int = 0


class DedupingConsumer:
    """Consume catalog topics in a consumer group; handle each ``event_id`` at least once,
    and once unless a crash comes between handling and recording.

    An envelope whose ``event_id`` the store has already processed is a duplicate, skipped.
    Any other is handed to ``handle``, and recorded as processed only once ``handle`` returned:
    a process that dies while handling (or before recording) has recorded nothing, so the
    redelivery is handled, never dropped. Recording first would lose that message for good.
    The price is a second delivery to ``handle`` when the crash comes after its effect and
    before the record: handlers are written for at-least-once delivery.

    Offsets are committed manually, after the records of a fetched batch were handled (or
    skipped), so a crash redelivers at most that batch, which the store deduplicates. A record
    that is not an :class:`EventEnvelope` is logged (sanitized) and skipped. If ``handle``
    raises, nothing is recorded, the partition is rewound to the record, what was handled
    before it is committed, and the exception propagates out of :meth:`run`.
    """

    def __init__(
        self,
        kafka: KafkaSettings,
        topics: Sequence[str],
        *,
        group_id: str,
        store: IdempotencyStore,
        secrets: SecretSource | None = None,
        auto_offset_reset: str = "earliest",
        max_records: int = 500,
        poll_timeout_ms: int = 200,
    ) -> None:
        unknown = [topic for topic in topics if topic not in TOPICS_BY_NAME]
        if unknown or not topics:
            raise ValueError(f"not catalog topics (contracts/topics.py): {unknown or 'none'}")
        self.kafka = kafka
        self.topics = tuple(topics)
        self.group_id = group_id
        self.store = store
        self.stats = ConsumerStats()
        self._secrets = secrets
        self._auto_offset_reset = auto_offset_reset
        self._max_records = max_records
        self._poll_timeout_ms = poll_timeout_ms
        self._consumer: Any = None
        self._log = logger.bind(group_id=group_id)

    async def start(self) -> None:
        if self._consumer is not None:
            return
        options = await client_options(self.kafka, self._secrets)
        # A JoinGroup request is answered only when the rebalance completes (up to the session
        # timeout, 10 s): a shorter request timeout, fine for producers, would never join.
        options["request_timeout_ms"] = max(options["request_timeout_ms"], CONSUMER_MIN_REQUEST_MS)
        consumer = AIOKafkaConsumer(
            *(self.kafka.topic_prefix + topic for topic in self.topics),
            group_id=self.group_id,
            enable_auto_commit=False,
            auto_offset_reset=self._auto_offset_reset,
            **options,
        )
        try:
            await consumer.start()
        except BaseException:
            await _quietly_stop(consumer)
            raise
        self._consumer = consumer

    async def stop(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await consumer.stop()

    async def __aenter__(self) -> DedupingConsumer:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await self.stop()

    async def run(self, handle: Handle, *, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set (checked between fetches of at most poll_timeout_ms)."""
        await self.start()
        consumer = self._consumer
        while not stop.is_set():
            batches = await consumer.getmany(
                timeout_ms=self._poll_timeout_ms, max_records=self._max_records
            )
            for partition, records in batches.items():
                await self._process(consumer, partition, records, handle)

    async def _process(
        self, consumer: Any, partition: Any, records: Sequence[Any], handle: Handle
    ) -> None:
        next_offset: int | None = None
        try:
            for record in records:
                self.stats.received += 1
                envelope = self._parse(record)
                if envelope is not None:
                    await self._deliver(consumer, partition, record, envelope, handle)
                next_offset = record.offset + 1
        finally:
            if next_offset is not None:
                await self._commit(consumer, partition, next_offset)

    def _parse(self, record: Any) -> EventEnvelope | None:
        try:
            return EventEnvelope.model_validate_json(record.value or b"")
        except ValidationError as exc:
            fields = sorted({".".join(map(str, e["loc"])) for e in exc.errors(include_input=False)})
            self._log.warning(
                "kafka_message_undeserializable",
                topic=record.topic,
                partition=record.partition,
                offset=record.offset,
                error=sanitize_text(f"{type(exc).__name__} in {', '.join(fields) or 'message'}"),
            )
            self.stats.skipped += 1
            return None

    async def _deliver(
        self,
        consumer: Any,
        partition: Any,
        record: Any,
        envelope: EventEnvelope,
        handle: Handle,
    ) -> None:
        if await self.store.is_processed(self.group_id, envelope.event_id):
            self.stats.duplicates += 1
            return
        try:
            with correlation_scope(envelope.correlation_id):
                await handle(envelope)
        except BaseException as exc:
            consumer.seek(partition, record.offset)  # delivered again on the next run
            self._log.warning(
                "kafka_message_handler_failed",
                topic=record.topic,
                offset=record.offset,
                event_id=str(envelope.event_id),
                error=sanitize_exception(exc),
            )
            raise
        # Only now: a crash before this line leaves the message unrecorded, so it comes again.
        await self.store.check_and_record(self.group_id, envelope.event_id, envelope.correlation_id)
        self.stats.handled += 1

    async def _commit(self, consumer: Any, partition: Any, offset: int) -> None:
        try:
            await consumer.commit({partition: offset})
        except Exception as exc:  # e.g. a rebalance: the records come again and are deduped
            self._log.warning(
                "kafka_commit_failed",
                topic=partition.topic,
                partition=partition.partition,
                error=sanitize_text(type(exc).__name__),
            )
