"""The TCP fault proxy in front of the real PostgreSQL (asyncpg) and a real broker (aiokafka)."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka import errors as kafka_errors
from aiokafka.admin import AIOKafkaAdminClient, NewTopic

from tests.fakes.fault_proxy import FaultProxy, start_proxied_broker
from tests.support import wait_until
from workers.settings import OnexSettings


@pytest.fixture
async def pg_proxy(backends: OnexSettings) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(backends.postgres.host, backends.postgres.port) as proxy:
        yield proxy


def _pg_args(backends: OnexSettings, proxy: FaultProxy) -> dict[str, Any]:
    password = backends.postgres.password
    return {
        "host": "127.0.0.1",
        "port": proxy.port,
        "user": backends.postgres.user,
        "database": backends.postgres.database,
        "password": password.get_secret_value() if password else None,
        "timeout": 5,
    }


async def test_asyncpg_queries_through_the_proxy(
    backends: OnexSettings, pg_proxy: FaultProxy
) -> None:
    """asyncpg connects and queries through the proxy; the proxy counts the connection."""
    conn = await asyncpg.connect(**_pg_args(backends, pg_proxy))
    try:
        assert await conn.fetchval("SELECT 1") == 1
        assert pg_proxy.connections == 1
        assert pg_proxy.total_connections == 1
    finally:
        await conn.close()

    async def closed() -> bool:
        return pg_proxy.connections == 0

    await wait_until(closed, within=5, what="the proxy to see the connection closed")


async def test_cut_breaks_open_connections_and_refuses_new_ones(
    backends: OnexSettings, pg_proxy: FaultProxy
) -> None:
    """After cut(): a query in flight fails with ConnectionDoesNotExistError, a query on an idle
    connection with InterfaceError("connection is closed") (asyncpg noticed the reset already),
    and a new connection is refused at once; after restore() new connections work again."""
    busy = await asyncpg.connect(**_pg_args(backends, pg_proxy))
    idle = await asyncpg.connect(**_pg_args(backends, pg_proxy))
    observer = await asyncpg.connect(
        **{**_pg_args(backends, pg_proxy), "port": backends.postgres.port}
    )
    try:
        in_flight = asyncio.ensure_future(busy.fetchval("SELECT pg_sleep(30)"))

        async def sleeping() -> bool:
            count = await observer.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE query = 'SELECT pg_sleep(30)'"
            )
            return bool(count)

        await wait_until(sleeping, within=10, what="the query to run on the server")
        await pg_proxy.cut()
        assert pg_proxy.connections == 0
        with pytest.raises(asyncpg.ConnectionDoesNotExistError):
            await in_flight
        with pytest.raises(asyncpg.InterfaceError, match="connection is closed"):
            await idle.fetchval("SELECT 1")
    finally:
        busy.terminate()
        idle.terminate()
        await observer.close()

    started = time.monotonic()
    with pytest.raises(ConnectionRefusedError):
        await asyncpg.connect(**_pg_args(backends, pg_proxy))
    assert time.monotonic() - started < 2

    pg_proxy.restore()
    conn = await asyncpg.connect(**_pg_args(backends, pg_proxy))
    try:
        assert await conn.fetchval("SELECT 2") == 2
    finally:
        await conn.close()


async def test_delay_makes_a_query_time_out(backends: OnexSettings, pg_proxy: FaultProxy) -> None:
    """With every chunk delayed by 1 s, a query with a 0.3 s timeout raises TimeoutError; without
    the delay the same connection answers again."""
    conn = await asyncpg.connect(**_pg_args(backends, pg_proxy))
    try:
        pg_proxy.set_delay(1.0)
        with pytest.raises(TimeoutError):
            await conn.fetchval("SELECT 1", timeout=0.3)
        pg_proxy.set_delay(0)

        async def answers() -> bool:
            try:
                return bool(await conn.fetchval("SELECT 3", timeout=2) == 3)
            except asyncpg.InterfaceError:  # the cancellation of the timed-out query is pending
                return False

        await wait_until(answers, within=10, what="the connection to answer after the delay")
    finally:
        await conn.close()


async def test_kafka_through_a_proxied_broker() -> None:
    """A broker advertising the proxy keeps every client connection on the proxy: produce and
    consume work; during a cut a send fails after request_timeout_ms with a retriable
    NodeNotReadyError and a new client cannot bootstrap (KafkaConnectionError); after restore the
    same producer and consumer work again."""
    async with start_proxied_broker() as (bootstrap, proxy):
        topic = f"proxied-{uuid.uuid4().hex[:8]}"
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap, request_timeout_ms=5000)
        await admin.start()
        try:
            await admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)])
        finally:
            await admin.close()

        producer = AIOKafkaProducer(
            bootstrap_servers=bootstrap, request_timeout_ms=1500, retry_backoff_ms=50
        )
        consumer = AIOKafkaConsumer(
            topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None
        )
        await producer.start()
        await consumer.start()
        try:
            await producer.send_and_wait(topic, b"before")
            message = await asyncio.wait_for(consumer.getone(), timeout=20)
            assert message.value == b"before"
            assert proxy.connections >= 2  # producer and consumer, both through the proxy

            await proxy.cut()
            started = time.monotonic()
            with pytest.raises(kafka_errors.NodeNotReadyError) as caught:
                await producer.send_and_wait(topic, b"during")
            assert caught.value.retriable
            assert time.monotonic() - started < 10

            newcomer = AIOKafkaProducer(bootstrap_servers=bootstrap, request_timeout_ms=1500)
            try:
                with pytest.raises(kafka_errors.KafkaConnectionError):
                    await newcomer.start()
            finally:
                await newcomer.stop()

            proxy.restore()

            async def sends() -> bool:
                try:
                    await producer.send_and_wait(topic, b"after")
                except kafka_errors.KafkaError:
                    return False
                return True

            await wait_until(sends, within=20, what="a send through the restored proxy")
            values: list[bytes] = []

            async def consumed_after() -> bool:
                batch = await consumer.getmany(timeout_ms=200)
                values.extend(m.value for ms in batch.values() for m in ms if m.value)
                return b"after" in values

            await wait_until(consumed_after, within=20, what="the message sent after restore")
        finally:
            await producer.stop()
            await consumer.stop()
