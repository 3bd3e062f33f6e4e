"""The Kafka ingress on the real broker, Temporal dev server and PostgreSQL: nodes announce
themselves, the dispatcher registers them through the per-node path; bad input goes raw to the
dead-letter topic; a kill mid-batch loses nothing and registers nothing twice; the breaker
pauses consumption while Temporal is unreachable."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment

from activities.ingest import DeadLetters
from activities.kafka import EventPublisher
from activities.liveness import read_nodes
from activities.resilience.breaker import BreakerRegistry, BreakerState
from activities.resilience.correlation import KAFKA_HEADER
from contracts.fleet import FleetState
from contracts.topics import TopicName
from tests.fakes.fault_proxy import FaultProxy
from tests.fleet_support import (
    dead_letters,
    envelope,
    header,
    introspection,
    publish_raw,
    with_ingress,
)
from tests.stack import serving_stack
from tests.support import wait_until
from workers.client import OperationNotFound, connect, get_node_state
from workers.ingress import IngressDispatcher, dispatcher_breaker
from workers.settings import OnexSettings, TemporalSettings

INTROSPECTION = TopicName.NODE_INTROSPECTION_PUBLISHED
SHUTDOWN = TopicName.NODE_SHUTDOWN_ANNOUNCED


def _dispatcher(
    settings: OnexSettings, client: Client, cls: type[IngressDispatcher] = IngressDispatcher
) -> tuple[IngressDispatcher, EventPublisher]:
    breakers = BreakerRegistry()
    publisher = EventPublisher(settings.kafka, breakers)
    dispatcher = cls(
        settings,
        client,
        DeadLetters(publisher, group_id=settings.ingress.group_id),
        breaker=dispatcher_breaker(settings, breakers),
    )
    return dispatcher, publisher


@asynccontextmanager
async def running(dispatcher: IngressDispatcher, publisher: EventPublisher) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(dispatcher.run(stop))
    try:
        yield
    finally:
        stop.set()
        await asyncio.wait_for(task, 60)
        await publisher.stop()


async def _nodes(pg_dsn: str) -> dict[uuid.UUID, Any]:
    connection = await asyncpg.connect(pg_dsn)
    try:
        return {node.node_id: node for node in await read_nodes(connection)}
    finally:
        await connection.close()


async def _accepted(client: Client, node_id: uuid.UUID) -> int:
    try:
        return (await get_node_state(client, node_id)).accepted
    except OperationNotFound:
        return 0


async def test_bad_messages_are_dead_lettered_raw_with_a_sanitized_reason(
    temporal_env: WorkflowEnvironment,
    backends: OnexSettings,
    pg_dsn: str,
    topic_prefix: str,
    task_queue: str,
) -> None:
    """Garbage bytes, a wrong schema version, an unknown node type, a missing node id, an
    oversized payload, a credential in metadata and an event of another topic each go raw to
    the dead-letter topic with a reason that names the problem and never the secret; nothing
    is registered for them; the valid message next to them registers its node, and the
    consumer keeps going."""
    secret = "s3cr3t-Value-" + uuid.uuid4().hex
    missing_id = introspection()
    del missing_id["node_id"]
    bad = {
        b"\x00\xffgarbage": "not an event envelope",
        envelope(INTROSPECTION, introspection(schema_version=2)): "schema_version 2",
        envelope(INTROSPECTION, introspection(node_type="toaster")): "node_type",
        envelope(INTROSPECTION, missing_id): "node_id",
        envelope(INTROSPECTION, introspection(metadata={"blob": "x" * 70_000})): "over the limit",
        envelope(INTROSPECTION, introspection(metadata={"db_password": secret})): "credential",
        envelope(TopicName.NODE_HEARTBEAT_PUBLISHED, introspection()): "does not match",
    }
    good_id = uuid.uuid4()
    header_correlation = uuid.uuid4()
    async with serving_stack(temporal_env, backends, pg_dsn, topic_prefix, task_queue) as stack:
        settings = with_ingress(stack.settings)
        await publish_raw(settings, INTROSPECTION, list(bad))
        await publish_raw(
            settings,
            INTROSPECTION,
            [envelope(INTROSPECTION, introspection(good_id))],
            headers=[(KAFKA_HEADER, str(header_correlation).encode())],
        )
        dispatcher, publisher = _dispatcher(settings, stack.client)
        async with running(dispatcher, publisher):
            letters = await dead_letters(settings, count=len(bad))

            async def registered() -> bool:
                return good_id in await _nodes(pg_dsn)

            await wait_until(registered, within=60, what="the valid node to be registered")
    assert len(letters) == len(bad), (
        f"expected {len(bad)} dead letters, got {len(letters)}: the dispatcher must refuse each "
        "bad message to the dead-letter topic (workers/ingress.py _dispatch)"
    )
    by_value = {bytes(record.value): header(record, "dlq_reason") or "" for record in letters}
    assert set(by_value) == set(bad), "dead letters must carry the consumed value unchanged"
    for value, expected in bad.items():
        reason = by_value[value]
        assert expected in reason, f"reason {reason!r} should name {expected!r}"
        assert secret not in reason, "a dead-letter reason must never carry the secret"
    assert all(header(r, "dlq_topic") == INTROSPECTION for r in letters)
    nodes = await _nodes(pg_dsn)
    assert set(nodes) == {good_id}, f"only the valid node may be registered, found {set(nodes)}"
    assert dispatcher.stats.dead_lettered == len(bad)
    assert dispatcher.stats.started == 1
    connection = await asyncpg.connect(pg_dsn)
    try:
        stored = await connection.fetchval(
            "SELECT correlation_id FROM onex_nodes WHERE node_id = $1", good_id
        )
    finally:
        await connection.close()
    assert stored == header_correlation, (
        "without one in the envelope, the correlation id comes from the Kafka header"
    )


class _KilledAfter(IngressDispatcher):
    """Hangs (like a process frozen before its commit) once ``limit`` starts were accepted."""

    limit = 5
    killed: asyncio.Event

    async def _hand_over(self, *args: Any, **kwargs: Any) -> None:
        await super()._hand_over(*args, **kwargs)
        if self.stats.started >= self.limit:
            self.killed.set()
            await asyncio.Event().wait()  # cancelled by the test: the "kill"


async def test_a_kill_mid_batch_loses_nothing_and_registers_nothing_twice(
    temporal_env: WorkflowEnvironment,
    backends: OnexSettings,
    pg_dsn: str,
    topic_prefix: str,
    task_queue: str,
) -> None:
    """The ingress killed after some starts were accepted but before their offsets were
    committed: a new ingress in the same group gets the uncommitted records again, and each
    redelivered one attaches to its accepted Update: every node is registered, each exactly
    once (its node workflow accepted one operation)."""
    node_ids = [uuid.uuid4() for _ in range(12)]
    async with serving_stack(temporal_env, backends, pg_dsn, topic_prefix, task_queue) as stack:
        settings = with_ingress(stack.settings, max_records=100)
        for node_id in node_ids:
            await publish_raw(
                settings,
                INTROSPECTION,
                [envelope(INTROSPECTION, introspection(node_id))],
                key=str(node_id).encode(),
            )
        first, publisher = _dispatcher(settings, stack.client, _KilledAfter)
        assert isinstance(first, _KilledAfter)
        first.killed = asyncio.Event()
        stop = asyncio.Event()
        task = asyncio.create_task(first.run(stop))
        await asyncio.wait_for(first.killed.wait(), 60)
        task.cancel()  # mid-batch: the fifth accepted record's partition is not committed
        await asyncio.gather(task, return_exceptions=True)
        await publisher.stop()

        second, publisher = _dispatcher(settings, stack.client)
        async with running(second, publisher):

            async def all_registered() -> bool:
                return set(node_ids) <= set(await _nodes(pg_dsn))

            await wait_until(all_registered, within=90, what="all 12 nodes to be registered")
        accepted = {node_id: await _accepted(stack.client, node_id) for node_id in node_ids}
    assert all(count == 1 for count in accepted.values()), (
        f"each node's workflow must accept exactly one operation, got {accepted}: a redelivered "
        "message must reuse its Update id (workers/ingress.py request_id_for)"
    )
    assert second.stats.consumed > len(node_ids) - first.limit, (
        "the records accepted but not committed before the kill must be delivered again"
    )
    assert second.stats.dead_lettered == 0


async def test_the_breaker_pauses_consumption_while_temporal_is_unreachable(
    temporal_env: WorkflowEnvironment,
    backends: OnexSettings,
    pg_dsn: str,
    topic_prefix: str,
    task_queue: str,
) -> None:
    """With the Temporal frontend cut, the dispatcher's breaker opens and the consumer pauses:
    nothing is committed, nothing is dead-lettered, and the probes after each open window fail
    and pause again. When Temporal is reachable again, consumption resumes and every node
    announced during the outage is registered."""
    host, port = temporal_env.client.service_client.config.target_host.rsplit(":", 1)
    async with (
        serving_stack(temporal_env, backends, pg_dsn, topic_prefix, task_queue) as stack,
        FaultProxy(host, int(port)) as proxy,
    ):
        settings = with_ingress(
            stack.settings,
            accept_timeout=2.0,
            breaker_failure_threshold=2,
            breaker_open_seconds=1.0,
        )
        proxied = settings.model_copy(
            update={"temporal": TemporalSettings(host=proxy.host, port=proxy.port)}
        )
        client = await connect(proxied)
        dispatcher, publisher = _dispatcher(proxied, client)
        first = uuid.uuid4()
        during = [uuid.uuid4() for _ in range(3)]
        async with running(dispatcher, publisher):
            await publish_raw(
                settings, INTROSPECTION, [envelope(INTROSPECTION, introspection(first))]
            )

            async def first_registered() -> bool:
                return first in await _nodes(pg_dsn)

            await wait_until(first_registered, within=60, what="the first node (proxy up)")
            committed = dispatcher.stats.committed
            await proxy.cut()
            await publish_raw(
                settings, INTROSPECTION, [envelope(INTROSPECTION, introspection(n)) for n in during]
            )

            async def paused_twice() -> bool:
                return dispatcher.stats.pauses >= 2

            await wait_until(paused_twice, within=90, what="the consumer to pause (and re-pause)")
            assert dispatcher.breaker.state is not BreakerState.CLOSED
            assert dispatcher.stats.committed == committed, (
                "nothing may be committed while Temporal is unreachable"
            )
            assert dispatcher.stats.dead_lettered == 0, "an outage must not dead-letter messages"
            proxy.restore()

            async def all_registered() -> bool:
                return set(during) <= set(await _nodes(pg_dsn))

            await wait_until(all_registered, within=90, what="the nodes sent during the outage")
            assert not dispatcher.stats.paused
    nodes = await _nodes(pg_dsn)
    assert all(nodes[n].state is FleetState.ACTIVE for n in during)
    assert dispatcher.stats.dead_lettered == 0


async def test_a_shutdown_event_deregisters_the_node(
    temporal_env: WorkflowEnvironment,
    backends: OnexSettings,
    pg_dsn: str,
    topic_prefix: str,
    task_queue: str,
) -> None:
    """A node that announces itself, then its shutdown, ends inactive in the registry; the
    same shutdown delivered twice is one operation."""
    node_id = uuid.uuid4()
    shutdown = envelope(
        SHUTDOWN,
        {"schema_version": 1, "node_id": str(node_id), "node_type": "effect", "reason": "bye"},
    )
    async with serving_stack(temporal_env, backends, pg_dsn, topic_prefix, task_queue) as stack:
        settings = with_ingress(stack.settings)
        dispatcher, publisher = _dispatcher(settings, stack.client)
        async with running(dispatcher, publisher):
            await publish_raw(
                settings, INTROSPECTION, [envelope(INTROSPECTION, introspection(node_id))]
            )

            async def registered() -> bool:
                return node_id in await _nodes(pg_dsn)

            await wait_until(registered, within=60, what="the node to be registered")
            await publish_raw(settings, SHUTDOWN, [shutdown, shutdown], key=str(node_id).encode())

            async def inactive() -> bool:
                node = (await _nodes(pg_dsn)).get(node_id)
                return node is not None and node.state is FleetState.INACTIVE

            await wait_until(inactive, within=60, what="the node to be deregistered")

            async def both_consumed() -> bool:
                return dispatcher.stats.consumed >= 3

            await wait_until(both_consumed, within=30, what="the duplicate shutdown")
        assert await _accepted(stack.client, node_id) == 2, (
            "register + one deregister: the duplicate shutdown must attach, not run again"
        )
    assert dispatcher.stats.attached == 1
