"""``onex nodes list|get``, ``onex ingress``, ``onex schedules apply``, ``onex simulate-nodes``:
the fleet that announces itself on Kafka, and what the orchestrator knows about it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from typing import Annotated, Any

import typer
from rich.table import Table

from contracts.errors import InfraConnectionError
from contracts.fleet import Cached, FleetState, NodeView
from workers.cli.common import (
    EPILOG,
    JsonOption,
    console,
    err_console,
    run_async,
    settings_or_exit,
    temporal_client,
)
from workers.settings import OnexSettings

nodes_app = typer.Typer(
    help="The fleet: nodes registered, their heartbeats and liveness.\n\n"
    "Example:\n\n  onex nodes list --state unhealthy",
    epilog=EPILOG,
    no_args_is_help=True,
    rich_markup_mode=None,
)
schedules_app = typer.Typer(
    help="The Temporal Schedules of the orchestrator (the liveness sweep).\n\n"
    "Example:\n\n  onex schedules apply",
    epilog=EPILOG,
    no_args_is_help=True,
    rich_markup_mode=None,
)


def _read_fields(answer: Cached[Any]) -> dict[str, Any]:
    """Where a registry read's answer came from, as ``--json`` shows it."""
    return {
        "stale": answer.stale,
        "source": answer.source,
        "age_seconds": round(answer.age_seconds, 3),
    }


def _say_if_stale(answer: Cached[Any]) -> None:
    """A stale answer (PostgreSQL unreachable, served from the Valkey cache) says so on
    standard error; the command still exits 0."""
    if answer.stale:
        err_console.print(
            f"stale: PostgreSQL unreachable, cached {answer.age_seconds:.0f} s ago",
            style="yellow",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )


def _ago(node: NodeView) -> str:
    if node.last_seen is None:
        return "never"
    return node.last_seen.isoformat(timespec="seconds")


def _table(nodes: list[NodeView]) -> Table:
    table = Table(title=f"nodes ({len(nodes)})")
    for column in ("node id", "service", "type", "version", "address", "state", "liveness",
                   "last heartbeat", "reported"):  # fmt: skip
        table.add_column(column, overflow="fold")
    for node in nodes:
        table.add_row(
            str(node.node_id),
            node.service_name,
            node.node_type.value,
            node.node_version,
            f"{node.address}:{node.port}",
            node.state.value,
            node.liveness.value,
            _ago(node),
            node.reported_state or "",
        )
    return table


@nodes_app.command("list")
def nodes_list(
    state: Annotated[
        FleetState | None, typer.Option("--state", help="Only active, unhealthy or inactive nodes")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """List the registered nodes: status, address, version, last heartbeat and liveness.

    With ONEX_VALKEY__ADDRESS set, reads go through a short-lived cache: while PostgreSQL is
    unreachable the last answer is shown, marked stale on standard error, and the command
    exits 0. --json prints {"stale", "source", "age_seconds", "nodes": [...]}.

    Example: onex nodes list --state unhealthy --json
    """
    from workers.client import list_nodes

    settings = settings_or_exit()
    answer = run_async(lambda: list_nodes(settings, state=state), failing="cannot read the fleet")
    _say_if_stale(answer)
    if as_json:
        nodes = [node.model_dump(mode="json") for node in answer.value]
        typer.echo(json.dumps({**_read_fields(answer), "nodes": nodes}))
        return
    console.print(_table(answer.value))


@nodes_app.command("get")
def nodes_get(
    node_id: Annotated[uuid.UUID, typer.Argument(help="The node's id")],
    as_json: JsonOption = False,
) -> None:
    """Show one node: status, addresses, version, last heartbeat, liveness, open operation.

    Exit 5 when the registry has no such node. As `nodes list`, a stale answer from the
    cache says so on standard error and exits 0; --json adds "stale", "source" and
    "age_seconds" to the node's fields.

    Example: onex nodes get 3f1c2d9e-8b7a-4c1e-9f0a-2b3c4d5e6f70
    """
    from workers.client import get_node

    settings = settings_or_exit()

    async def read() -> Cached[NodeView]:
        async with contextlib.AsyncExitStack() as stack:
            try:
                client = await stack.enter_async_context(temporal_client(settings))
            except InfraConnectionError:
                client = None  # Temporal away: the registry alone
            return await get_node(settings, node_id, client=client)

    answer = run_async(read, failing="cannot read the node")
    _say_if_stale(answer)
    fields = answer.value.model_dump(mode="json")
    if as_json:
        typer.echo(json.dumps({**fields, **_read_fields(answer)}, indent=2))
        return
    for name, value in fields.items():
        console.print(f"{name:<27} {value}", markup=False, highlight=False)


def ingress() -> None:
    """Run the Kafka ingress on its own (to scale it out): the dispatcher that registers nodes
    from their introspection and shutdown events, and the heartbeat consumer.

    `onex worker` runs the same in its process (unless ONEX_INGRESS__ENABLED=false). Stops
    on SIGTERM or SIGINT.

    Example: onex ingress
    """
    settings = settings_or_exit(library_logs="live")
    run_async(lambda: _serve_ingress(settings), failing="cannot run the ingress")


async def _serve_ingress(settings: OnexSettings) -> None:
    from activities.resilience.breaker import BreakerRegistry, log_state_change
    from workers.host import install_signal_handlers
    from workers.ingress import ingress_services

    stop = asyncio.Event()
    install_signal_handlers(stop)
    async with temporal_client(settings) as client:
        built = await ingress_services(
            settings, client, BreakerRegistry(listeners=[log_state_change])
        )
        try:
            for name in built.services:
                console.print(f"running  {name}", markup=False, highlight=False)
            await asyncio.gather(*(service(stop) for service in built.services.values()))
        finally:
            await built.close()


@schedules_app.command("apply")
def schedules_apply() -> None:
    """Create the orchestrator's Temporal Schedules, or update them to the settings (the
    liveness sweep, every ONEX_INGRESS__SWEEP_INTERVAL seconds). `onex worker` does this too.

    Example: onex schedules apply
    """
    from workers.schedules import apply_schedules

    settings = settings_or_exit()

    async def apply() -> dict[str, str]:
        async with temporal_client(settings) as client:
            return {k: v.value for k, v in (await apply_schedules(client, settings)).items()}

    for schedule_id, applied in run_async(apply, failing="cannot apply the schedules").items():
        console.print(f"{applied:<8} {schedule_id}", markup=False, highlight=False)


def simulate_nodes(
    count: Annotated[int, typer.Option("--count", min=1, max=100_000)] = 50,
    silence: Annotated[
        int, typer.Option("--silence", min=0, help="How many nodes stop heartbeating")
    ] = 0,
    interval: Annotated[
        float, typer.Option("--interval", min=0.01, help="Seconds between beats")
    ] = 30.0,
    rounds: Annotated[
        int | None, typer.Option("--rounds", min=1, help="Heartbeat rounds (default: forever)")
    ] = None,
) -> None:
    """Publish introspection and heartbeats for simulated nodes; some can fall silent.

    The silenced nodes send one heartbeat round, then none: the liveness sweep marks them
    unhealthy after the window. Ctrl-C stops.

    Example: onex simulate-nodes --count 50 --silence 3 --interval 5
    """
    from workers.host import install_signal_handlers
    from workers.simulate import NodeSimulator, simulated_fleet

    settings = settings_or_exit()

    async def simulate() -> int:
        stop = asyncio.Event()
        install_signal_handlers(stop)
        simulator = NodeSimulator(
            settings.kafka, simulated_fleet(count), silent=silence, interval=interval
        )
        console.print(
            f"{count} simulated nodes ({silence} fall silent), a heartbeat every {interval}s",
            markup=False,
        )
        await simulator.run(stop, rounds=rounds)
        return simulator.heartbeats

    beats = run_async(simulate, failing="cannot simulate nodes")
    console.print(f"published {count} introspections and {beats} heartbeats", markup=False)
