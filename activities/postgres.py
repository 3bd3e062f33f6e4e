"""The PostgreSQL handler: the node registry, its outbox, and consumer idempotency (SPEC §5).

Tables (created by the versioned migrations in ``activities/migrations/``, see
:mod:`activities.migrate`):

``onex_nodes``
    One row per node: the source of truth of the registry. ``status`` is ``active`` or
    ``inactive``; ``row_version`` grows by one with every change (never goes back, not even when
    a compensation restores an older row); ``correlation_id`` is that of the last request that
    changed the row; ``written_by`` the run that did (see :mod:`activities.writer`; NULL for
    rows written before it was recorded); ``registered_at`` is the first registration.
``onex_outbox``
    Events waiting for the relay to publish them to Kafka, one row per ``event_id``, with the
    topic, the message key (fixed per topic family), the envelope and the Kafka headers.
``onex_dead_letters``
    Outbox rows the relay gave up on (written by the relay, not here).
``onex_processed_messages``
    ``(domain, message_id)`` pairs a consumer has handled, for at-least-once deduplication.
``onex_node_liveness``
    The last heartbeat of each node and its liveness (see :mod:`activities.liveness`);
    ``sweep_liveness`` marks silent nodes ``unhealthy`` and queues their events.
``onex_node_preimages``
    The row a forward operation found before its first attempt (``previous``, NULL for none),
    one per ``(node_id, writer, operation)``; see the idempotency rules below.

Idempotency rules (every operation may run again: Temporal retries it after a lost reply):

* ``upsert_node`` locks the existing row, then inserts or updates it, in one transaction, and
  returns the row before (None for a new node) for its compensation. A repeat succeeds and
  bumps ``row_version``.
* Pre-images: the writer (:func:`activities.writer.current_writer`: the workflow id and run
  id of the activity's workflow) names one run's operation; a reused correlation id or a reset
  workflow is another writer. In the transaction of its write, the first attempt of
  ``upsert_node`` (and ``upsert_node_and_enqueue``) or ``deactivate_node`` records the row it
  found in ``onex_node_preimages`` (``INSERT .. ON CONFLICT DO NOTHING``); a repeat by the same
  writer finds that record and reports the stored row as ``previous``, not the row its own
  first attempt wrote, so a compensation after a lost reply restores the true pre-image.
  Another writer is a new operation and sees the row as it is then. Without a writer (outside
  an activity and without a correlation id) nothing is recorded and the row as it is now is
  reported. Records are deleted only by ``cleanup_preimages(ttl_seconds)``, which nothing
  schedules yet; the TTL must outlast the longest workflow that may still compensate.
* ``restore_node`` undoes ``upsert_node`` or ``deactivate_node`` from their result, fenced (an
  undo never destroys newer work): it locks the row; a row already as it was before is left as
  it is (``unchanged``, so a second call changes nothing); a row whose writer is no longer this
  run (a newer operation wrote it, or it is gone) is left as it is too, ``superseded``, with a
  reason naming the newer writer's workflow id. Otherwise no previous row means delete it, and
  a previous row is put back exactly, every field including ``status``, ``registered_at``,
  ``updated_at`` and its writer, with ``row_version`` moved forward. A deactivation that
  changed nothing has nothing to undo. Rows written before writers were recorded are fenced
  on their correlation id instead.
* An ambiguous ``restore_node`` (the step failed in a way that may have reached the database;
  no forward result) looks up the pre-image this writer recorded: none means the write never
  committed (``unchanged``); one is undone as above.
* ``deactivate_node`` of a missing or already inactive node is a success that changes nothing.
  ``deactivated`` is True when ``previous`` (the stored pre-image, for a repeat) was active.
* ``enqueue_event`` inserts once per ``event_id``; a repeat reports ``enqueued=False``.
  ``upsert_node_and_enqueue`` commits the node and its event together, or neither.
* ``check_and_record`` has exactly one winner per ``(domain, message_id)``, under any race;
  ``is_processed`` tells whether a message was recorded.

Each operation makes one attempt; failures propagate as native asyncpg/OS errors for the
activity boundary to classify. The one exception is a refused password: the password is
refreshed from the secret store, the pool rebuilt, and the operation tried once more, within
the same call (credentials rotate; the cache may be stale). Every statement runs with the pool's
command timeout (``query_timeout``); waiting for a connection is bounded by ``connect_timeout``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import math
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Literal, TypeVar, cast

import asyncpg
import structlog
from pydantic import SecretStr, TypeAdapter, ValidationError

from activities.base import (
    BackgroundService,
    HandlerBase,
    HandlerConfig,
    HandlerDescription,
    HandlerResources,
    SecretSource,
    secret_or_setting,
)
from activities.kafka import EVENT_PUBLISHER
from activities.liveness import sweep as liveness_sweep
from activities.migrate import TARGET, migrate
from activities.outbox import OutboxRelay, Publisher, StateChangeEvents, enqueue
from activities.resilience.breaker import Listener
from activities.resilience.correlation import current_correlation_id
from activities.resilience.refresh import refresh_once
from activities.settings import PostgresSettings
from activities.writer import current_writer, is_ours, writer_workflow
from contracts.errors import (
    ConfigurationError,
    ErrorContext,
    InfraAuthenticationError,
    Transport,
)
from contracts.events import EventEnvelope
from contracts.fleet import LivenessSweepInput, LivenessSweepResult
from contracts.registry import (
    CompensationInput,
    DeactivateNodeResult,
    DeregisterNodeRequest,
    EnqueueEventResult,
    GetNodeRequest,
    GetNodeResult,
    NodeRecord,
    NodeStatus,
    RegisterNodeRequest,
    RestoreNodeResult,
    UndoAction,
    UpsertNodeResult,
)

__all__ = [
    "PASSWORD_SECRET",
    "POOL_CLIENT",
    "POOL_FACTORY_CLIENT",
    "PostgresHandler",
]

T = TypeVar("T")

PASSWORD_SECRET: Final = "database.postgres.password"  # noqa: S105 - a name, not a value
"""The logical secret name of the database password."""

POOL_CLIENT: Final = "postgres.pool"
"""``HandlerResources.clients`` key of a ready pool to use instead of creating one."""

POOL_FACTORY_CLIENT: Final = "postgres.pool_factory"
"""``HandlerResources.clients`` key of the pool factory (default ``asyncpg.create_pool``)."""

APPLICATION_NAME: Final = "onex-orchestrator"

# The password was refused: refreshing it from the secret store may help (once).
_AUTH_ERRORS: Final = (
    asyncpg.exceptions.InvalidPasswordError,
    asyncpg.exceptions.InvalidAuthorizationSpecificationError,
)

logger = structlog.get_logger("onex.postgres")

# ---------------------------------------------------------------------------------------------
# SQL: every value is a parameter; only these constant column lists are interpolated.

_NODE_COLUMNS = (
    "node_id, node_type, node_version, service_name, address, port, tags, endpoints, "
    "metadata, status, row_version, correlation_id, registered_at, updated_at, written_by"
)

_SELECT_NODE = f"SELECT {_NODE_COLUMNS} FROM onex_nodes WHERE node_id = $1"  # noqa: S608

_UPSERT_NODE = f"""
INSERT INTO onex_nodes (
    node_id, node_type, node_version, service_name, address, port, tags, endpoints, metadata,
    status, correlation_id, written_by
)
VALUES ($1, $2, $3, $4, $5, $6, $7::text[], $8::jsonb, $9::jsonb, 'active', $10, $11)
ON CONFLICT (node_id) DO UPDATE SET
    node_type      = EXCLUDED.node_type,
    node_version   = EXCLUDED.node_version,
    service_name   = EXCLUDED.service_name,
    address        = EXCLUDED.address,
    port           = EXCLUDED.port,
    tags           = EXCLUDED.tags,
    endpoints      = EXCLUDED.endpoints,
    metadata       = EXCLUDED.metadata,
    status         = 'active',
    row_version    = onex_nodes.row_version + 1,
    correlation_id = COALESCE(EXCLUDED.correlation_id, onex_nodes.correlation_id),
    written_by     = EXCLUDED.written_by,
    updated_at     = now()
RETURNING {_NODE_COLUMNS}
"""  # noqa: S608

_RESTORE_NODE = """
INSERT INTO onex_nodes (
    node_id, node_type, node_version, service_name, address, port, tags, endpoints, metadata,
    status, row_version, correlation_id, registered_at, updated_at, written_by
)
VALUES ($1, $2, $3, $4, $5, $6, $7::text[], $8::jsonb, $9::jsonb, $10, $11, $12, $13, $14, $15)
ON CONFLICT (node_id) DO UPDATE SET
    node_type      = EXCLUDED.node_type,
    node_version   = EXCLUDED.node_version,
    service_name   = EXCLUDED.service_name,
    address        = EXCLUDED.address,
    port           = EXCLUDED.port,
    tags           = EXCLUDED.tags,
    endpoints      = EXCLUDED.endpoints,
    metadata       = EXCLUDED.metadata,
    status         = EXCLUDED.status,
    row_version    = onex_nodes.row_version + 1,
    correlation_id = EXCLUDED.correlation_id,
    registered_at  = EXCLUDED.registered_at,
    updated_at     = EXCLUDED.updated_at,
    written_by     = EXCLUDED.written_by
"""

_DELETE_NODE = "DELETE FROM onex_nodes WHERE node_id = $1"

_DEACTIVATE_NODE = """
UPDATE onex_nodes
SET status = 'inactive',
    row_version = row_version + 1,
    correlation_id = COALESCE($2, correlation_id),
    written_by = $3,
    updated_at = now()
WHERE node_id = $1
"""

_RECORD_PROCESSED = """
INSERT INTO onex_processed_messages (domain, message_id, correlation_id)
VALUES ($1, $2, $3)
ON CONFLICT (domain, message_id) DO NOTHING
RETURNING 1
"""

_CLEANUP_PROCESSED = """
DELETE FROM onex_processed_messages
WHERE processed_at < now() - $1::double precision * interval '1 second'
"""

_IS_PROCESSED = "SELECT 1 FROM onex_processed_messages WHERE domain = $1 AND message_id = $2"

_RECORD_PREIMAGE = """
INSERT INTO onex_node_preimages (node_id, writer, operation, previous, correlation_id)
VALUES ($1, $2, $3, $4::jsonb, $5)
ON CONFLICT (node_id, writer, operation) DO NOTHING
RETURNING previous
"""

_STORED_PREIMAGE = """
SELECT previous FROM onex_node_preimages
WHERE node_id = $1 AND writer = $2 AND operation = $3
"""

_CLEANUP_PREIMAGES = """
DELETE FROM onex_node_preimages
WHERE created_at < now() - $1::double precision * interval '1 second'
"""

# The ``operation`` of a pre-image record (upsert_node_and_enqueue shares upsert_node's).
_UPSERT_OPERATION: Final = "upsert_node"
_DEACTIVATE_OPERATION: Final = "deactivate_node"

# The pre-image operation of each forward activity an ambiguous restore_node may undo.
_AMBIGUOUS_OPERATIONS: Final = {
    "postgres.upsert_node": _UPSERT_OPERATION,
    "postgres.upsert_node_and_enqueue": _UPSERT_OPERATION,
    "postgres.deactivate_node": _DEACTIVATE_OPERATION,
}


class PostgresIdempotencyStore:
    """Consumer idempotency over ``onex_processed_messages`` (an asyncpg pool or connection).

    The primary key (domain, message_id) decides: a concurrent insert of the same pair waits
    for the first one and then does nothing, so exactly one caller gets True. A consumer asks
    :meth:`is_processed` before handling a message and records it after (see
    :class:`activities.kafka.DedupingConsumer`).
    """

    def __init__(self, executor: Any) -> None:
        self.executor = executor

    async def check_and_record(
        self, domain: str, message_id: uuid.UUID, correlation_id: uuid.UUID | None = None
    ) -> bool:
        """True the first time (domain, message_id) is seen, False for every duplicate."""
        correlation = correlation_id or current_correlation_id()
        inserted = await self.executor.fetchval(_RECORD_PROCESSED, domain, message_id, correlation)
        return inserted is not None

    async def is_processed(self, domain: str, message_id: uuid.UUID) -> bool:
        """Whether (domain, message_id) was recorded by :meth:`check_and_record`."""
        return await self.executor.fetchval(_IS_PROCESSED, domain, message_id) is not None

    async def cleanup_expired(self, ttl_seconds: float) -> int:
        """Forget processed messages older than ``ttl_seconds``; returns how many."""
        if not math.isfinite(ttl_seconds) or ttl_seconds < 0:
            raise ValueError("ttl_seconds must be a finite number of seconds, at least 0")
        status = await self.executor.execute(_CLEANUP_PROCESSED, float(ttl_seconds))
        return int(status.split()[-1])  # "DELETE <count>"


_FORWARD_RESULT: TypeAdapter[UpsertNodeResult | DeactivateNodeResult] = TypeAdapter(
    UpsertNodeResult | DeactivateNodeResult
)


class PostgresHandler(HandlerBase):
    """The ``postgres`` handler: registry rows, outbox events, processed messages.

    Seams for the composition root and tests, in ``resources.clients``: ``postgres.pool`` (a
    ready pool, used as it is, never closed or rebuilt here) and ``postgres.pool_factory`` (a
    callable taking ``asyncpg.create_pool``'s keyword arguments and returning an awaitable pool).

    The pool is created by :meth:`initialize`; if that could not connect, the next operation
    tries to create it again (so a worker that outlived a database outage recovers).
    """

    transport = Transport.DATABASE
    settings_type = PostgresSettings
    secret_names = (PASSWORD_SECRET,)

    def __init__(self, resources: HandlerResources[PostgresSettings]) -> None:
        super().__init__(resources)
        self._settings = resources.settings
        injected = resources.clients.get(POOL_CLIENT)
        self._pool: Any = injected
        self._owns_pool = injected is None
        # With a pool or a pool factory injected, the settings need not say where to connect.
        self._settings_connect = injected is None and POOL_FACTORY_CLIENT not in resources.clients
        self._pool_factory: Callable[..., Awaitable[Any]] = resources.clients.get(
            POOL_FACTORY_CLIENT, asyncpg.create_pool
        )
        # Serializes creating and replacing the pool (never held while a statement runs).
        self._pool_lock = asyncio.Lock()
        # Bumped by every rebuild, so that concurrent refusals lead to one rebuild, not many.
        self._pool_generation = 0
        self._migrations_applied: list[str] = []
        # Where the password last used came from: "secret", "setting", or None for none.
        self._login_from: Literal["secret", "setting"] | None = None

    @property
    def target(self) -> str:
        return TARGET

    # -- lifecycle ---------------------------------------------------------------------------

    async def initialize(self, config: HandlerConfig) -> None:
        """Create the pool (unless one was injected) and bring the schema up to date."""
        await super().initialize(config)
        try:
            self._migrations_applied = await self._run(migrate)
        except _AUTH_ERRORS as refused:  # what a user starting the worker reads: what to fix
            await self.shutdown(self._settings.connect_timeout)
            raise self._refused(refused) from refused
        except BaseException:
            await self.shutdown(self._settings.connect_timeout)
            raise

    def _refused(self, refused: BaseException) -> InfraAuthenticationError:
        """The database refused the user (after one refresh): where the password came from,
        by the name of its secret or setting, never its value."""
        user, native = self._settings.user, type(refused).__name__
        if self._login_from is None:
            remedy = (
                f"user {user} needs a password ({native}): set the secret {PASSWORD_SECRET} "
                "or ONEX_POSTGRES__PASSWORD"
            )
        else:
            where = (
                f"the secret {PASSWORD_SECRET}"
                if self._login_from == "secret"
                else "ONEX_POSTGRES__PASSWORD"
            )
            remedy = (
                f"the database refused user {user} ({native}): check {where} and "
                "ONEX_POSTGRES__USER"
            )
        return InfraAuthenticationError.at(
            self.target,
            remedy,
            context=ErrorContext(transport=self.transport, operation="connect", target=self.target),
        )

    async def shutdown(self, timeout_seconds: float = 30.0) -> None:
        """Close the pool this handler created: gracefully within the timeout, else terminate."""
        if not self._owns_pool:
            return  # whoever injected it closes it
        pool, self._pool = self._pool, None
        if pool is not None:
            await _close_pool(pool, timeout_seconds)

    def background_services(self, offered: Mapping[str, object]) -> Mapping[str, BackgroundService]:
        """The outbox relay, when a peer offers an event publisher (the ``kafka`` handler).

        It LISTENs on a connection of its own, outside the pool, so a pool rebuilt after a
        credential refresh never waits for it; unless the settings do not say where to connect
        (an injected pool or factory): then it holds one of the pool's connections.
        """
        publisher = offered.get(EVENT_PUBLISHER)
        if publisher is None:
            return {}
        relay = OutboxRelay(
            self.current_pool,
            cast("Publisher", publisher),  # KafkaHandler offers its EventPublisher by this name
            listen_connect=self.connect_unpooled if self._settings_connect else None,
        )
        return {"outbox relay (postgres -> kafka)": relay.run}

    def breaker_listeners(self) -> Sequence[Listener]:
        """Every breaker transition in the worker is announced as an event, through the outbox."""
        return (StateChangeEvents(self.enqueue_event),)

    def describe(self) -> HandlerDescription:
        settings = self._settings
        pool = self._pool
        details: dict[str, Any] = {
            "host": settings.host,
            "port": settings.port,
            "database": settings.database,
            "pool_min_size": settings.pool_min_size,
            "pool_max_size": settings.pool_max_size,
            "pool_size": pool.get_size() if pool is not None else 0,
            "pool_idle": pool.get_idle_size() if pool is not None else 0,
            "pool_owner": "handler" if self._owns_pool else "injected",
            "connect_timeout": settings.connect_timeout,
            "query_timeout": settings.query_timeout,
            "migrations_applied": list(self._migrations_applied),
        }
        return super().describe().model_copy(update={"details": details})

    # -- operations (one attempt each) -------------------------------------------------------

    async def upsert_node(self, request: RegisterNodeRequest) -> UpsertNodeResult:
        """Insert or update the node (active), returning the row now and the row before."""
        return await self._run(
            lambda connection: _write_node(connection, request), transaction=True
        )

    async def upsert_node_and_enqueue(
        self, request: RegisterNodeRequest, envelope: EventEnvelope
    ) -> UpsertNodeResult:
        """:meth:`upsert_node` and :meth:`enqueue_event` in one transaction: both or neither."""

        async def work(connection: Any) -> UpsertNodeResult:
            result = await _write_node(connection, request)
            await _insert_event(connection, envelope, operation="upsert_node_and_enqueue")
            return result

        return await self._run(work, transaction=True)

    async def restore_node(self, compensation: CompensationInput) -> RestoreNodeResult:
        """Undo ``upsert_node`` or ``deactivate_node`` (the compensation), fenced: only while the
        row is still this run's write; else ``superseded``, the row left as it is."""
        writer = current_writer(compensation.correlation_id)
        if compensation.ambiguous:
            return await self._run(
                lambda connection: _undo_ambiguous(connection, compensation, writer),
                transaction=True,
            )
        forward = _forward_result(compensation)
        previous = forward.previous
        if isinstance(forward, DeactivateNodeResult):
            if not forward.deactivated or previous is None:
                # The deactivation changed nothing.
                return RestoreNodeResult(action=UndoAction.UNCHANGED)
            node_id = previous.node_id
        else:
            node_id = forward.node.node_id
        return await self._run(
            lambda connection: _undo(
                connection, node_id, previous, writer, compensation.correlation_id
            ),
            transaction=True,
        )

    async def deactivate_node(self, request: DeregisterNodeRequest) -> DeactivateNodeResult:
        """Mark the node inactive; a missing or already inactive node is left as it is."""
        return await self._run(
            lambda connection: _deactivate(connection, request), transaction=True
        )

    async def get_node(self, request: GetNodeRequest) -> GetNodeResult:
        node = await self._run(lambda connection: _fetch_node(connection, request.node_id))
        return GetNodeResult(node=node)

    async def sweep_liveness(self, request: LivenessSweepInput) -> LivenessSweepResult:
        """Mark silent nodes unhealthy, returning ones healthy, and queue their events, in one
        transaction (:func:`activities.liveness.sweep`); a repeat finds nothing left to mark."""
        correlation_id = current_correlation_id() or uuid.uuid4()
        return await self._run(
            lambda connection: liveness_sweep(connection, request, correlation_id),
            transaction=True,
        )

    async def enqueue_event(self, envelope: EventEnvelope) -> EnqueueEventResult:
        """Queue the event for the outbox relay, once per ``event_id``."""
        return await self._run(
            lambda connection: _insert_event(connection, envelope, operation="enqueue_event")
        )

    # -- consumer idempotency (used by the worker's consumers, not an activity) --------------

    async def check_and_record(
        self, domain: str, message_id: uuid.UUID, correlation_id: uuid.UUID | None = None
    ) -> bool:
        """Record the message as processed; True for the first caller only, atomically."""
        return await self._run(
            lambda connection: PostgresIdempotencyStore(connection).check_and_record(
                domain, message_id, correlation_id
            )
        )

    async def is_processed(self, domain: str, message_id: uuid.UUID) -> bool:
        """Whether the message was recorded as processed."""
        return await self._run(
            lambda connection: PostgresIdempotencyStore(connection).is_processed(domain, message_id)
        )

    async def cleanup_processed(self, ttl_seconds: float) -> int:
        """Forget processed messages older than ``ttl_seconds``; returns how many."""
        return await self._run(
            lambda connection: PostgresIdempotencyStore(connection).cleanup_expired(ttl_seconds)
        )

    async def cleanup_preimages(self, ttl_seconds: float) -> int:
        """Forget pre-image records older than ``ttl_seconds``; returns how many.

        Nothing schedules it yet. A repeat of an operation whose record is gone reports the
        row as it is then, so the TTL must outlast every workflow that may still retry or
        compensate the operation.
        """
        if not math.isfinite(ttl_seconds) or ttl_seconds < 0:
            raise ValueError("ttl_seconds must be a finite number of seconds, at least 0")

        async def work(connection: Any) -> int:
            status: str = await connection.execute(_CLEANUP_PREIMAGES, float(ttl_seconds))
            return int(status.split()[-1])  # "DELETE <count>"

        return await self._run(work)

    # -- connections and credentials ---------------------------------------------------------

    async def _run(self, work: Callable[[Any], Awaitable[T]], *, transaction: bool = False) -> T:
        """``work(connection)`` once; after a refused password, refresh it and try once more."""

        async def attempt() -> T:
            return await self._on_connection(await self._current_pool(), work, transaction)

        secrets = self.resources.secrets
        seen = self._pool_generation
        return await refresh_once(
            attempt,
            refused=_AUTH_ERRORS,
            # An injected pool is used as it is: whoever made it owns its credentials.
            refresh=functools.partial(self._replace_pool, seen, secrets)
            if secrets is not None and self._owns_pool
            else None,
            event="postgres_credentials_refused",
            target=self.target,
            action="refresh password, rebuild pool, retry once",
        )

    async def _on_connection(
        self, pool: Any, work: Callable[[Any], Awaitable[T]], transaction: bool
    ) -> T:
        async with pool.acquire(timeout=self._settings.connect_timeout) as connection:
            if not transaction:
                return await work(connection)
            async with connection.transaction():
                return await work(connection)

    async def current_pool(self) -> Any:
        """The pool in use now (rebuilt after a credential refresh), for background services."""
        return await self._current_pool()

    async def _current_pool(self) -> Any:
        if self._pool is None:
            async with self._pool_lock:
                if self._pool is None:
                    self._pool = await self._create_pool()
        return self._pool

    async def _replace_pool(self, seen_generation: int, secrets: SecretSource) -> None:
        """Build the pool again with a freshly resolved password, unless a call that met the
        same refusal already did (the pool's generation moved on since ``seen_generation``)."""
        async with self._pool_lock:
            if self._pool_generation != seen_generation:
                return
            await secrets.refresh(PASSWORD_SECRET)
            stale, self._pool = self._pool, await self._create_pool()
            self._pool_generation += 1
        if stale is not None:
            await _close_pool(stale, self._settings.query_timeout)

    async def connect_unpooled(self) -> Any:
        """A connection outside the pool (for LISTEN), with the pool's parameters and password;
        a refused password is refreshed and tried once more, as for the pool."""
        secrets = self.resources.secrets
        return await refresh_once(
            self._connect_once,
            refused=_AUTH_ERRORS,
            refresh=None
            if secrets is None
            else functools.partial(secrets.refresh, PASSWORD_SECRET),
            event="postgres_credentials_refused",
            target=self.target,
            action="refresh password, reconnect once",
        )

    async def _connect_once(self) -> Any:
        password = await self._password()
        return await asyncpg.connect(
            password=None if password is None else password.get_secret_value(),
            **_connection_options(self._settings),
        )

    async def _create_pool(self) -> Any:
        settings = self._settings
        if settings.pool_min_size > settings.pool_max_size:
            raise ConfigurationError(
                f"postgres pool_min_size ({settings.pool_min_size}) exceeds pool_max_size "
                f"({settings.pool_max_size})",
                context=ErrorContext(
                    transport=self.transport, operation="connect", target=self.target
                ),
            )
        password = await self._password()
        return await self._pool_factory(
            password=None if password is None else password.get_secret_value(),
            min_size=settings.pool_min_size,
            max_size=settings.pool_max_size,
            **_connection_options(settings),
        )

    async def _password(self) -> SecretStr | None:
        password = await resolve_password(self._settings, self.resources.secrets)
        if password is None:
            self._login_from = None
        else:  # resolve_password returns the setting itself when it is the one used
            self._login_from = "setting" if password is self._settings.password else "secret"
        return password


async def resolve_password(
    settings: PostgresSettings, secrets: SecretSource | None
) -> SecretStr | None:
    """The registry's password: from the secret store when it knows the name, else the
    settings. Every command and service that connects uses this one rule."""
    return await secret_or_setting(secrets, PASSWORD_SECRET, settings.password)


def _connection_options(settings: PostgresSettings) -> dict[str, Any]:
    """What a pool and a lone connection share (the password is resolved separately)."""
    return {
        "host": settings.host,
        "port": settings.port,
        "user": settings.user,
        "database": settings.database,
        "timeout": settings.connect_timeout,
        "command_timeout": settings.query_timeout,
        "server_settings": {"application_name": APPLICATION_NAME},
    }


# ---------------------------------------------------------------------------------------------
# One function per statement idea, shared by the operations above.


async def _fetch_node(
    connection: Any, node_id: uuid.UUID, *, for_update: bool = False
) -> NodeRecord | None:
    query = f"{_SELECT_NODE} FOR UPDATE" if for_update else _SELECT_NODE
    row = await connection.fetchrow(query, node_id)
    return None if row is None else _node_record(row)


async def _preimage(
    connection: Any,
    node_id: uuid.UUID,
    writer: str | None,
    correlation_id: uuid.UUID | None,
    operation: str,
    current: NodeRecord | None,
) -> NodeRecord | None:
    """The row before the operation: ``current`` on its first attempt, which records it; the
    recorded row on a repeat (same writer: the same run). In the transaction of the write,
    after the row lock. Without a writer nothing is recorded and ``current`` is the answer."""
    if writer is None:
        return current
    recorded = await connection.fetchrow(
        _RECORD_PREIMAGE,
        node_id,
        writer,
        operation,
        None if current is None else current.model_dump_json(),
        correlation_id,
    )
    if recorded is not None:
        return current  # the first attempt: the row as read now is the pre-image
    stored = await _stored_preimage(connection, node_id, writer, operation)
    if stored is None:
        # Committed by a concurrent attempt we waited for, then deleted by a cleanup meanwhile:
        # roll back and let the retry decide again.
        raise asyncpg.exceptions.SerializationError(
            "the pre-image record changed concurrently; retry to read it"
        )
    return stored.previous


@dataclass(frozen=True, slots=True)
class _Preimage:
    """A recorded pre-image: ``previous`` is None when there was no row."""

    previous: NodeRecord | None


async def _stored_preimage(
    connection: Any, node_id: uuid.UUID, writer: str, operation: str
) -> _Preimage | None:
    """The pre-image ``writer`` recorded for ``operation``, or None if it recorded none."""
    stored = await connection.fetchrow(_STORED_PREIMAGE, node_id, writer, operation)
    if stored is None:
        return None
    previous = _json(stored["previous"])
    return _Preimage(None if previous is None else NodeRecord.model_validate(previous))


async def _write_node(connection: Any, request: RegisterNodeRequest) -> UpsertNodeResult:
    """Lock the existing row, record or read back the pre-image, then insert or update the row
    (stamped with its writer). In a transaction."""
    writer = current_writer(request.correlation_id)
    current = await _fetch_node(connection, request.node_id, for_update=True)
    previous = await _preimage(
        connection, request.node_id, writer, request.correlation_id, _UPSERT_OPERATION, current
    )
    row = await connection.fetchrow(
        _UPSERT_NODE,
        request.node_id,
        request.node_type.value,
        request.node_version,
        request.service_name,
        request.address,
        request.port,
        list(request.tags),
        json.dumps(request.endpoints.model_dump(mode="json")),
        json.dumps(request.metadata),
        request.correlation_id or current_correlation_id(),
        writer,
    )
    node = _node_record(row)
    if current is None and node.row_version != 1:
        # Another transaction created the row after our read: we cannot name the previous row,
        # so roll back and let the retry (which will see that row) report it.
        raise asyncpg.exceptions.SerializationError(
            "the node was registered concurrently; retry to learn its previous row"
        )
    return UpsertNodeResult(node=node, previous=previous)


async def _undo(
    connection: Any,
    node_id: uuid.UUID,
    previous: NodeRecord | None,
    writer: str | None,
    correlation_id: uuid.UUID | None,
) -> RestoreNodeResult:
    """Put the row back as ``previous`` (delete it for None), fenced on its writer: a row
    already as ``previous`` is ``unchanged``; a row another run wrote since (or removed) is
    ``superseded`` and left alone. Locks the row; in a transaction."""
    current = await _fetch_node(connection, node_id, for_update=True)
    if _same_state(current, previous):
        return RestoreNodeResult(action=UndoAction.UNCHANGED)
    if writer is not None and (
        current is None
        or not is_ours(current.written_by, current.correlation_id, writer, correlation_id)
    ):
        reason = (
            "the node's row was removed since"
            if current is None
            else f"the node was written since by {writer_workflow(current.written_by)}"
        )
        logger.info("postgres_undo_superseded", node_id=str(node_id), reason=reason)
        return RestoreNodeResult(action=UndoAction.SUPERSEDED, reason=reason)
    if previous is None:
        await connection.execute(_DELETE_NODE, node_id)
        return RestoreNodeResult(action=UndoAction.DELETED)
    await _restore_row(connection, previous)
    return RestoreNodeResult(action=UndoAction.RESTORED)


async def _undo_ambiguous(
    connection: Any, compensation: CompensationInput, writer: str | None
) -> RestoreNodeResult:
    """Undo a step that failed in a way that may have reached the database: the pre-image this
    writer recorded (in the transaction of its write) says whether the write committed."""
    operation = _AMBIGUOUS_OPERATIONS.get(compensation.forward_activity or "")
    node_id = compensation.request.get("node_id")
    if operation is None or node_id is None:
        raise ConfigurationError(
            "an ambiguous restore_node needs the forward activity (postgres.upsert_node or "
            "postgres.deactivate_node) and a request with a node_id",
            context=ErrorContext(
                transport=Transport.DATABASE,
                operation="restore_node",
                target=TARGET,
                correlation_id=compensation.correlation_id,
            ),
        )
    node = uuid.UUID(str(node_id))
    stored = None if writer is None else await _stored_preimage(connection, node, writer, operation)
    if stored is None:
        return RestoreNodeResult(action=UndoAction.UNCHANGED)  # the write never committed
    previous = stored.previous
    if operation == _DEACTIVATE_OPERATION and (
        previous is None or previous.status is not NodeStatus.ACTIVE
    ):
        return RestoreNodeResult(action=UndoAction.UNCHANGED)  # the deactivation changed nothing
    return await _undo(connection, node, previous, writer, compensation.correlation_id)


async def _restore_row(connection: Any, previous: NodeRecord) -> None:
    """Put ``previous`` back, every field (its writer too) but a forward-moving
    ``row_version``. In a transaction, after the row lock."""
    await connection.execute(
        _RESTORE_NODE,
        previous.node_id,
        previous.node_type.value,
        previous.node_version,
        previous.service_name,
        previous.address,
        previous.port,
        list(previous.tags),
        json.dumps(previous.endpoints),
        json.dumps(previous.metadata),
        previous.status.value,
        previous.row_version + 1,  # used only if the row is gone; else current + 1
        previous.correlation_id,
        previous.registered_at,
        previous.updated_at,
        previous.written_by,
    )


async def _deactivate(connection: Any, request: DeregisterNodeRequest) -> DeactivateNodeResult:
    """Lock the row, record or read back the pre-image, then deactivate the row if it is active.
    In a transaction. ``deactivated`` reports whether the operation (its first attempt, for a
    repeat) turned an active node inactive."""
    writer = current_writer(request.correlation_id)
    current = await _fetch_node(connection, request.node_id, for_update=True)
    previous = await _preimage(
        connection, request.node_id, writer, request.correlation_id, _DEACTIVATE_OPERATION, current
    )
    if current is not None and current.status is NodeStatus.ACTIVE:
        await connection.execute(
            _DEACTIVATE_NODE,
            request.node_id,
            request.correlation_id or current_correlation_id(),
            writer,
        )
    deactivated = previous is not None and previous.status is NodeStatus.ACTIVE
    return DeactivateNodeResult(previous=previous, deactivated=deactivated)


async def _insert_event(
    connection: Any, envelope: EventEnvelope, *, operation: str
) -> EnqueueEventResult:
    row_id = await enqueue(connection, envelope, operation=operation)
    return EnqueueEventResult(event_id=envelope.event_id, enqueued=row_id is not None)


def _forward_result(compensation: CompensationInput) -> UpsertNodeResult | DeactivateNodeResult:
    try:
        return _FORWARD_RESULT.validate_python(compensation.forward_result)
    except ValidationError as exc:
        raise ConfigurationError(
            "restore_node compensates postgres.upsert_node or postgres.deactivate_node: its "
            "forward_result must be the result of one of them",
            context=ErrorContext(
                transport=Transport.DATABASE,
                operation="restore_node",
                target=TARGET,
                correlation_id=compensation.correlation_id,
            ),
        ) from exc


def _json(value: Any) -> Any:
    """A jsonb column: text by default in asyncpg, already decoded if the pool has a codec."""
    return json.loads(value) if isinstance(value, str) else value


def _node_record(row: Any) -> NodeRecord:
    return NodeRecord(
        node_id=row["node_id"],
        node_type=row["node_type"],
        node_version=row["node_version"],
        service_name=row["service_name"],
        address=row["address"],
        port=row["port"],
        tags=tuple(row["tags"]),
        endpoints=_json(row["endpoints"]),
        metadata=_json(row["metadata"]),
        status=row["status"],
        row_version=row["row_version"],
        correlation_id=row["correlation_id"],
        registered_at=row["registered_at"],
        updated_at=row["updated_at"],
        written_by=row["written_by"],
    )


def _same_state(current: NodeRecord | None, previous: NodeRecord | None) -> bool:
    """No row either way, or equal in every field but ``row_version`` (which only ever moves
    forward)."""
    if current is None or previous is None:
        return current is previous
    return current.model_dump(exclude={"row_version"}) == previous.model_dump(
        exclude={"row_version"}
    )


async def _close_pool(pool: Any, timeout_seconds: float) -> None:
    try:
        await asyncio.wait_for(pool.close(), timeout_seconds)
    except TimeoutError:
        pool.terminate()
