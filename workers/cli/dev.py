"""``onex dev up | down | status | logs``: the embedded stack on this machine."""

from __future__ import annotations

import json
import time
from typing import Annotated

import typer
from rich.table import Table

from workers.cli.common import (
    EPILOG,
    JsonOption,
    console,
    err_console,
    relative,
    run,
    run_async,
    settings_or_exit,
)
from workers.cli.exit_codes import ExitCode
from workers.devstack import DevStack, ServiceName, ServiceStatus

dev_app = typer.Typer(
    help=(
        "Manage the embedded stack: the Temporal dev server with its UI, PostgreSQL and a "
        "Kafka-protocol broker, all installed by pip and run in the background, with their "
        "state under one directory (ONEX_DEV__STATE_DIR, default .onex/).\n\n"
        "Example:\n\n"
        "  onex dev up && onex dev status && onex dev down"
    ),
    epilog=EPILOG,
    no_args_is_help=True,
    rich_markup_mode=None,
)


def _status_table(statuses: list[ServiceStatus]) -> Table:
    table = Table(title="embedded stack")
    for column in ("service", "state", "address", "pid", "log"):
        table.add_column(column)
    for status in statuses:
        style = "green" if status.state == "running" else "yellow"
        table.add_row(
            status.name,
            f"[{style}]{status.state}[/{style}]",
            status.address,
            str(status.pid or "-"),
            relative(status.log),
        )
    return table


def _print_statuses(statuses: list[ServiceStatus], *, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps([status.__dict__ for status in statuses], indent=2))
    else:
        console.print(_status_table(statuses))


@dev_app.command("up")
def dev_up(
    as_json: JsonOption = False,
    codec: Annotated[
        bool,
        typer.Option(
            "--codec",
            help=(
                "Also run `onex codec-server` and wire the UI to it, so that it shows encrypted "
                "payloads decoded (needs the secrets temporal.payload_key and "
                "temporal.codec_token; see docs/security.md)."
            ),
        ),
    ] = False,
) -> None:
    """Start the stack in the background and wait until every service answers.

    Idempotent: services already running are reused. Each service must answer a real request
    (Temporal namespace describe and UI, PostgreSQL SELECT 1, Kafka metadata) within
    ONEX_DEV__START_TIMEOUT seconds; otherwise the error names the service, why it failed and
    where its log is. The database, role and Kafka topic catalog are created if missing.

    Examples: onex dev up ; onex dev up --codec (with ONEX_CODEC__ENABLED=true for the worker)
    """
    settings = settings_or_exit()
    stack = DevStack(settings, codec=codec)
    started = time.monotonic()
    if not as_json:
        err_console.print(f"starting the embedded stack under {stack.state_dir} ...")
    statuses = run_async(stack.up)
    _print_statuses(statuses, as_json=as_json)
    if not as_json:
        console.print(
            f"ready in {time.monotonic() - started:.1f}s. Temporal UI: {settings.temporal.ui_url}"
        )


@dev_app.command("down")
def dev_down(
    purge: Annotated[
        bool, typer.Option("--purge", help="Also delete the state directory (all data, logs).")
    ] = False,
) -> None:
    """Stop exactly the processes `onex dev up` started; keep their data unless --purge.

    Example: onex dev down --purge
    """
    stack = DevStack(settings_or_exit())
    stopped = run(lambda: stack.down(purge=purge))
    console.print(f"stopped: {', '.join(stopped) or 'nothing was running'}")
    if purge:
        console.print(f"deleted {stack.state_dir}")


@dev_app.command("status")
def dev_status(as_json: JsonOption = False) -> None:
    """Show each service: state, address, pid and log file (exit 6 if one is not running).

    With --json, each service also lists its endpoints (Temporal target and UI, the PostgreSQL
    DSN, the Kafka bootstrap servers), which clients can use as they are.

    Example: onex dev status --json
    """
    statuses = DevStack(settings_or_exit()).status()
    _print_statuses(statuses, as_json=as_json)
    if any(status.state != "running" for status in statuses):
        raise typer.Exit(ExitCode.UNAVAILABLE)


@dev_app.command("logs")
def dev_logs(
    service: Annotated[
        ServiceName | None, typer.Argument(help="One service; all of them when omitted.")
    ] = None,
    lines: Annotated[int, typer.Option("--lines", "-n", min=1, help="Lines per log.")] = 40,
) -> None:
    """Print the last lines of a service's log (or of every service's).

    Example: onex dev logs postgres -n 100
    """
    stack = DevStack(settings_or_exit())
    names = [service] if service else list(ServiceName)
    for name in names:
        path = stack.log_path(name)
        console.rule(f"{name.value}: {path}")
        if not path.exists():
            console.print("(no log yet: the service was never started here)")
            continue
        tail = path.read_text(errors="replace").splitlines()[-lines:]
        typer.echo("\n".join(tail))
