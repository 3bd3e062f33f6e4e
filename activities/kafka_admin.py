"""Kafka topic administration: create the topic catalog on a cluster.

``onex kafka create-topics`` runs this against a real cluster, ``onex dev up`` against the
embedded broker. Each catalog topic (:data:`contracts.topics.CATALOG`) gets its partitions and
retention; a topic that exists already is left as it is.
"""

from __future__ import annotations

from typing import Any

from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import TopicAlreadyExistsError

from contracts.errors import ConfigurationError, ErrorContext, Transport
from contracts.topics import CATALOG

__all__ = ["create_topics"]

ADMIN_REQUEST_TIMEOUT_MS = 10_000


async def create_topics(
    bootstrap_servers: str,
    *,
    prefix: str = "",
    replication_factor: int = 1,
    client_options: dict[str, Any] | None = None,
) -> list[str]:
    """Create the topic catalog (3 partitions each); topics that exist are left as they are.

    ``client_options`` are extra aiokafka client arguments (SASL) for a real cluster. A topic
    the cluster refuses (a replication factor above its broker count, a policy) raises
    :class:`ConfigurationError` naming the topic and Kafka's error code.
    """
    options = {"request_timeout_ms": ADMIN_REQUEST_TIMEOUT_MS, **(client_options or {})}
    options["bootstrap_servers"] = bootstrap_servers
    admin = AIOKafkaAdminClient(**options)
    await admin.start()
    try:
        wanted = [
            NewTopic(
                name=prefix + topic.name,
                num_partitions=topic.partitions,
                replication_factor=replication_factor,
                topic_configs={"retention.ms": str(topic.retention_ms)},
            )
            for topic in CATALOG
        ]
        response = await admin.create_topics(wanted)
        for name, code, message in response.topic_errors:
            if code not in (0, TopicAlreadyExistsError.errno):
                raise ConfigurationError(
                    f"kafka: could not create topic {name}: {message} (code {code})",
                    context=ErrorContext(
                        transport=Transport.KAFKA, operation="create_topics", target=name
                    ),
                )
        return [topic.name for topic in wanted]
    finally:
        await admin.close()
