"""The PostgreSQL handler against a real PostgreSQL (a fresh database per test).

Operations are checked for their effect on the tables and for their idempotency; failures are
run through the real activity boundary to see the error class Temporal would see.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from pydantic import SecretStr
from temporalio.exceptions import ApplicationError

from activities.base import HandlerConfig, HandlerResources
from activities.migrate import load_migrations
from activities.postgres import PASSWORD_SECRET, POOL_CLIENT, POOL_FACTORY_CLIENT, PostgresHandler
from activities.resilience.boundary import ActivityBoundary
from activities.resilience.breaker import BreakerRegistry, BreakerState
from activities.settings import PostgresSettings
from contracts.errors import ConfigurationError, Transport
from contracts.events import EventEnvelope, new_envelope
from contracts.registry import (
    CompensationInput,
    DeactivateNodeResult,
    DeregisterNodeRequest,
    GetNodeRequest,
    NodeRecord,
    NodeStatus,
)
from contracts.resilience import default_policy
from tests.activities.runs import ambiguous, deregister_run, register_run
from tests.builders import compensation, deregister_request, register_request
from tests.fakes.fault_proxy import FaultProxy
from tests.support import free_port, wait_until
from workers.devstack import superuser_dsn
from workers.settings import OnexSettings

REGISTERED = "onex.registry.node.registered.v1"
OPERATIONS = ("upsert_node", "restore_node", "deactivate_node", "get_node", "enqueue_event")


def settings_for(backends: OnexSettings, database: str, **postgres: Any) -> OnexSettings:
    """Settings reaching ``database`` on the test server as ``onex`` (unless overridden)."""
    fields: dict[str, Any] = {
        "host": backends.postgres.host,
        "port": backends.postgres.port,
        "database": database,
        "user": "onex",
        **postgres,
    }
    return OnexSettings(postgres=PostgresSettings(**fields))


def database_of(dsn: str) -> str:
    return dsn.rsplit("/", 1)[1]


def handler_config() -> HandlerConfig:
    return HandlerConfig(
        handler_name="postgres",
        transport=Transport.DATABASE,
        operations=OPERATIONS,
        policy=default_policy(Transport.DATABASE),
    )


def make_handler(settings: OnexSettings, **resources: Any) -> PostgresHandler:
    return PostgresHandler(
        HandlerResources(settings=settings.postgres, breakers=BreakerRegistry(), **resources)
    )


def boundary(breakers: BreakerRegistry | None = None) -> ActivityBoundary:
    """The real activity boundary, as the worker builds it for this handler."""
    return ActivityBoundary(
        transport=Transport.DATABASE,
        target="postgresql-primary",
        policy=default_policy(Transport.DATABASE),
        breakers=breakers or BreakerRegistry(),
    )


async def failure_through_boundary(
    name: str, operation: Callable[[Any], Awaitable[Any]], argument: Any
) -> ApplicationError:
    with pytest.raises(ApplicationError) as failed:
        await boundary().wrap(name, operation)(argument)
    return failed.value


@pytest.fixture
async def postgres_handler(backends: OnexSettings, pg_dsn: str) -> AsyncIterator[PostgresHandler]:
    """An initialized handler on the test's database (schema migrated), shut down afterwards."""
    handler = make_handler(settings_for(backends, database_of(pg_dsn)))
    await handler.initialize(handler_config())
    try:
        yield handler
    finally:
        await handler.shutdown(10)


@pytest.fixture
async def db(pg_dsn: str) -> AsyncIterator[Any]:
    """A plain connection to the test's database, to look at the tables directly."""
    connection = await asyncpg.connect(pg_dsn)
    try:
        yield connection
    finally:
        await connection.close()


def registered_event(node_id: uuid.UUID, **payload: Any) -> EventEnvelope:
    return new_envelope(
        REGISTERED, {"node_id": str(node_id), **payload}, correlation_id=uuid.uuid4()
    )


def without_row_version(node: NodeRecord | None) -> dict[str, Any]:
    assert node is not None
    return node.model_dump(exclude={"row_version"})


# -- upsert_node ------------------------------------------------------------------------------


async def test_upsert_of_a_new_node_has_no_previous_row(postgres_handler: PostgresHandler) -> None:
    """A new node is inserted active at row_version 1 with every request field; previous is None."""
    request = register_request()

    result = await postgres_handler.upsert_node(request)

    assert result.previous is None
    node = result.node
    assert node.node_id == request.node_id
    assert node.node_type.value == "effect"
    assert (node.node_version, node.service_name, node.address, node.port) == (
        "1.2.3",
        "billing",
        "10.0.0.7",
        8080,
    )
    assert node.tags == ("blue", "eu-west-1")
    assert node.endpoints == {"health": "http://10.0.0.7:8080/health"}
    assert node.metadata == {"team": "payments"}
    assert node.status is NodeStatus.ACTIVE
    assert node.row_version == 1
    assert node.correlation_id == request.correlation_id
    assert node.registered_at == node.updated_at


async def test_repeated_upsert_is_idempotent(postgres_handler: PostgresHandler) -> None:
    """The same request again (a retry: same correlation id) succeeds, bumps row_version and
    reports the pre-image of the first attempt (no row), not the row that attempt wrote."""
    request = register_request()
    first = await postgres_handler.upsert_node(request)

    again = await postgres_handler.upsert_node(request)

    assert first.previous is None
    assert again.previous is None
    assert again.node.row_version == 2
    assert without_row_version(again.node) | {"updated_at": None} == without_row_version(
        first.node
    ) | {"updated_at": None}
    assert again.node.registered_at == first.node.registered_at


async def test_upsert_updates_every_field_and_reactivates(
    postgres_handler: PostgresHandler,
) -> None:
    """An upsert of an inactive node with new values overwrites them all and makes it active."""
    node_id = uuid.uuid4()
    await postgres_handler.upsert_node(register_request(node_id))
    await postgres_handler.deactivate_node(deregister_request(node_id))
    changed = register_request(
        node_id, node_version="2.0.0", port=9090, tags=("green",), metadata={"team": "core"}
    )

    result = await postgres_handler.upsert_node(changed)

    assert result.previous is not None
    assert result.previous.status is NodeStatus.INACTIVE
    assert result.node.status is NodeStatus.ACTIVE
    assert (result.node.node_version, result.node.port, result.node.tags) == (
        "2.0.0",
        9090,
        ("green",),
    )
    assert result.node.metadata == {"team": "core"}
    assert result.node.row_version == 3
    assert result.node.correlation_id == changed.correlation_id


async def test_concurrent_creation_between_read_and_write_is_retryable(
    postgres_handler: PostgresHandler, db: Any
) -> None:
    """Another transaction creates the node after the upsert read "no previous row": the upsert
    rolls back with a retryable error, and the retry reports that row as previous."""
    request = register_request()
    blocker = register_request(request.node_id, port=1111)
    transaction = db.transaction()
    await transaction.start()
    await db.execute(
        "INSERT INTO onex_nodes (node_id, node_type, node_version, service_name, address, port)"
        " VALUES ($1, 'effect', '0.0.1', 'billing', '10.0.0.1', $2)",
        blocker.node_id,
        blocker.port,
    )
    upsert = asyncio.ensure_future(
        boundary().wrap("upsert_node", postgres_handler.upsert_node)(request)
    )

    async def upsert_waits_for_the_row_lock() -> bool:
        waiting: int = await db.fetchval(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND application_name = 'onex-orchestrator' "
            "AND wait_event_type = 'Lock'"
        )
        return waiting == 1

    try:
        await wait_until(upsert_waits_for_the_row_lock, within=10, what="the upsert to block")
    finally:
        await transaction.commit()
        (outcome,) = await asyncio.gather(upsert, return_exceptions=True)

    assert isinstance(outcome, ApplicationError)
    assert outcome.type == "InfraConnectionError"
    assert not outcome.non_retryable
    retried = await postgres_handler.upsert_node(request)
    assert retried.previous is not None
    assert retried.previous.port == 1111
    assert retried.node.row_version == 2


# -- retries after a lost reply (pre-images) ---------------------------------------------------


async def preimage_rows(db: Any, node_id: uuid.UUID) -> list[tuple[uuid.UUID, str, Any]]:
    """The pre-image records of a node: (correlation_id, operation, previous as JSON)."""
    rows = await db.fetch(
        "SELECT correlation_id, operation, previous FROM onex_node_preimages WHERE node_id = $1 "
        "ORDER BY created_at",
        node_id,
    )
    return [
        (
            row["correlation_id"],
            row["operation"],
            None if row["previous"] is None else json.loads(row["previous"]),
        )
        for row in rows
    ]


async def test_retried_upsert_of_a_new_node_lets_restore_remove_it(
    postgres_handler: PostgresHandler, db: Any
) -> None:
    """A retried upsert after a lost reply returns the true pre-image, so restore_node removes a
    node that did not exist before: the first attempt committed (its reply lost), the retry with
    the same request reports previous None again, and the compensation deletes the row."""
    request = register_request()
    lost = await postgres_handler.upsert_node(request)  # committed; Temporal never saw this

    retried = await postgres_handler.upsert_node(request)

    assert lost.previous is None
    assert retried.previous is None
    assert retried.node.row_version == 2
    assert await preimage_rows(db, request.node_id) == [
        (request.correlation_id, "upsert_node", None)
    ]
    restored = await postgres_handler.restore_node(compensation(request, retried))
    assert restored.action == "deleted"
    assert (await postgres_handler.get_node(GetNodeRequest(node_id=request.node_id))).node is None


async def test_retried_upsert_of_an_existing_node_reports_the_row_before_the_first_attempt(
    postgres_handler: PostgresHandler,
) -> None:
    """An update retried after a lost reply reports the row as it was before its FIRST attempt
    (both times), so restore_node puts that row back rather than the first attempt's write."""
    node_id = uuid.uuid4()
    original = (await postgres_handler.upsert_node(register_request(node_id))).node
    update = register_request(node_id, address="10.9.9.9", port=9999)

    lost = await postgres_handler.upsert_node(update)
    retried = await postgres_handler.upsert_node(update)

    assert lost.previous == original
    assert retried.previous == original
    assert retried.node.port == 9999
    assert retried.node.row_version == 3
    restored = await postgres_handler.restore_node(compensation(update, retried))
    assert restored.action == "restored"
    now = (await postgres_handler.get_node(GetNodeRequest(node_id=node_id))).node
    assert without_row_version(now) == without_row_version(original)
    assert now is not None
    assert now.row_version == 4


async def test_retried_upsert_and_enqueue_shares_the_upsert_pre_image(
    postgres_handler: PostgresHandler,
) -> None:
    """upsert_node_and_enqueue records its pre-image like upsert_node: retried (same request,
    same correlation id) after a lost reply, it still reports that the node was new."""
    request = register_request()
    envelope = registered_event(request.node_id)

    await postgres_handler.upsert_node_and_enqueue(request, envelope)
    retried = await postgres_handler.upsert_node_and_enqueue(request, envelope)

    assert retried.previous is None
    assert retried.node.row_version == 2


async def test_retried_deactivation_reports_the_active_row_so_undo_reactivates(
    postgres_handler: PostgresHandler,
) -> None:
    """A deactivation retried after a lost reply reports the active row before its first attempt
    as previous with deactivated=True (not the inactive row, deactivated=False), so its undo
    makes the node active again."""
    node_id = uuid.uuid4()
    active = (await postgres_handler.upsert_node(register_request(node_id))).node
    request = deregister_request(node_id)

    lost = await postgres_handler.deactivate_node(request)
    retried = await postgres_handler.deactivate_node(request)

    assert lost == DeactivateNodeResult(previous=active, deactivated=True)
    assert retried == DeactivateNodeResult(previous=active, deactivated=True)
    inactive = (await postgres_handler.get_node(GetNodeRequest(node_id=node_id))).node
    assert inactive is not None
    assert inactive.status is NodeStatus.INACTIVE
    assert inactive.row_version == active.row_version + 1  # the retry wrote nothing more

    restored = await postgres_handler.restore_node(compensation(request, retried))

    assert restored.action == "restored"
    now = (await postgres_handler.get_node(GetNodeRequest(node_id=node_id))).node
    assert now is not None
    assert now.status is NodeStatus.ACTIVE
    assert without_row_version(now) == without_row_version(active)


async def test_retried_deactivation_of_a_missing_node_stays_a_no_op(
    postgres_handler: PostgresHandler,
) -> None:
    """A missing node's "absent" pre-image is recorded too: a retry reports no row and
    deactivated=False, even if the node was registered in between."""
    node_id = uuid.uuid4()
    request = deregister_request(node_id)
    assert await postgres_handler.deactivate_node(request) == DeactivateNodeResult(
        previous=None, deactivated=False
    )
    await postgres_handler.upsert_node(register_request(node_id))

    retried = await postgres_handler.deactivate_node(request)

    assert retried == DeactivateNodeResult(previous=None, deactivated=False)
    assert (await postgres_handler.restore_node(compensation(request, retried))).action == (
        "unchanged"
    )


async def test_a_different_correlation_id_is_a_new_operation(
    postgres_handler: PostgresHandler, db: Any
) -> None:
    """Another correlation id names another operation: it records and reports the row as it is
    then (the first operation's write), for upserts and deactivations alike."""
    node_id = uuid.uuid4()
    first = await postgres_handler.upsert_node(register_request(node_id))
    second_request = register_request(node_id, port=7000)

    second = await postgres_handler.upsert_node(second_request)

    assert first.previous is None
    assert second.previous == first.node
    first_deactivation = await postgres_handler.deactivate_node(deregister_request(node_id))
    assert first_deactivation.previous == second.node
    assert first_deactivation.deactivated
    inactive = (await postgres_handler.get_node(GetNodeRequest(node_id=node_id))).node
    another = await postgres_handler.deactivate_node(deregister_request(node_id))
    assert another == DeactivateNodeResult(previous=inactive, deactivated=False)
    assert [operation for _, operation, _ in await preimage_rows(db, node_id)] == [
        "upsert_node",
        "upsert_node",
        "deactivate_node",
        "deactivate_node",
    ]


async def test_requests_without_a_correlation_id_record_no_pre_image(
    postgres_handler: PostgresHandler, db: Any
) -> None:
    """Without a correlation id there is no operation to key a record on: nothing is recorded
    and a repeat reports the row as it is now (the behaviour before pre-images)."""
    request = register_request(correlation_id=None)
    first = await postgres_handler.upsert_node(request)

    again = await postgres_handler.upsert_node(request)

    assert first.previous is None
    assert again.previous == first.node
    deregister = DeregisterNodeRequest(node_id=request.node_id, node_type="effect")
    assert (await postgres_handler.deactivate_node(deregister)).deactivated
    assert not (await postgres_handler.deactivate_node(deregister)).deactivated
    assert await preimage_rows(db, request.node_id) == []


async def test_cleanup_preimages_forgets_old_records(
    postgres_handler: PostgresHandler, db: Any
) -> None:
    """Records older than the TTL are deleted and counted; recent ones stay. A retry whose record
    was cleaned up reports the row as it is then."""
    old, recent = register_request(), register_request()
    await postgres_handler.upsert_node(old)
    await postgres_handler.upsert_node(recent)
    await db.execute(
        "UPDATE onex_node_preimages SET created_at = now() - interval '2 hours' WHERE node_id = $1",
        old.node_id,
    )

    assert await postgres_handler.cleanup_preimages(3600) == 1
    assert await postgres_handler.cleanup_preimages(3600) == 0
    assert len(await preimage_rows(db, recent.node_id)) == 1
    assert await preimage_rows(db, old.node_id) == []
    assert (await postgres_handler.upsert_node(recent)).previous is None
    assert (await postgres_handler.upsert_node(old)).previous is not None
    with pytest.raises(ValueError, match="ttl_seconds"):
        await postgres_handler.cleanup_preimages(float("nan"))


# -- restore_node -----------------------------------------------------------------------------


async def test_restore_after_creating_a_node_deletes_it(
    postgres_handler: PostgresHandler,
) -> None:
    """The compensation of an upsert that created the node deletes the row."""
    request = register_request()
    result = await postgres_handler.upsert_node(request)

    restored = await postgres_handler.restore_node(compensation(request, result))

    assert restored.action == "deleted"
    found = await postgres_handler.get_node(GetNodeRequest(node_id=request.node_id))
    assert found.node is None


async def test_restore_after_an_update_puts_the_old_row_back(
    postgres_handler: PostgresHandler,
) -> None:
    """The compensation of an update restores the previous row exactly (status, timestamps and
    all), with row_version moved forward rather than back."""
    node_id = uuid.uuid4()
    original = (await postgres_handler.upsert_node(register_request(node_id))).node
    await postgres_handler.deactivate_node(deregister_request(node_id))
    deactivated = (await postgres_handler.get_node(GetNodeRequest(node_id=node_id))).node
    update = register_request(node_id, address="10.9.9.9", port=9999, tags=())
    result = await postgres_handler.upsert_node(update)
    assert result.previous == deactivated

    restored = await postgres_handler.restore_node(compensation(update, result))

    assert restored.action == "restored"
    now = (await postgres_handler.get_node(GetNodeRequest(node_id=node_id))).node
    assert now is not None
    assert without_row_version(now) == without_row_version(deactivated)
    assert now.status is NodeStatus.INACTIVE
    assert now.registered_at == original.registered_at
    assert now.row_version == result.node.row_version + 1


async def test_restore_twice_is_harmless(postgres_handler: PostgresHandler) -> None:
    """A repeated compensation succeeds and changes nothing: "unchanged" the second time, for a
    delete and for a restore alike."""
    created = register_request()
    created_result = await postgres_handler.upsert_node(created)
    undo_create = compensation(created, created_result)
    assert (await postgres_handler.restore_node(undo_create)).action == "deleted"
    assert (await postgres_handler.restore_node(undo_create)).action == "unchanged"

    node_id = uuid.uuid4()
    await postgres_handler.upsert_node(register_request(node_id))
    update = register_request(node_id, port=7000)
    updated = await postgres_handler.upsert_node(update)
    undo_update = compensation(update, updated)
    assert (await postgres_handler.restore_node(undo_update)).action == "restored"
    after_first = (await postgres_handler.get_node(GetNodeRequest(node_id=node_id))).node

    assert (await postgres_handler.restore_node(undo_update)).action == "unchanged"
    after_second = (await postgres_handler.get_node(GetNodeRequest(node_id=node_id))).node
    assert after_second == after_first
    assert after_second is not None
    assert after_second.port == 8080


async def test_restore_after_deactivation_reactivates(postgres_handler: PostgresHandler) -> None:
    """The compensation of deactivate_node puts the active row back; a deactivation that changed
    nothing (missing node) has nothing to undo."""
    node_id = uuid.uuid4()
    before = (await postgres_handler.upsert_node(register_request(node_id))).node
    request = deregister_request(node_id)
    result = await postgres_handler.deactivate_node(request)

    restored = await postgres_handler.restore_node(compensation(request, result))

    assert restored.action == "restored"
    now = (await postgres_handler.get_node(GetNodeRequest(node_id=node_id))).node
    assert without_row_version(now) == without_row_version(before)

    missing = deregister_request(uuid.uuid4())
    nothing = await postgres_handler.deactivate_node(missing)
    assert (await postgres_handler.restore_node(compensation(missing, nothing))).action == (
        "unchanged"
    )


async def test_restore_refuses_a_foreign_forward_result(
    postgres_handler: PostgresHandler,
) -> None:
    """A forward_result that is neither step's result is a non-retryable ConfigurationError."""
    request = register_request()
    bad = CompensationInput(
        request=request.model_dump(mode="json"), forward_result={"service_id": "x"}
    )

    with pytest.raises(ConfigurationError):
        await postgres_handler.restore_node(bad)
    failure = await failure_through_boundary("restore_node", postgres_handler.restore_node, bad)
    assert failure.type == "ConfigurationError"
    assert failure.non_retryable


# -- fenced undo: an undo never destroys newer work --------------------------------------------


async def node_now(handler: PostgresHandler, node_id: uuid.UUID) -> NodeRecord | None:
    return (await handler.get_node(GetNodeRequest(node_id=node_id))).node


async def test_writes_record_the_run_that_made_them(postgres_handler: PostgresHandler) -> None:
    """upsert_node and deactivate_node stamp the row with their run (workflow id / run id)."""
    node_id = uuid.uuid4()
    register, deregister = register_run(node_id), deregister_run(node_id)

    upserted = await register(postgres_handler.upsert_node, register_request(node_id))
    assert upserted.node.written_by == register.writer
    await deregister(postgres_handler.deactivate_node, deregister_request(node_id))

    now = await node_now(postgres_handler, node_id)
    assert now is not None
    assert now.written_by == deregister.writer, "deactivate_node must stamp its writer"


async def test_undo_of_a_register_after_a_newer_deregister_is_superseded(
    postgres_handler: PostgresHandler,
) -> None:
    """Scenario 1 at activity level: a register (run A) created the node, a deregister (run B)
    deactivated it since; A's undo changes nothing, reports superseded with B's workflow id
    (not its run id, nothing of the request), and the node stays deregistered — twice."""
    node_id = uuid.uuid4()
    register, deregister = register_run(node_id), deregister_run(node_id)
    request = register_request(node_id)
    upserted = await register(postgres_handler.upsert_node, request)
    await deregister(postgres_handler.deactivate_node, deregister_request(node_id))
    deregistered = await node_now(postgres_handler, node_id)

    for _ in range(2):  # a replayed compensation answers the same
        undone = await register(postgres_handler.restore_node, compensation(request, upserted))

        assert undone.action == "superseded", "the undo must not resurrect a deregistered node"
        assert undone.reason is not None
        assert deregister.workflow_id in undone.reason
        assert deregister.run_id not in undone.reason
        assert "billing" not in undone.reason, "a reason never quotes request content"
        assert await node_now(postgres_handler, node_id) == deregistered


async def test_undo_of_a_deregister_after_a_newer_register_is_superseded(
    postgres_handler: PostgresHandler,
) -> None:
    """A deregister's undo (reactivate) after another run registered the node again leaves
    that newer registration as it is: superseded."""
    node_id = uuid.uuid4()
    await register_run(node_id)(postgres_handler.upsert_node, register_request(node_id))
    deregister = deregister_run(node_id)
    request = deregister_request(node_id)
    deactivated = await deregister(postgres_handler.deactivate_node, request)
    newer = register_run(node_id)
    await newer(postgres_handler.upsert_node, register_request(node_id, port=9999))
    before = await node_now(postgres_handler, node_id)

    undone = await deregister(postgres_handler.restore_node, compensation(request, deactivated))

    assert undone.action == "superseded"
    assert undone.reason is not None
    assert newer.workflow_id in undone.reason
    assert await node_now(postgres_handler, node_id) == before


async def test_undo_of_our_own_write_restores_or_deletes_and_is_idempotent(
    postgres_handler: PostgresHandler,
) -> None:
    """While the row is still this run's write, the undo acts: an update is restored (with the
    earlier writer), a creation deleted, a deactivation reactivated; a replay is unchanged."""
    node_id = uuid.uuid4()
    first = register_run(node_id)
    original = (await first(postgres_handler.upsert_node, register_request(node_id))).node
    second = register_run(node_id)
    update = register_request(node_id, port=7000)
    updated = await second(postgres_handler.upsert_node, update)

    assert (await second(postgres_handler.restore_node, compensation(update, updated))).action == (
        "restored"
    )
    restored = await node_now(postgres_handler, node_id)
    assert restored is not None
    assert restored.written_by == first.writer, "a restore puts the earlier writer back too"
    assert without_row_version(restored) == without_row_version(original)
    again = await second(postgres_handler.restore_node, compensation(update, updated))
    assert again.action == "unchanged"

    deregister = deregister_run(node_id)
    request = deregister_request(node_id)
    deactivated = await deregister(postgres_handler.deactivate_node, request)
    undo = compensation(request, deactivated)
    assert (await deregister(postgres_handler.restore_node, undo)).action == "restored"
    assert (await deregister(postgres_handler.restore_node, undo)).action == "unchanged"

    created = register_request()
    creator = register_run(created.node_id)
    result = await creator(postgres_handler.upsert_node, created)
    assert (await creator(postgres_handler.restore_node, compensation(created, result))).action == (
        "deleted"
    )
    assert (await creator(postgres_handler.restore_node, compensation(created, result))).action == (
        "unchanged"
    )
    assert await node_now(postgres_handler, created.node_id) is None


async def test_reused_correlation_id_in_a_new_run_uses_that_run_s_pre_image(
    postgres_handler: PostgresHandler,
) -> None:
    """Scenario 2: two runs share a correlation id (--correlation-id reused, or a reset). The
    second run's pre-image is its own (the first run's row), so its undo restores that row
    instead of deleting a node that existed before the request."""
    node_id = uuid.uuid4()
    correlation_id = uuid.uuid4()
    first, second = register_run(node_id), register_run(node_id)
    created = await first(
        postgres_handler.upsert_node, register_request(node_id, correlation_id=correlation_id)
    )
    again = register_request(node_id, correlation_id=correlation_id, port=7000)

    updated = await second(postgres_handler.upsert_node, again)

    assert updated.previous == created.node, "the second run must see the row as it is then"
    undone = await second(postgres_handler.restore_node, compensation(again, updated))
    assert undone.action == "restored"
    now = await node_now(postgres_handler, node_id)
    assert now is not None, "the undo deleted a node that existed before its request"
    assert without_row_version(now) == without_row_version(created.node)


async def test_ambiguous_undo_uses_the_pre_image_this_run_recorded(
    postgres_handler: PostgresHandler,
) -> None:
    """Scenario 5 at activity level: an upsert whose reply was lost (committed) is undone from
    the run's recorded pre-image; one that never committed finds none and changes nothing,
    even with another run's row there; a replay changes nothing; the same for a deactivation."""
    request = register_request()
    run = register_run(request.node_id)
    await run(postgres_handler.upsert_node, request)  # committed; the reply was lost
    undo = ambiguous(request, "postgres.upsert_node")

    assert (await run(postgres_handler.restore_node, undo)).action == "deleted"
    assert (await run(postgres_handler.restore_node, undo)).action == "unchanged"
    assert await node_now(postgres_handler, request.node_id) is None

    other = register_request()
    await register_run(other.node_id)(postgres_handler.upsert_node, other)
    before = await node_now(postgres_handler, other.node_id)
    never = register_run(other.node_id)  # its upsert never reached the database
    unchanged = await never(postgres_handler.restore_node, ambiguous(other, "postgres.upsert_node"))
    assert unchanged.action == "unchanged"
    assert await node_now(postgres_handler, other.node_id) == before

    deregister = deregister_run(other.node_id)
    removal = deregister_request(other.node_id)
    await deregister(postgres_handler.deactivate_node, removal)
    undo_removal = ambiguous(removal, "postgres.deactivate_node")
    assert (await deregister(postgres_handler.restore_node, undo_removal)).action == "restored"
    restored = await node_now(postgres_handler, other.node_id)
    assert without_row_version(restored) == without_row_version(before)


async def test_ambiguous_undo_without_the_forward_activity_is_refused(
    postgres_handler: PostgresHandler,
) -> None:
    """An ambiguous restore_node must say which step it undoes: otherwise a ConfigurationError
    (non-retryable), never a guess."""
    request = register_request()
    undo = ambiguous(request, "postgres.unknown")
    with pytest.raises(ConfigurationError, match="forward activity"):
        await register_run(request.node_id)(postgres_handler.restore_node, undo)


# -- deactivate_node and get_node -------------------------------------------------------------


async def test_deactivate_an_active_node(postgres_handler: PostgresHandler) -> None:
    """The node turns inactive with row_version + 1; the result carries the row before."""
    node_id = uuid.uuid4()
    before = (await postgres_handler.upsert_node(register_request(node_id))).node
    request = deregister_request(node_id)

    result = await postgres_handler.deactivate_node(request)

    assert result == DeactivateNodeResult(previous=before, deactivated=True)
    now = (await postgres_handler.get_node(GetNodeRequest(node_id=node_id))).node
    assert now is not None
    assert now.status is NodeStatus.INACTIVE
    assert now.row_version == before.row_version + 1
    assert now.correlation_id == request.correlation_id
    assert now.updated_at >= before.updated_at


async def test_deactivate_a_missing_node_is_success(postgres_handler: PostgresHandler) -> None:
    """Not found is success for this idempotent operation, also through the boundary."""
    request = deregister_request(uuid.uuid4())

    result = await boundary().wrap("deactivate_node", postgres_handler.deactivate_node)(request)

    assert result == DeactivateNodeResult(previous=None, deactivated=False)


async def test_deactivate_an_inactive_node_changes_nothing(
    postgres_handler: PostgresHandler,
) -> None:
    """A second deactivation reports deactivated=False and leaves the row as it was."""
    node_id = uuid.uuid4()
    await postgres_handler.upsert_node(register_request(node_id))
    await postgres_handler.deactivate_node(deregister_request(node_id))
    inactive = (await postgres_handler.get_node(GetNodeRequest(node_id=node_id))).node

    again = await postgres_handler.deactivate_node(deregister_request(node_id))

    assert again == DeactivateNodeResult(previous=inactive, deactivated=False)
    assert (await postgres_handler.get_node(GetNodeRequest(node_id=node_id))).node == inactive


async def test_get_node(postgres_handler: PostgresHandler) -> None:
    """get_node returns the current row, or None for an unknown node."""
    request = register_request()
    node = (await postgres_handler.upsert_node(request)).node

    assert (await postgres_handler.get_node(GetNodeRequest(node_id=request.node_id))).node == node
    assert (await postgres_handler.get_node(GetNodeRequest(node_id=uuid.uuid4()))).node is None


# -- the outbox -------------------------------------------------------------------------------


async def test_enqueue_event_once_per_event_id(postgres_handler: PostgresHandler, db: Any) -> None:
    """The outbox row carries topic, key, envelope and correlation header; the same event_id
    again is not queued twice."""
    node_id = uuid.uuid4()
    envelope = registered_event(node_id)

    first = await postgres_handler.enqueue_event(envelope)
    again = await postgres_handler.enqueue_event(envelope)

    assert (first.event_id, first.enqueued) == (envelope.event_id, True)
    assert (again.event_id, again.enqueued) == (envelope.event_id, False)
    rows = await db.fetch("SELECT * FROM onex_outbox")
    assert len(rows) == 1
    row = rows[0]
    assert row["event_id"] == envelope.event_id
    assert row["topic"] == REGISTERED
    assert row["message_key"] == str(node_id).encode()
    assert json.loads(row["envelope"]) == envelope.model_dump(mode="json")
    assert json.loads(row["headers"]) == [
        ["correlation_id", str(envelope.correlation_id)],
        ["event_id", str(envelope.event_id)],
        ["event_type", envelope.event_type],
    ]
    assert row["correlation_id"] == envelope.correlation_id
    assert row["published_at"] is None


async def test_upsert_node_and_enqueue_commits_both(
    postgres_handler: PostgresHandler, db: Any
) -> None:
    """The node row and its event are written by one call, in one transaction."""
    request = register_request()
    envelope = registered_event(request.node_id)

    result = await postgres_handler.upsert_node_and_enqueue(request, envelope)

    assert result.previous is None
    stored = await postgres_handler.get_node(GetNodeRequest(node_id=request.node_id))
    assert stored.node == result.node
    assert await db.fetchval("SELECT event_id FROM onex_outbox") == envelope.event_id


async def test_upsert_node_and_enqueue_commits_neither_on_failure(
    postgres_handler: PostgresHandler, db: Any
) -> None:
    """An event that cannot be queued (its payload lacks the topic's key, node_id) fails inside
    the transaction after the node was written: the node write is rolled back too."""
    request = register_request()
    keyless = new_envelope(REGISTERED, {"service_name": "billing"}, correlation_id=uuid.uuid4())

    with pytest.raises(ConfigurationError) as refused:
        await postgres_handler.upsert_node_and_enqueue(request, keyless)

    assert isinstance(refused.value.__cause__, ValueError)
    assert (await postgres_handler.get_node(GetNodeRequest(node_id=request.node_id))).node is None
    assert await db.fetchval("SELECT count(*) FROM onex_outbox") == 0


# -- consumer idempotency ---------------------------------------------------------------------


async def test_check_and_record_has_one_winner(postgres_handler: PostgresHandler) -> None:
    """Fifty concurrent callers for one message: exactly one is told to process it."""
    message_id = uuid.uuid4()

    outcomes = await asyncio.gather(
        *(postgres_handler.check_and_record("registry", message_id) for _ in range(50))
    )

    assert outcomes.count(True) == 1
    assert outcomes.count(False) == 49


async def test_check_and_record_domains_are_independent(
    postgres_handler: PostgresHandler, db: Any
) -> None:
    """The same message id is new in each domain; the correlation id is stored."""
    message_id, correlation_id = uuid.uuid4(), uuid.uuid4()

    assert await postgres_handler.check_and_record("registry", message_id, correlation_id)
    assert await postgres_handler.check_and_record("audit", message_id)
    assert not await postgres_handler.check_and_record("audit", message_id)
    stored = await db.fetchval(
        "SELECT correlation_id FROM onex_processed_messages WHERE domain = 'registry'"
    )
    assert stored == correlation_id


async def test_cleanup_processed_forgets_old_messages(
    postgres_handler: PostgresHandler, db: Any
) -> None:
    """Messages older than the TTL are deleted and counted; recent ones stay recorded."""
    old = [uuid.uuid4() for _ in range(3)]
    recent = uuid.uuid4()
    for message_id in (*old, recent):
        assert await postgres_handler.check_and_record("registry", message_id)
    await db.execute(
        "UPDATE onex_processed_messages SET processed_at = now() - interval '2 hours' "
        "WHERE message_id = ANY($1::uuid[])",
        old,
    )

    assert await postgres_handler.cleanup_processed(3600) == 3
    assert await postgres_handler.cleanup_processed(3600) == 0
    assert not await postgres_handler.check_and_record("registry", recent)
    assert await postgres_handler.check_and_record("registry", old[0])
    with pytest.raises(ValueError, match="ttl_seconds"):
        await postgres_handler.cleanup_processed(-1)


# -- lifecycle and seams ----------------------------------------------------------------------


async def test_initialize_migrates_and_describe_shows_no_secret(
    backends: OnexSettings, pg_dsn: str, db: Any
) -> None:
    """initialize creates the schema; describe reports the pool without any credential."""
    settings = settings_for(
        backends, database_of(pg_dsn), password=SecretStr("not-checked-by-trust")
    )
    handler = make_handler(settings)
    await handler.initialize(handler_config())
    try:
        migrations = [migration.name for migration in load_migrations()]
        assert await db.fetchval("SELECT count(*) FROM onex_schema_migrations") == len(migrations)
        description = handler.describe()
        assert description.target == "postgresql-primary"
        assert description.transport is Transport.DATABASE
        assert description.operations == OPERATIONS
        assert description.details["pool_owner"] == "handler"
        assert description.details["pool_max_size"] == 10
        assert description.details["pool_size"] >= 2
        assert description.details["migrations_applied"] == migrations
        assert migrations[:2] == ["0001_registry", "0002_preimages"]
        assert "not-checked-by-trust" not in description.model_dump_json()
        assert "not-checked-by-trust" not in repr(vars(handler))
    finally:
        await handler.shutdown(10)
    assert handler.describe().details["pool_size"] == 0


async def test_injected_pool_is_used_and_left_open(backends: OnexSettings, pg_dsn: str) -> None:
    """A pool from the composition root is migrated and used, and never closed by shutdown."""
    pool = await asyncpg.create_pool(pg_dsn, min_size=1, max_size=2)
    try:
        handler = make_handler(
            settings_for(backends, database_of(pg_dsn)), clients={POOL_CLIENT: pool}
        )
        await handler.initialize(handler_config())
        request = register_request()
        await handler.upsert_node(request)
        await handler.shutdown(10)

        assert not pool.is_closing()
        assert handler.describe().details["pool_owner"] == "injected"
        assert (
            await pool.fetchval(
                "SELECT count(*) FROM onex_nodes WHERE node_id = $1", request.node_id
            )
            == 1
        )
    finally:
        await pool.close()


# -- failures, as the activity boundary classifies them ---------------------------------------


async def test_refused_connection_is_a_retryable_connection_error(backends: OnexSettings) -> None:
    """Nothing listens on the port: initialize fails; an operation fails as a retryable
    InfraConnectionError that counts against the breaker."""
    settings = settings_for(backends, "onex", port=free_port(), connect_timeout=5)
    handler = make_handler(settings)
    with pytest.raises(OSError):  # noqa: PT011 - the native error, before the boundary
        await handler.initialize(handler_config())

    breakers = BreakerRegistry()
    with pytest.raises(ApplicationError) as failed:
        await boundary(breakers).wrap("upsert_node", handler.upsert_node)(register_request())

    assert failed.value.type == "InfraConnectionError"
    assert not failed.value.non_retryable
    assert failed.value.next_retry_delay is not None
    (snapshot,) = breakers.snapshot()
    assert snapshot.consecutive_failures == 1
    await handler.shutdown(5)


async def test_connect_privilege_refused_is_a_non_retryable_authentication_error(
    backends: OnexSettings, pg_dsn: str
) -> None:
    """A role that may not connect to the database: InfraAuthenticationError, never retried."""
    database = database_of(pg_dsn)
    role = f"noconnect_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(superuser_dsn(backends))
    try:
        await admin.execute(f'CREATE ROLE "{role}" LOGIN')
        await admin.execute(f'REVOKE CONNECT ON DATABASE "{database}" FROM PUBLIC')
        handler = make_handler(settings_for(backends, database, user=role))

        failure = await failure_through_boundary(
            "get_node", handler.get_node, GetNodeRequest(node_id=uuid.uuid4())
        )

        assert failure.type == "InfraAuthenticationError"
        assert failure.non_retryable
        assert failure.next_retry_delay is None
        await handler.shutdown(5)
    finally:
        await admin.execute(f'DROP ROLE IF EXISTS "{role}"')
        await admin.close()


# -- faults on the wire (a TCP proxy in front of the real server) -----------------------------


class FakeClock:
    """The breakers' monotonic clock, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def pg_proxy(backends: OnexSettings) -> AsyncIterator[FaultProxy]:
    async with FaultProxy(backends.postgres.host, backends.postgres.port) as proxy:
        yield proxy


@pytest.fixture
async def proxied_handler(
    backends: OnexSettings, pg_dsn: str, pg_proxy: FaultProxy
) -> AsyncIterator[PostgresHandler]:
    """An initialized handler whose every connection goes through ``pg_proxy`` (0.3 s queries)."""
    settings = settings_for(
        backends,
        database_of(pg_dsn),
        host=pg_proxy.host,
        port=pg_proxy.port,
        connect_timeout=2,
        query_timeout=0.3,
    )
    handler = make_handler(settings)
    await handler.initialize(handler_config())
    try:
        yield handler
    finally:
        pg_proxy.set_delay(0)
        await handler.shutdown(10)


async def test_slow_network_is_a_retryable_timeout(
    proxied_handler: PostgresHandler, pg_proxy: FaultProxy
) -> None:
    """Every byte delayed past query_timeout: the statement times out, InfraTimeoutError."""
    request = GetNodeRequest(node_id=uuid.uuid4())
    pg_proxy.set_delay(1.0)

    failure = await failure_through_boundary("get_node", proxied_handler.get_node, request)

    assert failure.type == "InfraTimeoutError"
    assert not failure.non_retryable
    pg_proxy.set_delay(0)

    async def answers() -> bool:
        try:
            return (await proxied_handler.get_node(request)).node is None
        except (TimeoutError, asyncpg.InterfaceError, asyncpg.PostgresError):
            return False  # the cancellation of the timed-out statement may still be pending

    await wait_until(answers, within=10, what="the handler to answer again")


async def test_breaker_opens_on_refused_connections_and_recovers(
    proxied_handler: PostgresHandler, pg_proxy: FaultProxy
) -> None:
    """Cut: five connection failures open the database breaker (failure_threshold 5), which then
    rejects without touching the network. Restored, and the clock past open_seconds: two probe
    successes close it."""
    policy = default_policy(Transport.DATABASE)
    clock = FakeClock()
    breakers = BreakerRegistry(clock=clock)
    get_node = boundary(breakers).wrap("get_node", proxied_handler.get_node)
    request = GetNodeRequest(node_id=uuid.uuid4())
    await pg_proxy.cut()

    for _ in range(policy.circuit_breaker.failure_threshold):
        with pytest.raises(ApplicationError) as failed:
            await get_node(request)
        assert failed.value.type == "InfraConnectionError"
    breaker = breakers.get("database:postgresql-primary", policy.circuit_breaker)
    assert breaker.state is BreakerState.OPEN

    with pytest.raises(ApplicationError) as rejected:
        await get_node(request)
    assert rejected.value.type == "InfraUnavailableError"
    assert "not attempted" in str(rejected.value)
    assert breaker.snapshot().total_rejections == 1

    pg_proxy.restore()
    clock.now += policy.circuit_breaker.open_seconds + 1
    assert breaker.state is BreakerState.HALF_OPEN
    assert (await get_node(request)).node is None
    assert breaker.state is BreakerState.HALF_OPEN  # one probe success of the two needed
    assert (await get_node(request)).node is None
    assert breaker.state is BreakerState.CLOSED


# -- credential refresh -----------------------------------------------------------------------


class PasswordCheckingServer:
    """Password authentication in front of the embedded server (which trusts loopback).

    A pool is created only with the current password, and refuses new work once the password
    has rotated away from the one it was created with, as PostgreSQL does for new connections.
    """

    def __init__(self, password: str) -> None:
        self.password = password
        self.pools_created_with: list[str | None] = []
        self.pools: list[CheckedPool] = []

    def refused(self) -> asyncpg.exceptions.InvalidPasswordError:
        return asyncpg.exceptions.InvalidPasswordError(
            'password authentication failed for user "onex"'
        )

    async def create_pool(self, **options: Any) -> CheckedPool:
        password = options.get("password")
        self.pools_created_with.append(password)
        if password != self.password:
            raise self.refused()
        pool = CheckedPool(await asyncpg.create_pool(**options), password, self)
        self.pools.append(pool)
        return pool


class CheckedPool:
    """A real pool whose ``acquire`` is refused once its password is no longer the server's."""

    def __init__(self, pool: Any, password: str, server: PasswordCheckingServer) -> None:
        self.pool = pool
        self.password = password
        self.server = server

    def acquire(self, **options: Any) -> Any:
        if self.password != self.server.password:
            raise self.server.refused()
        return self.pool.acquire(**options)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.pool, name)


class CachingSecrets:
    """A secret source with a cache: ``refresh`` picks up what the store holds now."""

    def __init__(self, password: str) -> None:
        self.stored = password
        self.cached = password
        self.refreshed: list[str] = []

    async def get_secret(self, name: str, *, required: bool = True) -> SecretStr:
        assert name == PASSWORD_SECRET
        return SecretStr(self.cached)

    async def refresh(self, name: str) -> None:
        self.refreshed.append(name)
        self.cached = self.stored


def refreshing_handler(
    backends: OnexSettings, pg_dsn: str, server: PasswordCheckingServer, secrets: CachingSecrets
) -> PostgresHandler:
    return make_handler(
        settings_for(backends, database_of(pg_dsn)),
        secrets=secrets,
        clients={POOL_FACTORY_CLIENT: server.create_pool},
    )


async def test_rotated_password_is_refreshed_once_within_the_call(
    backends: OnexSettings, pg_dsn: str
) -> None:
    """The password rotated and the cache is stale: the operation refreshes it once, rebuilds
    the pool (closing the old one) and succeeds in the same call; a second consecutive refusal
    (the store still holds a wrong password) propagates after one more refresh."""
    server = PasswordCheckingServer("v1")
    secrets = CachingSecrets("v1")
    handler = refreshing_handler(backends, pg_dsn, server, secrets)
    await handler.initialize(handler_config())
    try:
        (old_pool,) = server.pools
        server.password = secrets.stored = "v2"

        result = await handler.upsert_node(register_request())

        assert result.previous is None
        assert secrets.refreshed == [PASSWORD_SECRET]
        assert server.pools_created_with == ["v1", "v2"]
        assert old_pool.is_closing()

        server.password = "v3"  # rotated again, but the store was not updated
        with pytest.raises(asyncpg.exceptions.InvalidPasswordError):
            await handler.get_node(GetNodeRequest(node_id=result.node.node_id))
        assert secrets.refreshed == [PASSWORD_SECRET, PASSWORD_SECRET]
        assert server.pools_created_with == ["v1", "v2", "v2"]
    finally:
        await handler.shutdown(10)


async def test_stale_password_at_start_up_is_refreshed_once(
    backends: OnexSettings, pg_dsn: str, db: Any
) -> None:
    """The first pool creation is refused with the cached (old) password: initialize refreshes
    it once, creates the pool with the new one and migrates."""
    server = PasswordCheckingServer("new")
    secrets = CachingSecrets("old")
    secrets.stored = "new"
    handler = refreshing_handler(backends, pg_dsn, server, secrets)

    await handler.initialize(handler_config())
    try:
        assert secrets.refreshed == [PASSWORD_SECRET]
        assert server.pools_created_with == ["old", "new"]
        assert await db.fetchval("SELECT count(*) FROM onex_schema_migrations") == len(
            load_migrations()
        )
    finally:
        await handler.shutdown(10)


async def test_refused_password_without_a_secret_store_is_not_retried(
    backends: OnexSettings, pg_dsn: str
) -> None:
    """Settings passwords cannot be refreshed: the refusal reaches the boundary as a
    non-retryable InfraAuthenticationError after one attempt."""
    server = PasswordCheckingServer("right")
    handler = make_handler(
        settings_for(backends, database_of(pg_dsn), password=SecretStr("wrong")),
        clients={POOL_FACTORY_CLIENT: server.create_pool},
    )

    failure = await failure_through_boundary("upsert_node", handler.upsert_node, register_request())

    assert failure.type == "InfraAuthenticationError"
    assert failure.non_retryable
    assert server.pools_created_with == ["wrong"]
    assert "wrong" not in str(failure)
    await handler.shutdown(5)
