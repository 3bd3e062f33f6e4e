"""Consuming what nodes publish: a group consumer with manual commits, and dead letters.

The ingress dispatcher (:mod:`workers.ingress`) and the heartbeat consumer
(:mod:`activities.liveness`) both read raw records, decide per record, and commit a partition's
offset only after every record before it was dealt with (accepted, stored or dead-lettered).
This module gives them the two pieces they share:

* :func:`start_group_consumer`: an ``AIOKafkaConsumer`` in a consumer group, auto-commit off,
  with the project's client options (SASL, client id) and a request timeout long enough to join
  a group;
* :class:`DeadLetters`: publishes a refused record **raw** (its value and key as consumed) to
  ``onex.infra.message.dead_lettered.v1`` through the process's
  :class:`~activities.kafka.EventPublisher` (so the topic's circuit breaker applies), with the
  reason, sanitized, and where the record came from in its headers.
* :func:`rewind`: seek each partition of a batch back to its first record not dealt with, so
  that the next fetch delivers it again (nothing is committed past it).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import structlog
from aiokafka import AIOKafkaConsumer

from activities.base import SecretSource
from activities.kafka import CONSUMER_MIN_REQUEST_MS, EventPublisher, client_options
from activities.resilience.sanitize import sanitize_exception, sanitize_text
from activities.settings import KafkaSettings
from contracts.topics import TOPICS_BY_NAME, TopicName

__all__ = [
    "DEAD_LETTER_TOPIC",
    "MAX_REASON_LENGTH",
    "DeadLetters",
    "catalog_topic",
    "rewind",
    "start_group_consumer",
]

logger = structlog.get_logger("onex.ingest")

DEAD_LETTER_TOPIC = TopicName.INFRA_MESSAGE_DEAD_LETTERED
MAX_REASON_LENGTH = 500


async def start_group_consumer(
    kafka: KafkaSettings,
    topics: Sequence[str],
    *,
    group_id: str,
    secrets: SecretSource | None = None,
    auto_offset_reset: str = "earliest",
) -> Any:
    """A started consumer of catalog ``topics`` (prefixed on the wire) in ``group_id``."""
    unknown = [topic for topic in topics if topic not in TOPICS_BY_NAME]
    if unknown or not topics:
        raise ValueError(f"not catalog topics (contracts/topics.py): {unknown or 'none'}")
    options = await client_options(kafka, secrets)
    # A JoinGroup request is answered only when the rebalance completes (up to the session
    # timeout): a shorter request timeout, fine for producers, would never join.
    options["request_timeout_ms"] = max(options["request_timeout_ms"], CONSUMER_MIN_REQUEST_MS)
    consumer = AIOKafkaConsumer(
        *(kafka.topic_prefix + topic for topic in topics),
        group_id=group_id,
        enable_auto_commit=False,
        auto_offset_reset=auto_offset_reset,
        **options,
    )
    try:
        await consumer.start()
    except BaseException:
        try:
            await consumer.stop()
        except Exception as exc:  # closing a half-started client: nothing useful to add
            logger.debug("kafka_consumer_stop_failed", error=sanitize_exception(exc))
        raise
    return consumer


def catalog_topic(kafka: KafkaSettings, wire_topic: str) -> str:
    """The catalog name of a topic as consumed (the prefix removed)."""
    prefix = kafka.topic_prefix
    return wire_topic[len(prefix) :] if prefix and wire_topic.startswith(prefix) else wire_topic


class DeadLetters:
    """Sends refused records, raw, to the dead-letter topic with the reason in a header."""

    def __init__(self, publisher: EventPublisher, *, group_id: str) -> None:
        self.publisher = publisher
        self.group_id = group_id

    async def send(self, record: Any, reason: str) -> None:
        """Publish ``record`` as it was consumed; raises if the publish fails (do not commit)."""
        shown = sanitize_text(reason, max_length=MAX_REASON_LENGTH)
        headers = [
            *(record.headers or ()),
            ("dlq_reason", shown.encode()),
            ("dlq_topic", catalog_topic(self.publisher.kafka, record.topic).encode()),
            ("dlq_partition", str(record.partition).encode()),
            ("dlq_offset", str(record.offset).encode()),
            ("dlq_group", self.group_id.encode()),
        ]
        await self.publisher.publish(
            DEAD_LETTER_TOPIC, record.value or b"", key=record.key, headers=headers
        )


def rewind(consumer: Any, pending: Mapping[Any, int]) -> None:
    """Seek each partition to its first offset not dealt with (delivered again next fetch)."""
    for partition, offset in pending.items():
        consumer.seek(partition, offset)
