"""``onex nodes list|get`` and ``onex schedules apply`` against the real PostgreSQL and
Temporal dev server."""

from __future__ import annotations

import asyncio
import json
import uuid

from temporalio.testing import WorkflowEnvironment
from typer.testing import CliRunner

from tests.fleet_support import seed_fleet
from workers.cli import app
from workers.cli.exit_codes import ExitCode
from workers.settings import OnexSettings

runner = CliRunner()


def _env(backends: OnexSettings, pg_dsn: str, cli_env: dict[str, str]) -> dict[str, str]:
    return {
        **cli_env,
        "ONEX_POSTGRES__HOST": backends.postgres.host,
        "ONEX_POSTGRES__PORT": str(backends.postgres.port),
        "ONEX_POSTGRES__DATABASE": pg_dsn.rsplit("/", 1)[1],
        # No Temporal here: `nodes get` shows the registry alone.
        "ONEX_TEMPORAL__PORT": "1",
    }


async def test_nodes_list_and_get_show_status_liveness_and_last_heartbeat(
    backends: OnexSettings, pg_dsn: str, cli_env: dict[str, str]
) -> None:
    """`onex nodes list --json` shows every node with its state, liveness and last heartbeat;
    `--state unhealthy` only the silent one; `onex nodes get` one node (exit 0), and an
    unknown id exits 5."""
    alive, silent = await seed_fleet(pg_dsn)
    env = _env(backends, pg_dsn, cli_env)

    def invoke(*args: str) -> object:
        return runner.invoke(app, list(args), env=env)

    # One at a time: the runner swaps the process's stdout while a command runs.
    listed = await asyncio.to_thread(invoke, "nodes", "list", "--json")
    unhealthy = await asyncio.to_thread(invoke, "nodes", "list", "--state", "unhealthy", "--json")
    got = await asyncio.to_thread(invoke, "nodes", "get", str(alive), "--json")
    missing = await asyncio.to_thread(invoke, "nodes", "get", str(uuid.uuid4()))
    for result in (listed, unhealthy, got):
        assert result.exit_code == 0, result.output  # type: ignore[attr-defined]
    answer = json.loads(listed.stdout)  # type: ignore[attr-defined]
    assert (answer["stale"], answer["source"]) == (False, "database"), "no Valkey: a direct read"
    nodes = {node["node_id"]: node for node in answer["nodes"]}
    assert nodes[str(alive)]["state"] == "active"
    assert nodes[str(silent)]["state"] == "unhealthy"
    assert nodes[str(silent)]["reported_state"] == "busy"
    assert nodes[str(alive)]["last_seen"] is not None
    only = [node["node_id"] for node in json.loads(unhealthy.stdout)["nodes"]]  # type: ignore[attr-defined]
    assert only == [str(silent)], "--state unhealthy must show only the silent node"
    node = json.loads(got.stdout)  # type: ignore[attr-defined]
    assert node["address"] == "10.0.0.7"
    assert node["node_version"] == "2.0.0"
    assert node["open_operation"] is None
    assert (node["stale"], node["source"], node["age_seconds"]) == (False, "database", 0.0)
    assert missing.exit_code == ExitCode.NOT_FOUND, missing.output  # type: ignore[attr-defined]


async def test_schedules_apply_creates_then_updates(
    temporal_env: WorkflowEnvironment, cli_env: dict[str, str]
) -> None:
    """`onex schedules apply` creates the liveness schedule, and a second apply updates it."""
    host, port = temporal_env.client.service_client.config.target_host.rsplit(":", 1)
    schedule_id = f"liveness-{uuid.uuid4().hex[:8]}"
    env = {
        **cli_env,
        "ONEX_TEMPORAL__HOST": host,
        "ONEX_TEMPORAL__PORT": port,
        "ONEX_INGRESS__SCHEDULE_ID": schedule_id,
    }
    first = await asyncio.to_thread(runner.invoke, app, ["schedules", "apply"], env=env)
    second = await asyncio.to_thread(runner.invoke, app, ["schedules", "apply"], env=env)
    try:
        assert first.exit_code == 0, first.output
        assert f"created  {schedule_id}" in first.output
        assert second.exit_code == 0, second.output
        assert f"updated  {schedule_id}" in second.output
    finally:
        await temporal_env.client.get_schedule_handle(schedule_id).delete()
