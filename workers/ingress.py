"""The Kafka ingress: nodes announce themselves, and the orchestrator registers them.

:class:`IngressDispatcher` consumes ``onex.node.introspection.published.v1`` and
``onex.node.shutdown.announced.v1`` in a consumer group (``ONEX_INGRESS__GROUP_ID``). Per
record, in partition order:

* it parses and validates the envelope and its payload (:mod:`contracts.fleet`); a record that
  does not (garbage bytes, another schema version, an unknown node type, a missing node id, a
  credential in its metadata, too many bytes, an event type that is not its topic's) goes raw
  to the dead-letter topic with the reason, sanitized (:class:`~activities.ingest.DeadLetters`);
  nothing is started for it. So does one Temporal refuses outright (an ``RPCError`` other than
  unavailable or a deadline): retrying it would be refused again;
* it hands the register (or, on shutdown, deregister) request to the node's workflow through
  the per-node path (:func:`~workers.client.start_operation`), with the deterministic request
  id ``ingress-<event_id>``: a redelivered or duplicate message is the same Update, which
  Temporal attaches to the first one; it never starts a second operation. The correlation id
  is the envelope's, else the Kafka header's, else one derived from the event id (so a
  redelivery carries the same one);
* the partition's offset is committed only after the start was **accepted** (or the record
  dead-lettered). A process killed mid-batch redelivers the uncommitted records, which attach.

The dispatcher's own circuit breaker (``dispatcher.temporal``, 3 failures / 20 s by default)
guards the calls to the Temporal frontend. A transport failure (unavailable, deadline, no
acceptance within ``accept_timeout``) rewinds the partition to that record; once the breaker
opens, the consumer **pauses** its partitions (it keeps polling, so it stays in the group) until
the breaker admits a probe: no commits, and no dead letters, while Temporal is away. A node
whose queue is full (:class:`~workers.client.NodeBusy`, or the node workflow's refusal) is
back-pressure, not a bad message: the record is tried again after ``retry_delay``.

Metrics (the Temporal runtime's meter, so the worker's Prometheus endpoint shows them):
``onex_ingress_consumed``, ``onex_ingress_started``, ``onex_ingress_attached``,
``onex_ingress_dead_lettered`` and the gauge ``onex_ingress_consumer_lag``; the same figures
are in :attr:`IngressDispatcher.stats`. ``attached`` counts the messages this process had
already handed over (a redelivery after a pause); after a restart, Temporal's Update id still
makes a redelivery attach, but it is counted as started.

:func:`ingress_services` builds the dispatcher and the heartbeat consumer
(:class:`~activities.liveness.HeartbeatConsumer`) for ``onex ingress``; :func:`attach_ingress`
runs them inside ``onex worker`` (and the demo) and applies the liveness schedule.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import structlog
from pydantic import BaseModel
from temporalio.client import (
    Client,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.common import MetricMeter
from temporalio.runtime import Runtime
from temporalio.service import RPCError, RPCStatusCode

from activities.base import BackgroundService, SecretSource
from activities.ingest import DeadLetters, catalog_topic, rewind, start_group_consumer
from activities.kafka import EventPublisher
from activities.liveness import HeartbeatConsumer
from activities.resilience.breaker import BreakerRegistry, CircuitBreaker, CircuitOpenError
from activities.resilience.correlation import correlation_from_kafka_headers, correlation_scope
from activities.resilience.sanitize import sanitize_exception
from contracts.fleet import (
    MAX_INTROSPECTION_BYTES,
    InboundEnvelope,
    Refusal,
    deregistration,
    parse_envelope,
    registration,
)
from contracts.resilience import BreakerSettings
from contracts.topics import TopicName
from workers.client import NodeBusy, Operations, start_operation
from workers.host import WorkerHost
from workers.settings import OnexSettings
from workflows.liveness import SWEEP_ACTIVITY

__all__ = [
    "BREAKER_NAME",
    "SWEEP_ACTIVITY",
    "IngressDispatcher",
    "IngressStats",
    "attach_ingress",
    "correlation_for",
    "ingress_services",
    "request_id_for",
    "temporal_unreachable",
]

logger = structlog.get_logger("onex.ingress")

BREAKER_NAME = "dispatcher.temporal"
TOPICS = (TopicName.NODE_INTROSPECTION_PUBLISHED, TopicName.NODE_SHUTDOWN_ANNOUNCED)
_CORRELATION_NAMESPACE = uuid.UUID("9b1f6c1e-3f7a-4d55-9a51-2c0e6d7b8a10")
_REMEMBERED = 10_000  # event ids kept to tell an attach from a start (see the module docstring)

_UNREACHABLE = frozenset(
    {
        RPCStatusCode.UNAVAILABLE,
        RPCStatusCode.DEADLINE_EXCEEDED,
        RPCStatusCode.CANCELLED,
        RPCStatusCode.UNKNOWN,
    }
)


def temporal_unreachable(exc: BaseException) -> bool:
    """A failure of the Temporal frontend as a transport (what the breaker counts)."""
    if isinstance(exc, RPCError):
        return exc.status in _UNREACHABLE
    return isinstance(exc, TimeoutError | OSError | WorkflowUpdateRPCTimeoutOrCancelledError)


def request_id_for(envelope: InboundEnvelope) -> str:
    """The Update id of a message: the same for every delivery of it."""
    return f"ingress-{envelope.event_id}"


def correlation_for(envelope: InboundEnvelope, headers: Any) -> uuid.UUID:
    """The envelope's correlation id, else the header's, else one derived from the event id."""
    return (
        envelope.correlation_id
        or correlation_from_kafka_headers(headers)
        or uuid.uuid5(_CORRELATION_NAMESPACE, str(envelope.event_id))
    )


@dataclass
class IngressStats:
    consumed: int = 0
    started: int = 0
    attached: int = 0
    dead_lettered: int = 0
    retried: int = 0
    committed: int = 0  # records whose offsets were committed
    lag: int = 0
    paused: bool = False
    pauses: int = 0


class _Retry(Exception):
    """The record could not be handed over now: rewind to it and come back."""

    def __init__(self, *, unavailable: bool) -> None:
        super().__init__()
        self.unavailable = unavailable


class _Metrics:
    def __init__(self, meter: MetricMeter) -> None:
        self.consumed = meter.create_counter("onex_ingress_consumed", "Records consumed")
        self.started = meter.create_counter("onex_ingress_started", "Operations started")
        self.attached = meter.create_counter(
            "onex_ingress_attached", "Messages that attached to an operation already accepted"
        )
        self.dead_lettered = meter.create_counter(
            "onex_ingress_dead_lettered", "Records refused to the dead-letter topic"
        )
        self.lag = meter.create_gauge("onex_ingress_consumer_lag", "Records not yet consumed")


Submit = Callable[[str, BaseModel, str], Awaitable[object]]


class IngressDispatcher:
    """Registers and deregisters nodes from their Kafka events; see the module docstring."""

    def __init__(
        self,
        settings: OnexSettings,
        client: Client,
        dead_letters: DeadLetters,
        *,
        breaker: CircuitBreaker,
        operations: Operations | None = None,
        meter: MetricMeter | None = None,
    ) -> None:
        self.settings = settings
        self.client = client
        self.dead_letters = dead_letters
        self.breaker = breaker
        self.operations = operations
        self.stats = IngressStats()
        runtime = client.service_client.config.runtime or Runtime.default()
        self._metrics = _Metrics(meter or runtime.metric_meter)
        self._handed_over: OrderedDict[uuid.UUID, None] = OrderedDict()
        self._log = logger.bind(group_id=settings.ingress.group_id)

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until ``stop`` is set (a background service)."""
        ingress = self.settings.ingress
        consumer = await start_group_consumer(
            self.settings.kafka, list(TOPICS), group_id=ingress.group_id
        )
        try:
            while not stop.is_set():
                if self.stats.paused:
                    await self._while_open(consumer)
                    continue
                batches = await consumer.getmany(
                    timeout_ms=ingress.poll_timeout_ms, max_records=ingress.max_records
                )
                if batches:
                    await self._handle(consumer, batches, stop)
                await self._measure_lag(consumer)
        finally:
            await consumer.stop()

    async def _while_open(self, consumer: Any) -> None:
        """Paused: keep polling (to stay in the group) until the breaker admits a probe."""
        if self.breaker.open_until is not None:
            remaining = self.breaker.open_until - self.breaker.clock()
            if remaining > 0:
                timeout = min(remaining * 1000, self.settings.ingress.poll_timeout_ms)
                # Paused partitions return nothing; a new assignment after a rebalance is not
                # paused, so pause whatever is assigned now.
                consumer.pause(*consumer.assignment())
                await consumer.getmany(timeout_ms=max(int(timeout), 1))
                return
        consumer.resume(*consumer.assignment())
        self.stats.paused = False
        self._log.info("ingress_resumed", breaker=self.breaker.state.value)

    async def _handle(
        self, consumer: Any, batches: dict[Any, list[Any]], stop: asyncio.Event
    ) -> None:
        done: dict[Any, int] = {}
        dealt_with = 0
        pending: dict[Any, int] = {}
        retry: _Retry | None = None
        for partition, records in batches.items():
            if retry is not None:
                pending[partition] = records[0].offset
                continue
            for record in records:
                try:
                    await self._dispatch(record)
                except _Retry as again:
                    retry = again
                    pending[partition] = record.offset
                    break
                done[partition] = record.offset + 1
                dealt_with += 1
        if done:
            await consumer.commit(done)
            self.stats.committed += dealt_with
        if retry is None:
            return
        rewind(consumer, pending)
        self.stats.retried += 1
        if retry.unavailable and self.breaker.open_until is not None:
            consumer.pause(*consumer.assignment())
            self.stats.paused = True
            self.stats.pauses += 1
            self._log.warning(
                "ingress_paused",
                reason="the Temporal frontend is unreachable; the dispatcher breaker is open",
                retry_in=round(self.breaker.open_until - self.breaker.clock(), 3),
            )
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.settings.ingress.retry_delay)

    async def _dispatch(self, record: Any) -> None:
        self.stats.consumed += 1
        self._metrics.consumed.add(1)
        try:
            envelope = parse_envelope(record.value, max_bytes=MAX_INTROSPECTION_BYTES)
            topic = catalog_topic(self.settings.kafka, record.topic)
            if envelope.event_type != topic:
                raise Refusal(f"event_type {envelope.event_type[:100]!r} does not match its topic")
            correlation_id = correlation_for(envelope, record.headers)
            request: BaseModel
            if topic == TopicName.NODE_SHUTDOWN_ANNOUNCED:
                operation, request = "deregister_node", deregistration(envelope, correlation_id)
            else:
                operation, request = "register_node", registration(envelope, correlation_id)
        except Refusal as refusal:
            await self._dead_letter(record, refusal.reason)
            return
        with correlation_scope(correlation_id):
            await self._hand_over(record, envelope, operation, request)

    async def _hand_over(
        self, record: Any, envelope: InboundEnvelope, operation: str, request: BaseModel
    ) -> None:
        seen = envelope.event_id in self._handed_over
        try:
            async with self.breaker.guard(is_failure=temporal_unreachable):
                async with asyncio.timeout(self.settings.ingress.accept_timeout):
                    handle = await start_operation(
                        self.client,
                        operation,
                        request,
                        settings=self.settings,
                        operations=self.operations,
                        request_id=request_id_for(envelope),
                    )
        except CircuitOpenError:
            raise _Retry(unavailable=True) from None
        except (NodeBusy, WorkflowUpdateFailedError) as busy:
            # The node's queue is full: back-pressure; the same Update is sent again later.
            self._log.info(
                "ingress_node_busy", offset=record.offset, error=sanitize_exception(busy)
            )
            raise _Retry(unavailable=False) from None
        except RPCError as refused:
            if temporal_unreachable(refused):
                self._unreachable(record, refused)
            # Temporal answered and refused this start (an invalid argument, say): retrying
            # would refuse it again, so it is the message's problem, not the service's.
            await self._dead_letter(record, f"Temporal refused the start: {refused.status.name}")
            return
        except Exception as exc:
            if not temporal_unreachable(exc):
                raise  # a bug or bad configuration (the contracts): the service restarts
            self._unreachable(record, exc)
        self._remember(envelope.event_id)
        if seen:
            self.stats.attached += 1
            self._metrics.attached.add(1)
        else:
            self.stats.started += 1
            self._metrics.started.add(1)
        self._log.info(
            "ingress_accepted",
            operation=operation,
            workflow_id=handle.id,
            event_id=str(envelope.event_id),
            attached=seen,
        )

    def _unreachable(self, record: Any, exc: BaseException) -> NoReturn:
        self._log.warning(
            "ingress_temporal_unreachable",
            offset=record.offset,
            error=sanitize_exception(exc),
            breaker=self.breaker.state.value,
        )
        raise _Retry(unavailable=True) from None

    def _remember(self, event_id: uuid.UUID) -> None:
        self._handed_over[event_id] = None
        self._handed_over.move_to_end(event_id)
        while len(self._handed_over) > _REMEMBERED:
            self._handed_over.popitem(last=False)

    async def _dead_letter(self, record: Any, reason: str) -> None:
        try:
            await self.dead_letters.send(record, reason)
        except Exception as exc:
            # Not committed: the record is tried again (the dead-letter topic may be back).
            self._log.warning("ingress_dead_letter_failed", error=sanitize_exception(exc))
            raise _Retry(unavailable=False) from None
        self.stats.dead_lettered += 1
        self._metrics.dead_lettered.add(1)
        self._log.warning(
            "ingress_dead_lettered",
            topic=record.topic,
            partition=record.partition,
            offset=record.offset,
            reason=reason,
        )

    async def _measure_lag(self, consumer: Any) -> None:
        lag = 0
        for partition in consumer.assignment():
            highwater = consumer.highwater(partition)
            if highwater is None:
                continue
            with contextlib.suppress(Exception):  # a partition revoked meanwhile
                lag += max(0, highwater - await consumer.position(partition))
        self.stats.lag = lag
        self._metrics.lag.set(lag)


def dispatcher_breaker(settings: OnexSettings, breakers: BreakerRegistry) -> CircuitBreaker:
    """The dispatcher's breaker around the Temporal frontend, in the process's registry."""
    ingress = settings.ingress
    return breakers.get(
        BREAKER_NAME,
        BreakerSettings(
            failure_threshold=ingress.breaker_failure_threshold,
            open_seconds=ingress.breaker_open_seconds,
            success_threshold=1,
        ),
    )


class _LazyPool:
    """An asyncpg pool for the heartbeat consumer, created on first use (the database may be
    down when the process starts) and closed with the ingress."""

    def __init__(self, settings: OnexSettings, secrets: SecretSource | None) -> None:
        self._settings = settings
        self._secrets = secrets
        self._pool: Any = None
        self._lock = asyncio.Lock()

    async def __call__(self) -> Any:
        async with self._lock:
            if self._pool is None:
                import asyncpg

                from activities.postgres import resolve_password

                postgres = self._settings.postgres
                password = await resolve_password(postgres, self._secrets)
                self._pool = await asyncpg.create_pool(
                    postgres.dsn,
                    password=None if password is None else password.get_secret_value(),
                    min_size=1,
                    max_size=2,
                    timeout=postgres.connect_timeout,
                    command_timeout=postgres.query_timeout,
                )
            return self._pool

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        if pool is not None:
            await pool.close()


@dataclass
class Ingress:
    """What :func:`ingress_services` built: the services to run, and :meth:`close` after."""

    dispatcher: IngressDispatcher
    heartbeats: HeartbeatConsumer
    services: dict[str, BackgroundService]
    _publisher: EventPublisher
    _pool: _LazyPool

    async def close(self) -> None:
        await self._publisher.stop()
        await self._pool.close()


async def ingress_services(
    settings: OnexSettings,
    client: Client,
    breakers: BreakerRegistry,
    *,
    secrets: SecretSource | None = None,
    operations: Operations | None = None,
) -> Ingress:
    """The dispatcher and the heartbeat consumer, sharing one dead-letter publisher."""
    ingress = settings.ingress
    publisher = EventPublisher(settings.kafka, breakers, secrets=secrets)
    dispatcher = IngressDispatcher(
        settings,
        client,
        DeadLetters(publisher, group_id=ingress.group_id),
        breaker=dispatcher_breaker(settings, breakers),
        operations=operations,
    )
    pool = _LazyPool(settings, secrets)
    heartbeats = HeartbeatConsumer(
        settings.kafka,
        pool,
        DeadLetters(publisher, group_id=ingress.heartbeat_group_id),
        group_id=ingress.heartbeat_group_id,
        max_records=ingress.heartbeat_max_records,
        poll_timeout_ms=ingress.poll_timeout_ms,
        retry_seconds=ingress.retry_delay,
    )
    services: dict[str, BackgroundService] = {
        "ingress dispatcher (kafka -> node workflows)": dispatcher.run,
        "heartbeat consumer (kafka -> postgres)": heartbeats.run,
    }
    return Ingress(dispatcher, heartbeats, services, publisher, pool)


async def attach_ingress(host: WorkerHost, settings: OnexSettings) -> Ingress:
    """Run the ingress and the heartbeat consumer beside the host's activities (its breakers,
    its secrets), closed with it, and apply the liveness schedule (created, or updated to the
    settings)."""
    from workers.schedules import apply_schedules

    built = await ingress_services(settings, host.client, host.breakers, secrets=host.secrets)
    for name, service in built.services.items():
        host.background_services.append(service)
        host.report.services.append(name)
    host.closers.append(built.close)
    for schedule_id, applied in (await apply_schedules(host.client, settings)).items():
        host.report.services.append(f"schedule {schedule_id} ({applied.value})")
    return built
