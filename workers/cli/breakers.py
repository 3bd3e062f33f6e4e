"""``onex breakers list | open | close``: the fleet's circuit breakers, seen and overridden.

Breaker state is shared through Valkey (:mod:`activities.resilience.fleet`), so these commands
need ``ONEX_VALKEY__ADDRESS``. ``open`` forces a breaker open for a while: every worker then
rejects its calls at once, with ``next_retry_delay`` set to the time left, so Temporal waits
exactly that long; ``close`` ends that (or any) open. Both are announced as ``state_changed``
events that carry the reason. With Valkey unreachable they change nothing, and say so.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
from collections.abc import AsyncIterator
from typing import Annotated, Any

import typer
from rich.table import Table
from valkey.exceptions import ValkeyError

from activities.resilience.breaker import BreakerRegistry, Origin
from activities.resilience.fleet import FleetBreakers, FleetView, read_fleet
from activities.resilience.sanitize import sanitize_exception
from activities.valkey import connect_valkey
from contracts.errors import InfraUnavailableError
from workers.cli.common import EPILOG, JsonOption, console, run_async, settings_or_exit
from workers.settings import OnexSettings

DURATION_FORMAT = "a whole number and a unit, s, m or h (for example 90s, 10m, 2h), at most 24h"
_DURATION = re.compile(r"^(\d+)(s|m|h)$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600}
MAX_FORCED_SECONDS = 24 * 3600

breakers_app = typer.Typer(
    help=(
        "The fleet's circuit breakers (shared through Valkey: ONEX_VALKEY__ADDRESS).\n\n"
        "Examples:\n\n"
        "  onex breakers list\n\n"
        '  onex breakers open database:postgresql-primary --for 10m --reason "failover"\n\n'
        "  onex breakers close database:postgresql-primary"
    ),
    epilog=EPILOG,
    no_args_is_help=True,
    rich_markup_mode=None,
)


def parse_duration(value: str) -> float:
    """``--for``: seconds from ``90s``, ``10m`` or ``2h``; a bad value names the format."""
    match = _DURATION.match(value.strip())
    seconds = int(match.group(1)) * _UNIT_SECONDS[match.group(2)] if match else 0
    if not match or not 0 < seconds <= MAX_FORCED_SECONDS:
        raise typer.BadParameter(f"{value!r} is not a duration: expected {DURATION_FORMAT}")
    return float(seconds)


def _operator() -> str:
    return f"operator@{socket.gethostname()}"


async def _fleet(settings: OnexSettings, doing: str) -> tuple[Any, FleetView]:
    """A Valkey client and the fleet view; Valkey away refuses ``doing``, saying why."""
    client = await connect_valkey(settings.valkey, client_name="onex-cli")
    try:
        await client.ping()
        return client, await read_fleet(client, settings.valkey.key_prefix)
    except (ValkeyError, OSError) as exc:
        await client.aclose()
        raise InfraUnavailableError(
            f"cannot {doing}: Valkey at {settings.valkey.address} did not answer "
            f"({sanitize_exception(exc)}). Breaker state reaches the workers only through "
            "Valkey, so nothing was changed."
        ) from None


@contextlib.asynccontextmanager
async def _operating(settings: OnexSettings, name: str, doing: str) -> AsyncIterator[FleetBreakers]:
    """The fleet's breakers, as an operator acts on breaker ``name`` (which must exist)."""
    client, view = await _fleet(settings, doing)
    try:
        view.require(name)
        yield FleetBreakers(
            client, BreakerRegistry(), worker_id=_operator(), prefix=settings.valkey.key_prefix
        )
    finally:
        await client.aclose()


@breakers_app.command("list")
def list_command(as_json: JsonOption = False) -> None:
    """Every breaker of every live worker: its state and time left, and the fleet's opens.

    Example: onex breakers list
    """
    settings = settings_or_exit()

    async def read() -> FleetView:
        client, view = await _fleet(settings, "list the breakers")
        await client.aclose()
        return view

    view = run_async(read, failing="breakers list failed")
    if as_json:
        typer.echo(json.dumps({"workers": view.workers, "opens": view.opens}, indent=2))
        return
    table = Table(title="circuit breakers")
    for column in ("breaker", "worker", "state", "time left", "reason"):
        table.add_column(column)
    for entry in view.opens:
        kind = "forced open" if entry["forced"] else "open"
        table.add_row(
            entry["name"],
            "(fleet)",
            kind,
            f"{entry['seconds_left']:.0f}s",
            entry["reason"] or "",
        )
    for report in view.workers:
        for breaker in report.get("breakers", []):
            left = breaker.get("open_remaining_seconds") or 0
            table.add_row(
                breaker["name"],
                str(report.get("worker", "")),
                breaker["state"],
                f"{left:.0f}s" if left else "",
                breaker.get("reason") or "",
            )
    console.print(table)
    if not view.workers:
        console.print("no live worker reports its breakers (is one running with Valkey set?)")


ForOption = Annotated[
    float,
    typer.Option(
        "--for", parser=parse_duration, metavar="DURATION", help=f"How long: {DURATION_FORMAT}."
    ),
]
ReasonOption = Annotated[str, typer.Option("--reason", help="Why: carried by the event.")]


@breakers_app.command("open")
def open_command(name: str, duration: ForOption, reason: ReasonOption) -> None:
    """Force breaker NAME open on every worker for DURATION; each rejects at once, and
    Temporal retries after the time left.

    Example: onex breakers open database:postgresql-primary --for 10m --reason "failover"
    """
    settings = settings_or_exit()

    async def force() -> None:
        async with _operating(settings, name, f"force breaker {name!r} open") as fleet:
            await fleet.publish_open(
                name, duration, reason=reason, origin=Origin.OPERATOR, forced=True
            )

    run_async(force, failing="breakers open failed")
    console.print(f"{name}: forced open for {duration:g}s on every worker ({reason})")


@breakers_app.command("close")
def close_command(
    name: str,
    reason: Annotated[str, typer.Option("--reason", help="Why: carried by the event.")] = (
        "closed by an operator"
    ),
) -> None:
    """Close breaker NAME on every worker (a forced open or any other).

    Example: onex breakers close database:postgresql-primary
    """
    settings = settings_or_exit()

    async def close() -> None:
        async with _operating(settings, name, f"close breaker {name!r}") as fleet:
            await fleet.publish_close(name, reason=reason, origin=Origin.OPERATOR)

    run_async(close, failing="breakers close failed")
    console.print(f"{name}: closed on every worker")
