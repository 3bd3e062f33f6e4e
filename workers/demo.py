"""``onex demo`` (``make demo``): the main job, end to end, on the embedded stack.

Brings the stack up, runs a worker in this process (with the Kafka ingress), registers a few
nodes through the client helpers (one request is refused as bad input, and the message is
shown), deregisters one, prints a table of the outcomes and where to look in the Temporal UI,
checks that the registered events reached their Kafka topic, then lets simulated nodes announce
themselves on Kafka: the ingress registers them, their heartbeats are recorded, one falls silent
and the liveness sweep marks it unhealthy. The fleet part uses short intervals
(:data:`DEMO_LIVENESS`: heartbeats every 0.5 s, unhealthy after 3 s, a sweep every second, on a
schedule of its own that is deleted afterwards), so the demo ends in well under a minute. The
worker stops; the stack keeps running.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from contracts.errors import InfraUnavailableError
from contracts.fleet import FleetState, NodeView
from contracts.node import node_workflow_id
from contracts.operations_io import OperationResult, OperationStatus
from contracts.registry import DeregisterNodeRequest, RegisterNodeRequest
from contracts.topics import TopicName
from workers.client import Operations, deregister_node, list_nodes, register_node
from workers.devstack import DevStack
from workers.host import build_host
from workers.ingress import attach_ingress
from workers.settings import OnexSettings
from workers.simulate import NodeSimulator, simulated_fleet
from workflows import WORKFLOWS

REGISTERED_TOPIC = TopicName.REGISTRY_NODE_REGISTERED
DEMO_LIVENESS = {
    "heartbeat_interval": 0.5,
    "liveness_window": 3.0,
    "jitter_limit": 2.0,
    "sweep_interval": 1.0,
    "schedule_id": "onex-demo-liveness-sweep",
}
"""The demo's short liveness intervals (the defaults are 30 s, 90 s, 15 s and 30 s)."""
SIMULATED_NODES = 5


@dataclass(frozen=True)
class DemoRow:
    node: str
    node_id: uuid.UUID
    action: str
    result: OperationResult


def _nodes() -> list[dict[str, Any]]:
    services = [
        ("billing", "effect", 8080),
        ("pricing", "compute", 8081),
        ("ledger", "reducer", 8082),
    ]
    return [
        {
            "node_id": str(uuid.uuid4()),
            "node_type": node_type,
            "node_version": "1.0.0",
            "service_name": name,
            "address": "127.0.0.1",
            "port": port,
            "tags": ["demo"],
            "endpoints": {"health": f"http://127.0.0.1:{port}/health"},
            "metadata": {"team": "platform"},
        }
        for name, node_type, port in services
    ]


async def run_demo(settings: OnexSettings, console: Console) -> list[DemoRow]:
    started = time.monotonic()
    console.print("[bold]1. the embedded stack[/bold] (Temporal + UI, PostgreSQL, Kafka)")
    for status in await DevStack(settings).up():
        console.print(f"   {status.name:<9} {status.state:<8} {status.address}")

    console.print("[bold]2. a worker[/bold] (handlers from contracts/handlers, the Kafka ingress)")
    settings = settings.model_copy(
        update={"ingress": settings.ingress.model_copy(update=DEMO_LIVENESS)}
    )
    host = await build_host(settings, workflows=WORKFLOWS)
    report = await host.start()
    await attach_ingress(host, settings)
    for line in report.lines():
        console.print(f"   {line}", markup=False, highlight=False)
    stop = asyncio.Event()
    serving = asyncio.create_task(host.run(stop))
    try:
        rows = await _operations(settings, host.client, console)
        events_ok = await _show_events(settings, rows, console)
        fleet_ok = await _fleet(settings, console)
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await serving
        with contextlib.suppress(Exception):
            await host.client.get_schedule_handle(settings.ingress.schedule_id).delete()
    _summary(settings, rows, console, time.monotonic() - started)
    if not events_ok:
        raise DemoEventsMissing(
            "not every registered event reached Kafka within 30 s: look at the worker's "
            "outbox relay (`onex dev logs kafka`, the onex_outbox table)"
        )
    if not fleet_ok:
        raise DemoEventsMissing(
            "the simulated nodes were not all registered, or the silent one was not marked "
            "unhealthy, within 30 s: look at the worker's ingress and heartbeat consumer logs"
        )
    return rows


async def _operations(settings: OnexSettings, client: Any, console: Console) -> list[DemoRow]:
    operations = Operations.load(settings)
    console.print("[bold]3. operations[/bold] through the client helpers (workers/client.py)")
    rows = []
    requests = [RegisterNodeRequest.model_validate(data) for data in _nodes()]
    for request in requests:
        result = await register_node(client, request, settings=settings, operations=operations)
        rows.append(DemoRow(request.service_name, request.node_id, "register", result))

    bad = {**_nodes()[0], "node_version": "one", "port": 70000}
    try:
        RegisterNodeRequest.model_validate(bad)
    except ValidationError as refused:
        problems = "; ".join(
            f"{'.'.join(str(part) for part in error['loc'])}: {error['msg']}"
            for error in refused.errors(include_url=False, include_input=False)
        )
        console.print(f"   refused as bad input (nothing was started): {problems}", markup=False)

    first = requests[0]
    result = await deregister_node(
        client,
        DeregisterNodeRequest(node_id=first.node_id, node_type=first.node_type, reason="demo"),
        settings=settings,
        operations=operations,
    )
    rows.append(DemoRow(first.service_name, first.node_id, "deregister", result))
    table = Table(title="operations")
    for column in ("node", "action", "status", "backends", "correlation id", "workflow id"):
        table.add_column(column, overflow="fold")
    for row in rows:
        backends = ", ".join(f"{b.backend}={b.status.value}" for b in row.result.backends)
        table.add_row(
            row.node,
            row.action,
            row.result.status.value,
            backends,
            str(row.result.correlation_id),
            row.result.workflow_id,
        )
    console.print(table)
    skipped = {
        b.skip_reason for row in rows for b in row.result.backends if b.skip_reason is not None
    }
    for reason in sorted(skipped):
        console.print(f"   skipped: {reason}", markup=False)
    return rows


class DemoEventsMissing(InfraUnavailableError, RuntimeError):
    """The operations ran, but their events did not all reach Kafka."""


async def _show_events(settings: OnexSettings, rows: list[DemoRow], console: Console) -> bool:
    """Wait (bounded) until each registration's event is on its topic; say whether all did."""
    from aiokafka import AIOKafkaConsumer

    wanted = {
        str(row.node_id)
        for row in rows
        if row.action == "register" and row.result.status is OperationStatus.SUCCESS
    }
    topic = settings.kafka.topic_prefix + REGISTERED_TOPIC
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=settings.kafka.bootstrap_servers,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    seen: set[str] = set()
    await consumer.start()
    try:
        deadline = time.monotonic() + 30
        while wanted - seen and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            for messages in batches.values():
                seen.update(message.key.decode() for message in messages if message.key)
    finally:
        await consumer.stop()
    found = len(wanted & seen)
    console.print(
        f"[bold]4. events[/bold]: {found} of {len(wanted)} registrations are on Kafka topic "
        f"{topic} (published from the outbox by the worker's relay)"
    )
    return found == len(wanted)


async def _fleet(settings: OnexSettings, console: Console) -> bool:
    """Simulated nodes announce themselves and heartbeat on Kafka; one falls silent."""
    fleet = simulated_fleet(SIMULATED_NODES, name="demo-sim")
    ingress = settings.ingress
    simulator = NodeSimulator(
        settings.kafka, fleet, silent=1, interval=ingress.heartbeat_interval, silent_after=2
    )
    silent = simulator.silenced[0].node_id
    ids = {node.node_id for node in fleet}
    console.print(
        f"[bold]5. the fleet on Kafka[/bold]: {SIMULATED_NODES} simulated nodes publish "
        f"introspection and a heartbeat every {ingress.heartbeat_interval}s; "
        f"{simulator.silenced[0].service_name} falls silent (unhealthy after "
        f"{ingress.liveness_window}s)"
    )
    stop = asyncio.Event()
    simulating = asyncio.create_task(simulator.run(stop))
    registered: list[NodeView] = []
    unhealthy = announced = False
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            nodes = [n for n in (await list_nodes(settings)).value if n.node_id in ids]
            registered = nodes
            heard = all(n.last_seen is not None for n in nodes if n.node_id != silent)
            if len(nodes) == len(ids) and heard and not announced:
                announced = True
                console.print(f"   registered from Kafka, heartbeating: {len(nodes)} nodes")
            lost = [n for n in nodes if n.node_id == silent and n.state is FleetState.UNHEALTHY]
            if lost and len(nodes) == len(ids):
                unhealthy = True
                break
            await asyncio.sleep(0.5)  # the demo paces its own output
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await simulating
    table = Table(title="fleet (onex nodes list)")
    for column in ("service", "type", "state", "liveness", "last heartbeat", "reported"):
        table.add_column(column, overflow="fold")
    for node in sorted(registered, key=lambda n: n.service_name):
        seen = node.last_seen.isoformat(timespec="seconds") if node.last_seen else "never"
        table.add_row(
            node.service_name,
            node.node_type.value,
            node.state.value,
            node.liveness.value,
            seen,
            node.reported_state or "",
        )
    console.print(table)
    return unhealthy and len(registered) == len(ids)


def _summary(settings: OnexSettings, rows: list[DemoRow], console: Console, took: float) -> None:
    ui = settings.temporal.ui_url
    namespace = settings.temporal.namespace
    correlation = rows[0].result.correlation_id
    query = quote(f'CorrelationId="{correlation}"')
    console.print(f"[bold]6. where to look[/bold] (done in {took:.1f}s)")
    console.print(f"   Temporal UI: {ui}/namespaces/{namespace}/workflows", markup=False)
    console.print(
        f"   by correlation id: {ui}/namespaces/{namespace}/workflows?query={query}",
        markup=False,
    )
    console.print(
        f"   or: temporal workflow list --query \"CorrelationId='{correlation}'\"", markup=False
    )
    console.print(
        "   a node's operations, in the order they ran: "
        f"`.venv/bin/onex status {node_workflow_id(rows[0].node_id)}`",
        markup=False,
    )
    console.print(
        "   the stack keeps running: `.venv/bin/onex dev status`; stop it with "
        "`.venv/bin/onex dev down` (add --purge to delete its data)",
        markup=False,
    )
