"""The schema migration runner: versioned SQL files, applied once each, in order (SPEC §5).

Migrations are the ``NNNN_name.sql`` files packaged in ``activities/migrations/`` (read with
:mod:`importlib.resources`, so they ship inside the wheel). Each one runs in its own transaction
together with the row that records it in::

    onex_schema_migrations(version int primary key, name text, checksum text, applied_at)

so a migration is either applied and recorded, or neither. The checksum is the SHA-256 of the
file: a recorded migration whose file changed is refused with a :class:`ConfigurationError`,
because the databases that already ran it would silently differ from those that run it now.
Applied migrations are never edited; a change is a new, higher-numbered file.

Runners serialize on a session-level advisory lock (:data:`MIGRATION_LOCK_KEY`), held for the
whole run, so that several workers starting together apply each migration exactly once; the
others wait, then find nothing left to do. A run with nothing to apply is a no-op.

A database may record versions this code does not know (a newer worker migrated it during a
rolling upgrade): they are left alone and logged, since migrations only ever add.

``onex db migrate`` and the worker's start-up call :func:`migrate_dsn`; the PostgreSQL handler
calls :func:`migrate` on a connection of its pool.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import re
from dataclasses import dataclass
from typing import Final

import asyncpg
import structlog

from contracts.errors import ConfigurationError, ErrorContext, Transport

__all__ = [
    "MIGRATION_LOCK_KEY",
    "TARGET",
    "Migration",
    "load_migrations",
    "migrate",
    "migrate_dsn",
]

TARGET: Final = "postgresql-primary"
"""The logical name of the registry database in errors and logs (never its DSN)."""


def _lock_key(name: str) -> int:
    """A signed 64-bit advisory lock key: the first 8 bytes of the name's SHA-256."""
    return int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big", signed=True)


MIGRATION_LOCK_KEY: Final = _lock_key("onex-migrations")

_FILE_NAME = re.compile(r"^(?P<version>\d{4})_(?P<name>[a-z0-9_]+)\.sql$")
_CONTEXT = ErrorContext(transport=Transport.DATABASE, operation="migrate", target=TARGET)

_CREATE_TABLE = """
CREATE TABLE IF NOT EXISTS onex_schema_migrations (
    version    integer     PRIMARY KEY,
    name       text        NOT NULL,
    checksum   text        NOT NULL,
    applied_at timestamptz NOT NULL DEFAULT now()
)
"""

logger = structlog.get_logger("onex.migrate")


@dataclass(frozen=True, slots=True)
class Migration:
    """One packaged migration file; ``name`` is its file name without ``.sql``."""

    version: int
    name: str
    sql: str
    checksum: str


def load_migrations(package: str = "activities", directory: str = "migrations") -> list[Migration]:
    """The packaged migrations in version order.

    A ``.sql`` file not named ``NNNN_name.sql``, or two files with one version, is a packaging
    mistake and raises :class:`ConfigurationError`; other files are ignored.
    """
    folder = importlib.resources.files(package).joinpath(directory)
    migrations: dict[int, Migration] = {}
    for entry in folder.iterdir():
        if not entry.is_file() or not entry.name.endswith(".sql"):
            continue
        match = _FILE_NAME.match(entry.name)
        if match is None:
            raise ConfigurationError(
                f"migration file {entry.name!r} is not named NNNN_name.sql "
                "(four digits, an underscore, lower-case letters, digits or underscores)",
                context=_CONTEXT,
            )
        version = int(match["version"])
        if version in migrations:
            raise ConfigurationError(
                f"two migration files have version {version:04d}: "
                f"{migrations[version].name}.sql and {entry.name}",
                context=_CONTEXT,
            )
        content = entry.read_bytes()
        migrations[version] = Migration(
            version=version,
            name=entry.name.removesuffix(".sql"),
            sql=content.decode("utf-8"),
            checksum=hashlib.sha256(content).hexdigest(),
        )
    return [migrations[version] for version in sorted(migrations)]


async def migrate(connection: asyncpg.Connection) -> list[str]:
    """Apply the pending migrations on ``connection``.

    Returns the names of the migrations applied by this call, in order; an empty list when the
    schema was already up to date. Raises :class:`ConfigurationError` when a recorded
    migration's checksum no longer matches its file; a failing migration propagates the native
    error, and its transaction is rolled back (the migrations before it stay applied).
    """
    migrations = load_migrations()
    await connection.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK_KEY)
    try:
        await connection.execute(_CREATE_TABLE)
        rows = await connection.fetch("SELECT version, checksum FROM onex_schema_migrations")
        recorded: dict[int, str] = {row["version"]: row["checksum"] for row in rows}
        _check_unchanged(migrations, recorded)
        unknown = sorted(set(recorded) - {migration.version for migration in migrations})
        if unknown:
            logger.warning("schema_newer_than_code", unknown_versions=unknown)
        applied: list[str] = []
        for migration in migrations:
            if migration.version in recorded:
                continue
            async with connection.transaction():
                await connection.execute(migration.sql)
                await connection.execute(
                    "INSERT INTO onex_schema_migrations (version, name, checksum) "
                    "VALUES ($1, $2, $3)",
                    migration.version,
                    migration.name,
                    migration.checksum,
                )
            logger.info("schema_migration_applied", version=migration.version, name=migration.name)
            applied.append(migration.name)
        return applied
    finally:
        # A broken connection has ended its session, and with it the lock.
        if not connection.is_closed():
            await connection.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK_KEY)


def _check_unchanged(migrations: list[Migration], recorded: dict[int, str]) -> None:
    for migration in migrations:
        checksum = recorded.get(migration.version)
        if checksum is not None and checksum != migration.checksum:
            raise ConfigurationError(
                f"migration {migration.version:04d} ({migration.name}) was changed after it "
                "was applied to this database: applied migrations must never be edited. "
                "Restore the file as it was and add a new migration instead.",
                context=_CONTEXT,
            )


async def migrate_dsn(
    dsn: str, *, password: str | None = None, connect_timeout: float = 10.0
) -> list[str]:
    """Connect to ``dsn`` (within ``connect_timeout`` seconds), :func:`migrate`, and close.

    ``dsn`` should carry no password; pass it separately, resolved from the secret store.
    """
    connection = await asyncpg.connect(dsn, password=password, timeout=connect_timeout)
    try:
        return await migrate(connection)
    finally:
        await connection.close()
