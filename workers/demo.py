"""``onex demo`` (``make demo``): the main job, end to end, on the embedded stack.

Brings the stack up, runs a worker in this process, registers a few nodes through the client
helpers (one request is refused as bad input, and the message is shown), deregisters one, prints
a table of the outcomes and where to look in the Temporal UI, checks that the registered events
reached their Kafka topic, and stops the worker, leaving the stack running.
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
from contracts.node import node_workflow_id
from contracts.operations_io import OperationResult, OperationStatus
from contracts.registry import DeregisterNodeRequest, RegisterNodeRequest
from contracts.topics import TopicName
from workers.client import Operations, deregister_node, register_node
from workers.devstack import DevStack
from workers.host import build_host
from workers.settings import OnexSettings
from workflows import WORKFLOWS

REGISTERED_TOPIC = TopicName.REGISTRY_NODE_REGISTERED


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

    console.print("[bold]2. a worker[/bold] (handlers from contracts/handlers)")
    host = await build_host(settings, workflows=WORKFLOWS)
    report = await host.start()
    for line in report.lines():
        console.print(f"   {line}", markup=False, highlight=False)
    stop = asyncio.Event()
    serving = asyncio.create_task(host.run(stop))
    try:
        rows = await _operations(settings, host.client, console)
        events_ok = await _show_events(settings, rows, console)
    finally:
        stop.set()
        with contextlib.suppress(Exception):
            await serving
    _summary(settings, rows, console, time.monotonic() - started)
    if not events_ok:
        raise DemoEventsMissing(
            "not every registered event reached Kafka within 30 s: look at the worker's "
            "outbox relay (`onex dev logs kafka`, the onex_outbox table)"
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


def _summary(settings: OnexSettings, rows: list[DemoRow], console: Console, took: float) -> None:
    ui = settings.temporal.ui_url
    namespace = settings.temporal.namespace
    correlation = rows[0].result.correlation_id
    query = quote(f'CorrelationId="{correlation}"')
    console.print(f"[bold]5. where to look[/bold] (done in {took:.1f}s)")
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
