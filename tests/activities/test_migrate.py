"""The migration runner against a real PostgreSQL: apply once, no-op, races, tampering."""

from __future__ import annotations

import asyncio
import hashlib
import importlib.resources
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from activities.migrate import MIGRATION_LOCK_KEY, load_migrations, migrate, migrate_dsn
from contracts.errors import ConfigurationError, Transport

REGISTRY_TABLES = {
    "onex_nodes",
    "onex_outbox",
    "onex_dead_letters",
    "onex_processed_messages",
    "onex_node_preimages",
    "onex_node_liveness",
    "onex_schema_migrations",
}


@pytest.fixture
async def connection(pg_dsn: str) -> AsyncIterator[Any]:
    """A plain connection to the test's own (empty) database."""
    conn = await asyncpg.connect(pg_dsn)
    try:
        yield conn
    finally:
        await conn.close()


async def tables(conn: Any) -> set[str]:
    rows = await conn.fetch(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'"
    )
    return {row["table_name"] for row in rows}


async def advisory_locks(conn: Any) -> int:
    count: int = await conn.fetchval("SELECT count(*) FROM pg_locks WHERE locktype = 'advisory'")
    return count


def test_packaged_migrations_are_ordered_with_file_checksums() -> None:
    """The packaged files load in version order, each with the SHA-256 of its bytes."""
    migrations = load_migrations()
    assert [m.version for m in migrations] == sorted(m.version for m in migrations)
    first = migrations[0]
    assert (first.version, first.name) == (1, "0001_registry")
    content = (
        importlib.resources.files("activities").joinpath("migrations", "0001_registry.sql")
    ).read_bytes()
    assert first.checksum == hashlib.sha256(content).hexdigest()
    expected_key = int.from_bytes(
        hashlib.sha256(b"onex-migrations").digest()[:8], "big", signed=True
    )
    assert expected_key == MIGRATION_LOCK_KEY


async def test_first_run_applies_the_registry_schema(connection: Any) -> None:
    """An empty database gets 0001 to 0005: their tables exist and each version is recorded
    with its checksum; the advisory lock is released afterwards."""
    assert await tables(connection) == set()

    applied = await migrate(connection)

    assert applied == [
        "0001_registry",
        "0002_preimages",
        "0003_node_writer",
        "0004_preimages_by_writer",
        "0005_node_liveness",
    ]
    assert await tables(connection) == REGISTRY_TABLES
    rows = await connection.fetch(
        "SELECT version, name, checksum, applied_at FROM onex_schema_migrations ORDER BY version"
    )
    assert [(row["version"], row["name"]) for row in rows] == [
        (1, "0001_registry"),
        (2, "0002_preimages"),
        (3, "0003_node_writer"),
        (4, "0004_preimages_by_writer"),
        (5, "0005_node_liveness"),
    ]
    assert [row["checksum"] for row in rows] == [m.checksum for m in load_migrations()]
    assert all(row["applied_at"] is not None for row in rows)
    assert await advisory_locks(connection) == 0


async def test_second_run_is_a_no_op(connection: Any) -> None:
    """Up to date means nothing applied and nothing recorded twice."""
    await migrate(connection)
    recorded = await connection.fetch("SELECT version, applied_at FROM onex_schema_migrations")

    assert await migrate(connection) == []
    assert await connection.fetch("SELECT version, applied_at FROM onex_schema_migrations") == (
        recorded
    )


async def test_concurrent_runners_apply_each_migration_once(pg_dsn: str, connection: Any) -> None:
    """Five runners started together serialize on the advisory lock: exactly one applies the
    migrations, the others succeed with nothing to do, and each version has one row."""
    results = await asyncio.gather(*(migrate_dsn(pg_dsn) for _ in range(5)))

    expected = [m.name for m in load_migrations()]
    assert sorted(results, key=len) == [[], [], [], [], expected]
    versions = await connection.fetch(
        "SELECT version, count(*) AS n FROM onex_schema_migrations GROUP BY version"
    )
    assert {row["version"]: row["n"] for row in versions} == {
        m.version: 1 for m in load_migrations()
    }
    assert await tables(connection) == REGISTRY_TABLES


async def test_edited_migration_is_refused(connection: Any) -> None:
    """A recorded checksum that differs from the file is a ConfigurationError naming the
    version and saying to add a new migration; the lock is released and nothing is applied."""
    await migrate(connection)
    await connection.execute(
        "UPDATE onex_schema_migrations SET checksum = 'edited' WHERE version = 1"
    )

    with pytest.raises(ConfigurationError) as refused:
        await migrate(connection)

    message = str(refused.value)
    assert "0001" in message
    assert "never be edited" in message
    assert "add a new migration" in message
    context = refused.value.context
    assert (context.transport, context.operation, context.target) == (
        Transport.DATABASE,
        "migrate",
        "postgresql-primary",
    )
    assert await advisory_locks(connection) == 0
