"""Fixtures for the Kafka and outbox tests: settings with a private topic prefix, a pool on a
fresh database with the registry schema, and a started publisher."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from activities.kafka import EventPublisher
from activities.migrate import migrate
from activities.resilience.breaker import BreakerRegistry
from tests.activities.kafka_support import with_kafka
from workers.settings import OnexSettings


@pytest.fixture
def settings(backends: OnexSettings, topic_prefix: str) -> OnexSettings:
    return with_kafka(backends, topic_prefix=topic_prefix)


@pytest.fixture
async def pool(pg_dsn: str) -> AsyncIterator[Any]:
    """A pool on a fresh database with the registry schema applied."""
    connection = await asyncpg.connect(pg_dsn)
    try:
        await migrate(connection)
    finally:
        await connection.close()
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=20)
    try:
        yield pool
    finally:
        await pool.close()


@pytest.fixture
async def publisher(settings: OnexSettings) -> AsyncIterator[EventPublisher]:
    publisher = EventPublisher(settings.kafka, BreakerRegistry())
    await publisher.start()
    try:
        yield publisher
    finally:
        await publisher.stop()
