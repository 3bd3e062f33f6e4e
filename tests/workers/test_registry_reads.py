"""Registry reads that degrade gracefully: ``get_node``, ``list_nodes`` and ``onex nodes``
against the real PostgreSQL and the real Valkey, each behind a fault proxy.

PostgreSQL cut: the cached answers come back marked stale (each state filter its own entry),
and what was never cached is the unavailable error (exit 6). Valkey cut or slow: the reads go
straight to PostgreSQL and are fresh. No Valkey configured: direct reads, nothing else.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import asyncpg
import pytest
from typer.testing import CliRunner, Result

from activities.settings import ValkeySettings
from contracts.errors import InfraConnectionError
from contracts.fleet import Cached, FleetState
from tests.fakes.fault_proxy import FaultProxy
from tests.fleet_support import seed_fleet
from workers.cli import app
from workers.cli.exit_codes import ExitCode
from workers.client import NodeNotFound, get_node, list_nodes
from workers.settings import OnexSettings

T = TypeVar("T")
DEADLINE = 15.0
runner = CliRunner()


@dataclass
class Registry:
    """A seeded registry; ``settings`` reach PostgreSQL and Valkey through their proxies."""

    settings: OnexSettings
    pg: FaultProxy
    valkey: FaultProxy
    pg_dsn: str  # direct, for changing rows under the cache
    alive: uuid.UUID
    silent: uuid.UUID

    def with_valkey(self, **changes: Any) -> OnexSettings:
        valkey = self.settings.valkey.model_copy(update=changes)
        return self.settings.model_copy(update={"valkey": valkey})

    async def set_version(self, node_id: uuid.UUID, version: str) -> None:
        connection = await asyncpg.connect(self.pg_dsn)
        try:
            await connection.execute(
                "UPDATE onex_nodes SET node_version = $2 WHERE node_id = $1", node_id, version
            )
        finally:
            await connection.close()


@pytest.fixture
async def registry(
    backends: OnexSettings, pg_dsn: str, valkey_server: ValkeySettings
) -> AsyncIterator[Registry]:
    alive, silent = await seed_fleet(pg_dsn)
    valkey_host, valkey_port = valkey_server.host_port
    async with (
        FaultProxy(backends.postgres.host, backends.postgres.port) as pg,
        FaultProxy(valkey_host, valkey_port) as valkey,
    ):
        postgres = backends.postgres.model_copy(
            update={"host": pg.host, "port": pg.port, "database": pg_dsn.rsplit("/", 1)[1]}
        )
        cache = valkey_server.model_copy(
            update={
                "address": valkey.address,
                "timeout": 0.5,
                "key_prefix": f"onex:t{uuid.uuid4().hex[:10]}:",  # this test's entries only
                "cache_ttl": 60.0,  # fresh for the whole test unless a test shortens it
            }
        )
        settings = backends.model_copy(update={"postgres": postgres, "valkey": cache})
        yield Registry(settings, pg, valkey, pg_dsn, alive, silent)


async def stale_answer(read: Callable[[], Awaitable[Cached[T]]]) -> Cached[T]:
    """Read until the answer is stale: the entry is past its (short) TTL and the database is
    cut; fail after the deadline."""
    deadline = time.monotonic() + DEADLINE
    while not (answer := await read()).stale:
        if time.monotonic() > deadline:
            raise AssertionError(f"no stale answer within {DEADLINE}s: {answer}")
        await asyncio.sleep(0.05)
    return answer


async def test_postgresql_down_answers_from_the_cache_marked_stale(registry: Registry) -> None:
    """Warm the cache, cut PostgreSQL: within the TTL the cached answers are fresh hits; past
    it, the same answers come back stale, with source and age. Each state filter is an entry
    of its own, and what was never cached (or was not found) is the connection error."""
    settings = registry.settings
    every = await list_nodes(settings)
    unhealthy = await list_nodes(settings, state=FleetState.UNHEALTHY)
    alive = await get_node(settings, registry.alive)
    for answer in (every, unhealthy, alive):
        assert (answer.source, answer.stale) == ("database", False)
    assert {node.node_id for node in every.value} == {registry.alive, registry.silent}
    assert [node.node_id for node in unhealthy.value] == [registry.silent]
    unknown = uuid.uuid4()
    with pytest.raises(NodeNotFound):
        await get_node(settings, unknown)

    await registry.pg.cut()
    hit = await list_nodes(settings)
    assert (hit.source, hit.stale, hit.value) == ("cache", False, every.value), (
        "within the TTL the cache answers, fresh, without PostgreSQL"
    )

    short = registry.with_valkey(cache_ttl=0.05)
    stale_every = await stale_answer(lambda: list_nodes(short))
    stale_unhealthy = await stale_answer(lambda: list_nodes(short, state=FleetState.UNHEALTHY))
    stale_alive = await stale_answer(lambda: get_node(short, registry.alive))
    assert stale_every.value == every.value
    assert stale_unhealthy.value == unhealthy.value, "the state filter must be part of the key"
    assert stale_alive.value == alive.value
    for answer in (stale_every, stale_unhealthy, stale_alive):
        assert answer.source == "cache"
        assert answer.age_seconds > 0

    with pytest.raises(InfraConnectionError):
        await list_nodes(short, state=FleetState.INACTIVE)  # never cached
    with pytest.raises(InfraConnectionError):
        await get_node(short, unknown)  # "not found" was never cached either


async def test_valkey_down_reads_go_straight_to_postgresql_and_are_fresh(
    registry: Registry,
) -> None:
    """With Valkey cut, a read skips the (still fresh) cached entry and answers from
    PostgreSQL, with its latest rows; with both down there is nothing to answer from."""
    settings = registry.settings
    await list_nodes(settings)
    await get_node(settings, registry.alive)
    assert (await get_node(settings, registry.alive)).source == "cache", "the cache is warm"
    await registry.set_version(registry.alive, "3.0.0")

    await registry.valkey.cut()
    every = await list_nodes(settings)
    alive = await get_node(settings, registry.alive)
    for answer in (every, alive):
        assert (answer.source, answer.stale, answer.age_seconds) == ("database", False, 0.0)
    versions = {node.node_id: node.node_version for node in every.value}
    assert versions[registry.alive] == "3.0.0", "a read without Valkey is PostgreSQL's own"
    assert alive.value.node_version == "3.0.0"

    await registry.pg.cut()
    with pytest.raises(InfraConnectionError):
        await get_node(settings, registry.alive)


async def test_a_slow_valkey_is_bypassed_after_its_timeout(registry: Registry) -> None:
    """Valkey answering slower than ONEX_VALKEY__TIMEOUT: the read does not wait for it, and
    PostgreSQL answers."""
    registry.valkey.set_delay(5.0)
    answer = await list_nodes(registry.settings)
    assert (answer.source, answer.stale) == ("database", False)
    assert {node.node_id for node in answer.value} == {registry.alive, registry.silent}


async def test_without_valkey_configured_reads_are_direct(registry: Registry) -> None:
    """ONEX_VALKEY__ADDRESS unset: every read is PostgreSQL's, and Valkey is never contacted."""
    settings = registry.with_valkey(address=None)
    first = await get_node(settings, registry.alive)
    await registry.set_version(registry.alive, "3.0.0")
    second = await get_node(settings, registry.alive)
    assert (first.source, second.source) == ("database", "database")
    assert second.value.node_version == "3.0.0", "nothing is cached"
    assert (await list_nodes(settings)).source == "database"
    assert registry.valkey.total_connections == 0


# -- the CLI ---------------------------------------------------------------------------------


def _env(registry: Registry, cli_env: dict[str, str], **valkey: str) -> dict[str, str]:
    settings = registry.settings
    env = {
        **cli_env,
        "ONEX_POSTGRES__HOST": settings.postgres.host,
        "ONEX_POSTGRES__PORT": str(settings.postgres.port),
        "ONEX_POSTGRES__DATABASE": settings.postgres.database,
        "ONEX_TEMPORAL__PORT": "1",  # no Temporal: `nodes get` shows the registry alone
        "ONEX_VALKEY__ADDRESS": settings.valkey.address or "",
        "ONEX_VALKEY__TIMEOUT": str(settings.valkey.timeout),
        "ONEX_VALKEY__KEY_PREFIX": settings.valkey.key_prefix,
    }
    return env | {f"ONEX_VALKEY__{name.upper()}": value for name, value in valkey.items()}


async def onex(env: dict[str, str], *args: str) -> Result:
    # One at a time, off the loop (the proxies run on it): the runner swaps the process's
    # standard streams while a command runs.
    return await asyncio.to_thread(runner.invoke, app, list(args), env=env)


async def test_the_cli_marks_a_stale_answer_and_exits_0(
    registry: Registry, cli_env: dict[str, str]
) -> None:
    """`onex nodes list|get` with PostgreSQL cut: the cached answer, a `stale:` line on
    standard error, the fields in --json, exit 0; a node never cached exits 6."""
    warm = _env(registry, cli_env)
    listed = await onex(warm, "nodes", "list", "--json")
    got = await onex(warm, "nodes", "get", str(registry.alive), "--json")
    for result in (listed, got):
        assert result.exit_code == 0, result.output
        assert "stale" not in result.stderr, result.stderr
        assert json.loads(result.stdout)["source"] == "database"

    await registry.pg.cut()
    short = _env(registry, cli_env, cache_ttl="0.05")
    deadline = time.monotonic() + DEADLINE
    while not json.loads((stale_list := await onex(short, "nodes", "list", "--json")).stdout)[
        "stale"
    ]:
        assert time.monotonic() < deadline, f"no stale answer: {stale_list.output}"
    table = await onex(short, "nodes", "list")
    stale_get = await onex(short, "nodes", "get", str(registry.alive), "--json")
    shown = await onex(short, "nodes", "get", str(registry.alive))
    for result in (stale_list, table, stale_get, shown):
        assert result.exit_code == 0, result.output
        assert "stale: PostgreSQL unreachable, cached " in result.stderr, result.stderr
        assert " s ago" in result.stderr
    answer = json.loads(stale_list.stdout)
    assert answer["source"] == "cache"
    assert answer["age_seconds"] > 0
    assert {node["node_id"] for node in answer["nodes"]} == {
        str(registry.alive),
        str(registry.silent),
    }
    assert "nodes (2)" in table.stdout
    node = json.loads(stale_get.stdout)
    assert (node["stale"], node["source"], node["node_id"]) == (True, "cache", str(registry.alive))
    assert str(registry.alive) in shown.stdout

    missing = await onex(short, "nodes", "get", str(uuid.uuid4()))
    assert missing.exit_code == ExitCode.UNAVAILABLE, missing.output
    assert "cannot read the node" in missing.stderr
    assert "connection failed" in missing.stderr
