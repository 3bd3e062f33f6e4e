"""The outbox relay: carries committed ``onex_outbox`` rows to Kafka, at least once (SPEC §5).

:func:`enqueue` writes on the caller's connection, so a business write and its event can commit
in one transaction (``PostgresHandler.upsert_node_and_enqueue``). The operation workflow queues
its outcome events after the steps, since an outcome (registered, or failed) is known only once
every backend has answered; it writes them (and its started event) through local activities,
run inside its workflow tasks, so an event costs an insert and no server round trip. The relay,
running inside the worker process (not as an activity), publishes the rows afterwards. Kafka
being down never blocks an operation: its events wait in the outbox.

How a drain works (:meth:`OutboxRelay.drain`), one pass over the outbox:

1. In a transaction, claim up to ``batch_size`` unpublished rows past the last claimed id,
   oldest first, ``FOR UPDATE SKIP LOCKED``: relays running side by side never claim the same
   row, and a row another relay just published is re-checked after locking and left out.
2. Publish each through the :class:`~activities.kafka.EventPublisher` (stored topic, key,
   headers, the envelope's JSON), in id order.
3. In the same transaction: mark published rows ``published_at = now()``; record failures;
   move rows that used up their attempts to ``onex_dead_letters`` (INSERT ... SELECT, then
   DELETE). Commit; the next batch starts after the last claimed id.

What counts toward dead-lettering (``max_attempts``, 3 by default). Only a publish the broker
or the client *refused for this record* counts: an error that
:func:`~activities.resilience.classify.classify` calls non-retryable (record too large,
authorization or authentication refused, invalid topic or configuration, anything
unclassified). Those increment ``attempts`` and set ``last_error``; the publish that brings
``attempts`` to ``max_attempts`` moves the row to the dead letters with the same reason.
Retryable failures (connection, timeout, unavailable, rate limited) mean the broker is down or
busy, not that the record is bad: they set ``last_error`` but never increment ``attempts``, so
the row waits for Kafka however long it is away. An open circuit breaker
(:class:`~activities.resilience.breaker.CircuitOpenError`) leaves the row untouched, and the
topic is left out of the rest of the drain: the broker is known to be down, nothing was tried.

Reasons and ``last_error`` name the classified kind of failure and the native exception's class
(``InfraAuthenticationError: TopicAuthorizationFailedError``), built from class names only:
never the native exception's text, which may hold a broker address or credentials. Log lines
of the relay carry the same, or :func:`~activities.resilience.sanitize.sanitize_exception`.

Rows stay locked only while their batch's transaction is open, and that transaction is open
while the batch is published. With Kafka down, a publish fails after about
``request_timeout_ms`` (aiokafka's metadata wait, or the expiry of an unsent batch; never more
than ``delivery_timeout_ms``, which bounds the whole call), and only ``failure_threshold`` (3)
publishes per topic are tried before its breaker opens and the remaining rows of that topic are
skipped without a network call. So with Kafka down a batch holds its locks for about
3 x ``request_timeout_ms`` per topic (3 s with the tests' 1 s), and later drains try one
half-open probe per topic once the breaker's ``open_seconds`` passed. Other relays skip locked
rows, and business inserts never wait on them.

A relay that publishes a row and then fails to commit (the database went away) leaves the row
unpublished, so it is published again later: delivery is at least once, and consumers dedupe on
``event_id`` (:class:`~activities.kafka.DedupingConsumer`).

Wake-ups: :meth:`OutboxRelay.run` LISTENs on channel ``onex_outbox`` (a statement-level trigger
NOTIFYs on every insert) on a connection of its own, opened with ``listen_connect`` (the worker
passes one built from the PostgreSQL settings), outside the pool: a rebuilt pool never waits for
it. Without ``listen_connect`` it holds one pooled connection instead. A notification, or
``poll_interval`` without one (the fallback for missed notifications, e.g. across a reconnect),
starts the next drain. When that connection is lost (the server restarted, the backend was
terminated) the relay wakes up, LISTENs on a new one and drains; if that fails it logs and tries
again on the next turn. Nothing about the LISTEN connection ends :meth:`OutboxRelay.run`.

Rows are written by :func:`enqueue` (the PostgreSQL handler uses it too), with the envelope's
headers: ``correlation_id``, ``event_id`` and ``event_type``.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import asyncpg
import structlog

from activities.kafka import envelope_headers
from activities.migrate import TARGET
from activities.resilience.breaker import CircuitOpenError, StateChange
from activities.resilience.classify import classify
from activities.resilience.correlation import current_correlation_id
from activities.resilience.sanitize import sanitize_exception
from contracts.errors import ConfigurationError, ErrorContext, InfraError, Transport
from contracts.events import EventEnvelope, new_envelope
from contracts.topics import TopicName

__all__ = [
    "CHANNEL",
    "DrainResult",
    "OutboxRelay",
    "Publisher",
    "StateChangeEvents",
    "enqueue",
]

CHANNEL = "onex_outbox"
LAST_ERROR_LENGTH = 300
CLOSE_TIMEOUT = 5.0  # seconds to close the LISTEN connection gracefully, else it is terminated

logger = structlog.get_logger("onex.outbox")


class Publisher(Protocol):
    """What the relay needs of :class:`~activities.kafka.EventPublisher`."""

    async def publish(
        self,
        topic: str,
        value: bytes,
        *,
        key: bytes | None,
        headers: list[tuple[str, bytes]],
    ) -> Any: ...


_INSERT = """
INSERT INTO onex_outbox (event_id, topic, message_key, envelope, headers, correlation_id)
VALUES ($1, $2, $3, $4::jsonb, $5::jsonb, $6)
ON CONFLICT (event_id) DO NOTHING
RETURNING id
"""


async def enqueue(
    connection: Any, envelope: EventEnvelope, *, operation: str = "enqueue_event"
) -> int | None:
    """Insert ``envelope`` into the outbox on ``connection`` (inside the caller's transaction).

    The one way rows get into the outbox. The row holds the catalog topic (without prefix), the
    message key, the envelope's JSON and its Kafka headers (correlation id, event id, event
    type: :func:`~activities.kafka.envelope_headers`) as a JSON array of ``[name, text]``
    pairs. Returns the row id, or None when an event with the same ``event_id`` is already
    there (a retried activity enqueues it once).

    Raises :class:`~contracts.errors.ConfigurationError` (naming ``operation``)
    when the event type is not a catalog topic or the payload lacks the topic's key field.
    """
    try:
        key = envelope.key()
    except (KeyError, ValueError) as exc:
        raise ConfigurationError(
            f"cannot enqueue event {envelope.event_id}: {envelope.event_type!r} is not a "
            "catalog topic, or its payload lacks the topic's key field",
            context=ErrorContext(
                transport=Transport.DATABASE,
                operation=operation,
                target=TARGET,
                correlation_id=envelope.correlation_id,
            ),
        ) from exc
    headers = [[name, value.decode()] for name, value in envelope_headers(envelope)]
    row_id: int | None = await connection.fetchval(
        _INSERT,
        envelope.event_id,
        envelope.event_type,
        key,
        envelope.model_dump_json(),
        json.dumps(headers),
        envelope.correlation_id,
    )
    return row_id


_CLAIM = """
SELECT id, event_id, topic, message_key, envelope::text AS envelope, headers::text AS headers,
       correlation_id, attempts
FROM onex_outbox
WHERE published_at IS NULL AND id > $1 AND topic <> ALL($3::text[])
ORDER BY id
LIMIT $2
FOR UPDATE SKIP LOCKED
"""
_MARK_PUBLISHED = "UPDATE onex_outbox SET published_at = now() WHERE id = ANY($1::bigint[])"
_RECORD_DEFERRED = """
UPDATE onex_outbox AS o SET last_error = f.reason
FROM unnest($1::bigint[], $2::text[]) AS f(id, reason)
WHERE o.id = f.id
"""
_RECORD_FAILED = """
UPDATE onex_outbox AS o SET attempts = o.attempts + 1, last_error = f.reason
FROM unnest($1::bigint[], $2::text[]) AS f(id, reason)
WHERE o.id = f.id
"""
_DEAD_LETTER = """
INSERT INTO onex_dead_letters (outbox_id, event_id, topic, message_key, envelope, headers,
                               correlation_id, attempts, reason, created_at)
SELECT o.id, o.event_id, o.topic, o.message_key, o.envelope, o.headers, o.correlation_id,
       o.attempts + 1, f.reason, o.created_at
FROM onex_outbox AS o JOIN unnest($1::bigint[], $2::text[]) AS f(id, reason) ON o.id = f.id
ON CONFLICT (outbox_id) DO NOTHING
"""
_DELETE = "DELETE FROM onex_outbox WHERE id = ANY($1::bigint[])"


@dataclass
class DrainResult:
    """What one batch (or a whole drain) did."""

    claimed: int = 0
    published: int = 0
    failed: int = 0  # refused publishes that count toward dead-lettering
    deferred: int = 0  # transport failures: the row waits, attempts unchanged
    dead_lettered: int = 0
    skipped: int = 0  # rows claimed but not tried because their topic's breaker is open

    def add(self, other: DrainResult) -> None:
        self.claimed += other.claimed
        self.published += other.published
        self.failed += other.failed
        self.deferred += other.deferred
        self.dead_lettered += other.dead_lettered
        self.skipped += other.skipped


def _headers(row: Any) -> list[tuple[str, bytes]]:
    """The row's stored headers, as :func:`enqueue` wrote them (``[[name, text], ...]``)."""
    raw = row["headers"]
    pairs: list[list[str]] = json.loads(raw) if raw else []
    return [(name, value.encode()) for name, value in pairs]


def _reason(error: InfraError, exc: BaseException) -> str:
    """``<our error class>: <native class>``, e.g. ``ConfigurationError: RecordTooLargeError``.

    Built from class names only, never from the exception's text. It is not passed through
    ``sanitize_text``: its credential markers match class names such as
    ``TopicAuthorizationFailedError`` and would blank the one useful fact.
    """
    return f"{error.error_type}: {type(exc).__name__}"[:LAST_ERROR_LENGTH]


class OutboxRelay:
    """Publishes outbox rows through ``publisher``; see the module docstring for the rules.

    ``pool`` is an asyncpg pool, or an async callable returning the current one (the worker
    passes the PostgreSQL handler's, which is rebuilt after a credential refresh); each batch
    of :meth:`drain` uses one of its connections for its transaction.

    ``listen_connect`` opens the connection :meth:`run` LISTENs on (``asyncpg.connect`` with
    the database's parameters); the relay owns it and closes it. Without it :meth:`run` holds
    one of the pool's connections for LISTEN instead (fine for a pool nobody rebuilds).
    """

    def __init__(
        self,
        pool: Any | Callable[[], Awaitable[Any]],
        publisher: Publisher,
        *,
        listen_connect: Callable[[], Awaitable[asyncpg.Connection]] | None = None,
        batch_size: int = 100,
        poll_interval: float = 1.0,
        max_attempts: int = 3,
    ) -> None:
        if batch_size < 1 or max_attempts < 1 or poll_interval <= 0:
            raise ValueError("batch_size and max_attempts must be >= 1, poll_interval > 0")
        self.pool = pool
        self.listen_connect = listen_connect
        self._listen_pool: Any = None  # the pool the LISTEN connection came from, if any
        self.publisher = publisher
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.max_attempts = max_attempts
        self.totals = DrainResult()
        self.drains = 0
        self._wake = asyncio.Event()

    # -- draining ----------------------------------------------------------------------------

    async def drain(self) -> int:
        """One pass over the unpublished rows; returns how many were published."""
        result = DrainResult()
        blocked: set[str] = set()
        after = 0
        while True:
            batch, last_id = await self._drain_batch(after, blocked)
            result.add(batch)
            if batch.claimed < self.batch_size or last_id is None:
                break
            after = last_id
        self.totals.add(result)
        self.drains += 1
        if result.claimed:
            log = logger.warning if result.dead_lettered or result.deferred else logger.info
            log(
                "outbox_drained",
                published=result.published,
                failed=result.failed,
                deferred=result.deferred,
                dead_lettered=result.dead_lettered,
                skipped=result.skipped,
                blocked_topics=sorted(blocked),
            )
        return result.published

    async def _drain_batch(self, after: int, blocked: set[str]) -> tuple[DrainResult, int | None]:
        result = DrainResult()
        published: list[int] = []
        deferred: tuple[list[int], list[str]] = ([], [])
        failed: tuple[list[int], list[str]] = ([], [])
        dead: tuple[list[int], list[str]] = ([], [])
        pool = await self._current_pool()
        async with pool.acquire() as connection, connection.transaction():
            rows = await connection.fetch(_CLAIM, after, self.batch_size, sorted(blocked))
            result.claimed = len(rows)
            for row in rows:
                topic: str = row["topic"]
                if topic in blocked:
                    result.skipped += 1
                    continue
                try:
                    await self.publisher.publish(
                        topic,
                        row["envelope"].encode(),
                        key=row["message_key"],
                        headers=_headers(row),
                    )
                except CircuitOpenError:
                    # Kafka is known to be down for this topic: not an attempt, nothing to record.
                    blocked.add(topic)
                    result.skipped += 1
                    continue
                except Exception as exc:
                    error = classify(exc, self._context(topic, row["correlation_id"]))
                    reason = _reason(error, exc)
                    if error.retryable:
                        target = deferred
                    elif row["attempts"] + 1 >= self.max_attempts:
                        target = dead
                    else:
                        target = failed
                    target[0].append(row["id"])
                    target[1].append(reason)
                    logger.debug(
                        "outbox_publish_failed",
                        outbox_id=row["id"],
                        topic=topic,
                        error_type=error.error_type,
                        counted=not error.retryable,
                    )
                    continue
                published.append(row["id"])
            if published:
                await connection.execute(_MARK_PUBLISHED, published)
            if deferred[0]:
                await connection.execute(_RECORD_DEFERRED, *deferred)
            if failed[0]:
                await connection.execute(_RECORD_FAILED, *failed)
            if dead[0]:
                await connection.execute(_DEAD_LETTER, *dead)
                await connection.execute(_DELETE, dead[0])
        result.published = len(published)
        result.deferred = len(deferred[0])
        result.failed = len(failed[0]) + len(dead[0])
        result.dead_lettered = len(dead[0])
        for outbox_id, reason in zip(*dead, strict=True):
            logger.warning("outbox_dead_lettered", outbox_id=outbox_id, reason=reason)
        return result, (rows[-1]["id"] if rows else None)

    @staticmethod
    def _context(topic: str, correlation_id: uuid.UUID | None) -> ErrorContext:
        return ErrorContext(
            transport=Transport.KAFKA,
            operation="outbox.publish",
            target=topic,
            correlation_id=correlation_id,
        )

    # -- running -----------------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Drain on every NOTIFY on ``onex_outbox``, or every ``poll_interval``, until ``stop``.

        Survives its LISTEN connection: a lost one is replaced on the next turn (the loss
        itself wakes the relay), a failure to LISTEN is logged and tried again on the next turn.
        """
        listener: Any = None
        try:
            while not stop.is_set():
                if not _is_open(listener):
                    if listener is not None:
                        await self._unlisten(listener)
                    listener = await self._listen()
                self._wake.clear()  # a NOTIFY arriving during the drain wakes the next one
                try:
                    await self.drain()
                except Exception as exc:  # the database is away: try again at the next wake-up
                    logger.warning("outbox_drain_failed", error=sanitize_exception(exc))
                await self._sleep(stop)
        finally:
            if listener is not None:
                await self._unlisten(listener)

    async def _current_pool(self) -> Any:
        if hasattr(self.pool, "acquire"):
            return self.pool
        return await self.pool()

    def _notified(self, *_args: object) -> None:
        self._wake.set()

    def _connection_lost(self, *_args: object) -> None:
        """A termination listener: wake up, so that the next turn LISTENs on a new connection."""
        self._wake.set()

    async def _listen(self) -> Any:
        """A connection LISTENing on :data:`CHANNEL`, or None (logged) if that failed now."""
        connection: Any = None
        try:
            if self.listen_connect is not None:
                self._listen_pool = None
                connection = await self.listen_connect()
            else:
                self._listen_pool = await self._current_pool()
                connection = await self._listen_pool.acquire()
            connection.add_termination_listener(self._connection_lost)
            await connection.add_listener(CHANNEL, self._notified)
        except Exception as exc:
            logger.warning("outbox_listen_failed", error=sanitize_exception(exc))
            if connection is not None:
                await self._unlisten(connection)
            return None
        return connection

    async def _unlisten(self, connection: Any) -> None:
        """Stop listening and give the connection back (pool) or close it (own); never raises."""
        try:
            if _is_open(connection):
                connection.remove_termination_listener(self._connection_lost)
                await connection.remove_listener(CHANNEL, self._notified)
        except Exception as exc:
            logger.warning("outbox_unlisten_failed", error=sanitize_exception(exc))
        try:
            if self._listen_pool is not None:
                await self._listen_pool.release(connection)
            elif not connection.is_closed():
                await connection.close(timeout=CLOSE_TIMEOUT)
        except Exception as exc:
            logger.warning("outbox_unlisten_failed", error=sanitize_exception(exc))
            if self._listen_pool is None:
                _terminate(connection)

    async def _sleep(self, stop: asyncio.Event) -> None:
        """Until a notification, ``stop``, or ``poll_interval`` (the poll fallback)."""
        waits = [asyncio.ensure_future(self._wake.wait()), asyncio.ensure_future(stop.wait())]
        try:
            await asyncio.wait(
                waits, timeout=self.poll_interval, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            for waiter in waits:
                waiter.cancel()
            await asyncio.gather(*waits, return_exceptions=True)


def _is_open(connection: Any) -> bool:
    """Whether ``connection`` can still be used; a pooled one may have been detached already."""
    if connection is None:
        return False
    try:
        return not connection.is_closed()
    except Exception:  # InterfaceError: a pool connection released after its backend died
        return False


def _terminate(connection: Any) -> None:
    try:
        connection.terminate()
    except Exception as exc:
        logger.warning("outbox_unlisten_failed", error=sanitize_exception(exc))


class StateChangeEvents:
    """A breaker listener queueing ``onex.infra.circuit_breaker.state_changed.v1`` in the outbox.

    Listeners are synchronous and run inside the breaker's caller, so the write is a task of
    its own; losing one (the database is away too) is logged, never raised into the call.
    """

    TOPIC = TopicName.INFRA_CIRCUIT_BREAKER_STATE_CHANGED

    def __init__(self, enqueue_event: Callable[[EventEnvelope], Awaitable[object]]) -> None:
        self._enqueue_event = enqueue_event
        self._tasks: set[asyncio.Task[None]] = set()

    def __call__(self, change: StateChange) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # a transition outside the event loop (a thread): log only
            return
        task = loop.create_task(self._enqueue(change))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _enqueue(self, change: StateChange) -> None:
        envelope = new_envelope(
            self.TOPIC, change.payload(), correlation_id=current_correlation_id() or uuid.uuid4()
        )
        try:
            await self._enqueue_event(envelope)
        except Exception as exc:
            logger.warning(
                "breaker_event_not_queued",
                breaker=change.service_name,
                error=sanitize_exception(exc),
            )
