"""The read-through cache with a real Valkey in front of a real PostgreSQL, each behind a fault
proxy: fresh hits, reads through, stale answers while PostgreSQL is down, and straight reads
while Valkey is down."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import asyncpg
import pytest
import structlog
from pydantic import BaseModel, TypeAdapter

from activities.cache import ReadThroughCache
from activities.settings import ValkeySettings
from activities.valkey import connect_valkey
from tests.fakes.fault_proxy import FaultProxy
from workers.settings import OnexSettings


class Node(BaseModel):
    node_id: str
    name: str


@dataclass
class Registry:
    """A table in a real PostgreSQL, read through a fault proxy (the injected loader)."""

    admin: asyncpg.Connection
    proxied_dsn: str
    proxy: FaultProxy
    reads: int = 0

    async def load(self, node_id: str) -> Node | None:
        self.reads += 1
        connection = await asyncpg.connect(self.proxied_dsn, timeout=5)
        try:
            row = await connection.fetchrow(
                "SELECT node_id, name FROM nodes WHERE node_id = $1", node_id
            )
        finally:
            await connection.close()
        return None if row is None else Node(node_id=row["node_id"], name=row["name"])


@pytest.fixture
async def registry(backends: OnexSettings, pg_dsn: str) -> AsyncIterator[Registry]:
    admin = await asyncpg.connect(pg_dsn)
    await admin.execute("CREATE TABLE nodes (node_id text PRIMARY KEY, name text NOT NULL)")
    await admin.execute("INSERT INTO nodes VALUES ('n1', 'first')")
    async with FaultProxy(backends.postgres.host, backends.postgres.port) as proxy:
        host_port = f"{backends.postgres.host}:{backends.postgres.port}"
        dsn = pg_dsn.replace(host_port, proxy.address)
        try:
            yield Registry(admin, dsn, proxy)
        finally:
            await admin.close()


@pytest.fixture
async def valkey_proxy(valkey_server: ValkeySettings) -> AsyncIterator[FaultProxy]:
    host, port = valkey_server.host_port
    async with FaultProxy(host, port) as proxy:
        yield proxy


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def cache_parts(
    valkey_server: ValkeySettings, valkey_proxy: FaultProxy
) -> AsyncIterator[tuple[ReadThroughCache[Node | None], Clock]]:
    settings = valkey_server.model_copy(update={"address": valkey_proxy.address, "timeout": 0.5})
    client = await connect_valkey(settings)
    clock = Clock()
    cache: ReadThroughCache[Node | None] = ReadThroughCache(
        client,
        namespace=f"registry.node.{uuid.uuid4().hex[:8]}",
        adapter=TypeAdapter(Node | None),
        ttl_seconds=5.0,
        clock=clock,
    )
    try:
        yield cache, clock
    finally:
        await client.aclose()


async def test_a_fresh_entry_is_served_from_valkey_then_read_through_when_old(
    registry: Registry, cache_parts: tuple[ReadThroughCache[Node | None], Clock]
) -> None:
    """Within the TTL the database is not asked again; past it, the new value is read."""
    cache, clock = cache_parts
    first = await cache.get("n1", lambda: registry.load("n1"))
    assert (first.value, first.source, first.stale) == (
        Node(node_id="n1", name="first"),
        "database",
        False,
    )
    await registry.admin.execute("UPDATE nodes SET name = 'renamed' WHERE node_id = 'n1'")
    clock.now += 1
    hit = await cache.get("n1", lambda: registry.load("n1"))
    assert (hit.source, hit.value) == ("cache", first.value), "a fresh entry must be served"
    assert registry.reads == 1
    clock.now += 10
    again = await cache.get("n1", lambda: registry.load("n1"))
    assert again.value == Node(node_id="n1", name="renamed"), "past the TTL it reads through"
    assert registry.reads == 2


async def test_postgresql_down_answers_from_the_cache_marked_stale(
    registry: Registry, cache_parts: tuple[ReadThroughCache[Node | None], Clock]
) -> None:
    """With PostgreSQL cut off, an entry past its TTL is still the answer, marked stale with
    its age; a key never cached has no answer and the outage is raised."""
    cache, clock = cache_parts
    await cache.get("n1", lambda: registry.load("n1"))
    clock.now += 60
    await registry.proxy.cut()
    stale = await cache.get("n1", lambda: registry.load("n1"))
    assert stale.stale, "an answer from the cache during an outage must say it is stale"
    assert (stale.source, stale.value) == ("cache", Node(node_id="n1", name="first"))
    assert stale.age_seconds == pytest.approx(60.0)
    with pytest.raises(ConnectionRefusedError):
        await cache.get("n2", lambda: registry.load("n2"))


async def test_a_refusal_from_postgresql_is_not_masked_by_the_cache(
    registry: Registry, cache_parts: tuple[ReadThroughCache[Node | None], Clock]
) -> None:
    """Only an outage falls back: a query the database refuses is raised even when cached."""
    cache, clock = cache_parts
    await cache.get("n1", lambda: registry.load("n1"))
    clock.now += 60
    await registry.admin.execute("ALTER TABLE nodes RENAME TO gone")

    with pytest.raises(asyncpg.UndefinedTableError):
        await cache.get("n1", lambda: registry.load("n1"))


async def test_valkey_down_reads_go_straight_to_postgresql(
    registry: Registry,
    cache_parts: tuple[ReadThroughCache[Node | None], Clock],
    valkey_proxy: FaultProxy,
) -> None:
    """With Valkey cut off, every read is the database's (not stale), logged once; once
    Valkey is back, entries are cached again."""
    cache, clock = cache_parts
    await valkey_proxy.cut()
    with structlog.testing.capture_logs() as logs:
        for _ in range(3):
            answer = await cache.get("n1", lambda: registry.load("n1"))
            assert (answer.source, answer.stale) == ("database", False)
    assert registry.reads == 3, "each read goes to PostgreSQL while Valkey is away"
    events = [entry["event"] for entry in logs]
    assert events.count("cache_bypassed") == 1, f"the bypass is logged once: {events}"

    valkey_proxy.restore()
    clock.now += cache.retry_valkey_seconds + 1
    await cache.get("n1", lambda: registry.load("n1"))
    hit = await cache.get("n1", lambda: registry.load("n1"))
    assert hit.source == "cache", "once Valkey is back, reads are cached again"


async def test_without_valkey_configured_the_cache_is_a_pass_through(registry: Registry) -> None:
    """A cache with no client (ONEX_VALKEY__ADDRESS unset) reads the database every time."""
    cache: ReadThroughCache[Node | None] = ReadThroughCache(
        None, namespace="registry.node", adapter=TypeAdapter(Node | None)
    )
    for _ in range(2):
        answer = await cache.get("n1", lambda: registry.load("n1"))
        assert answer.source == "database"
    assert registry.reads == 2
