"""The ``onex`` command line.

Exit codes (the same for every command):

* 0 — done;
* 2 — bad input: a wrong option, argument or setting (the message says which and how to fix it);
* 3 — partial: some backends succeeded, the rest can be retried;
* 4 — failed or compensated;
* 5 — not found;
* 6 — a service is unavailable (could not be started, reached or stopped).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from activities.resilience.sanitize import sanitize_exception, sanitize_text
from contracts.errors import ConfigurationError, InfraError
from workers import operations_cli
from workers.cli_support import (
    EPILOG,
    ExitCode,
    JsonOption,
    T,
    console,
    err_console,
    fail,
    settings_or_exit,
)
from workers.devstack import DevStack, ServiceName, ServiceStatus, StackError
from workers.host import WorkerStartError
from workers.settings import OnexSettings

app = typer.Typer(
    name="onex",
    help=(
        "ONEX Orchestrator: durable infrastructure operations on Temporal.\n\n"
        "Start here:\n\n"
        "  onex dev up        # Temporal (+UI), PostgreSQL and Kafka on this machine\n\n"
        "  onex demo          # the main job against that stack"
    ),
    epilog=EPILOG,
    no_args_is_help=True,
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
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
app.add_typer(dev_app, name="dev")
contracts_app = typer.Typer(
    help=(
        "Check handler and operation contracts, and keep their JSON Schemas current.\n\n"
        "Example:\n\n"
        "  onex contracts validate contracts/handlers/my_handler"
    ),
    epilog=EPILOG,
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(contracts_app, name="contracts")


def _run_stack(action: Callable[[], T]) -> T:
    try:
        return action()
    except StackError as exc:
        fail(ExitCode.UNAVAILABLE, str(exc))


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
            _relative(status.log),
        )
    return table


def _relative(path: str) -> str:
    """A path relative to the working directory when it is under it (shorter in a table)."""
    try:
        return str(Path(path).relative_to(Path.cwd()))
    except ValueError:
        return path


def _print_statuses(statuses: list[ServiceStatus], *, as_json: bool) -> None:
    if as_json:
        typer.echo(json.dumps([status.__dict__ for status in statuses], indent=2))
    else:
        console.print(_status_table(statuses))


@dev_app.command("up")
def dev_up(as_json: JsonOption = False) -> None:
    """Start the stack in the background and wait until every service answers.

    Idempotent: services already running are reused. Each service must answer a real request
    (Temporal namespace describe and UI, PostgreSQL SELECT 1, Kafka metadata) within
    ONEX_DEV__START_TIMEOUT seconds; otherwise the error names the service, why it failed and
    where its log is. The database, role and Kafka topic catalog are created if missing.

    Example: onex dev up
    """
    settings = settings_or_exit()
    stack = DevStack(settings)
    started = time.monotonic()
    if not as_json:
        err_console.print(f"starting the embedded stack under {stack.state_dir} ...")
    statuses = _run_stack(lambda: asyncio.run(stack.up()))
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
    stopped = _run_stack(lambda: stack.down(purge=purge))
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


@contracts_app.command("validate")
def contracts_validate(
    paths: Annotated[
        list[Path] | None,
        typer.Argument(
            help="Contract files, directories or globs (default: the configured contract "
            "directories, ONEX_WORKER__CONTRACT_PATHS and ONEX_WORKER__OPERATION_PATHS)."
        ),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Run every check the worker makes on contracts, without starting anything.

    Handler contracts: schema, 10 MiB limit, safe YAML, no secret-looking values, namespace
    allowlist (before import), the class and its operations. Operation contracts: schema,
    steps naming existing handlers, operations and compensations, events in the catalog.
    Lists every problem; exits 2 if there is one.

    Example: onex contracts validate contracts/ --json
    """
    from workers.validate import validate_contracts

    report = validate_contracts(settings_or_exit(), paths or [])
    if as_json:
        typer.echo(
            json.dumps(
                {
                    "ok": report.ok,
                    "handlers": sorted(report.handlers),
                    "operations": sorted(report.operations),
                    "problems": [problem.__dict__ for problem in report.problems],
                },
                indent=2,
            )
        )
    else:
        for problem in report.problems:
            err_console.print(
                problem.message
                if problem.code in problem.message
                else f"{problem.code} {problem.subject}: {problem.message}",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
        console.print(
            f"{len(report.handlers)} handler contract(s), {len(report.operations)} operation "
            f"contract(s), {len(report.problems)} problem(s)"
        )
    if not report.ok:
        raise typer.Exit(ExitCode.BAD_INPUT)


@contracts_app.command("schema")
def contracts_schema(
    write: Annotated[
        bool, typer.Option("--write", help="Regenerate the files instead of checking them.")
    ] = False,
) -> None:
    """Check (or with --write, regenerate) contracts/schema/*.schema.json from the models.

    Editors use these schemas to validate contract YAML as you type.

    Example: onex contracts schema --write
    """
    from contracts.schemas import stale_schemas, write_schemas

    if write:
        for path in write_schemas():
            console.print(f"wrote {_relative(str(path))}")
        return
    stale = stale_schemas()
    if stale:
        fail(
            ExitCode.BAD_INPUT,
            f"out of date: {', '.join(stale)}; run `onex contracts schema --write`",
        )
    console.print("contract schemas are up to date")


app.command("register-node")(operations_cli.register_node_command)
app.command("deregister-node")(operations_cli.deregister_node_command)
app.command("retry")(operations_cli.retry_command)
app.command("status")(operations_cli.status_command)
app.command("replay")(operations_cli.replay_command)

db_app = typer.Typer(
    help="The registry database.\n\nExample:\n\n  onex db migrate",
    epilog=EPILOG,
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(db_app, name="db")


@db_app.command("migrate")
def db_migrate() -> None:
    """Apply the registry's pending migrations (a no-op when up to date).

    Safe to run from several places at once: runners serialize on an advisory lock. The worker
    also migrates at start.

    Example: onex db migrate
    """
    from activities.migrate import migrate_dsn
    from activities.postgres import resolve_password
    from activities.vault import build_secret_resolver

    settings = settings_or_exit()

    async def run() -> list[str]:
        resolver, _ = await build_secret_resolver(settings)
        password = await resolve_password(settings.postgres, resolver)
        return await migrate_dsn(
            settings.postgres.dsn,
            password=password.get_secret_value() if password else None,
        )

    try:
        applied = asyncio.run(run())
    except Exception as exc:
        fail(ExitCode.UNAVAILABLE, f"migration failed: {sanitize_exception(exc)}")
    console.print(f"applied: {', '.join(applied)}" if applied else "the schema is up to date")


kafka_app = typer.Typer(
    help="The event stream.\n\nExample:\n\n  onex kafka create-topics",
    epilog=EPILOG,
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(kafka_app, name="kafka")


@kafka_app.command("create-topics")
def kafka_create_topics() -> None:
    """Create the topic catalog (12 topics, 3 partitions each, retention per topic).

    Topics that exist are left as they are. `onex dev up` does this for the embedded broker;
    run it once against a real cluster (ONEX_KAFKA__BOOTSTRAP_SERVERS).

    Example: ONEX_KAFKA__BOOTSTRAP_SERVERS=kafka:9092 onex kafka create-topics
    """
    from activities.kafka import client_options
    from activities.kafka_admin import create_topics
    from activities.vault import build_secret_resolver

    settings = settings_or_exit()

    async def create() -> list[str]:
        resolver, _ = await build_secret_resolver(settings)
        options = await client_options(settings.kafka, resolver)
        options.pop("bootstrap_servers", None)
        return await create_topics(
            settings.kafka.bootstrap_servers,
            prefix=settings.kafka.topic_prefix,
            replication_factor=settings.kafka.replication_factor,
            client_options=options,
        )

    try:
        names = asyncio.run(create())
    except Exception as exc:
        fail(ExitCode.UNAVAILABLE, f"cannot create the topics: {sanitize_exception(exc)}")
    console.print(f"{len(names)} topics present", markup=False)


@app.command("worker")
def worker() -> None:
    """Serve activities (and workflows) until SIGTERM or SIGINT, then drain.

    Loads the handler contracts (ONEX_WORKER__CONTRACT_PATHS), initializes each handler
    (connecting its backend), prints which handlers loaded, are disabled (and why) or were
    refused, and polls the task queue ONEX_WORKER__TASK_QUEUE. On SIGTERM it stops polling,
    lets in-flight activities finish within ONEX_WORKER__GRACEFUL_SHUTDOWN_TIMEOUT seconds
    (30 by default), closes its clients and exits 0.

    Example: onex dev up && onex worker
    """
    settings = settings_or_exit()
    try:
        asyncio.run(_serve(settings))
    except ConfigurationError as exc:  # also a refused handler contract
        fail(ExitCode.BAD_INPUT, f"cannot start the worker: {sanitize_text(str(exc))}")
    except (WorkerStartError, InfraError) as exc:  # a backend or the secret store is away
        fail(ExitCode.UNAVAILABLE, f"cannot start the worker: {sanitize_text(str(exc))}")
    except RuntimeError as exc:  # e.g. the Temporal server cannot be reached
        fail(ExitCode.UNAVAILABLE, f"cannot start the worker: {sanitize_exception(exc)}")


async def _serve(settings: OnexSettings) -> None:
    from workers.host import build_host, install_signal_handlers

    host = await build_host(settings, workflows=_workflows())
    try:
        report = await host.start()
    except BaseException:
        await host.shutdown()  # close what the handlers that did start had opened
        raise
    for line in report.lines():
        console.print(line, markup=False, highlight=False, soft_wrap=True)
    console.print(
        f"serving {len(report.activities)} activities on task queue "
        f"{settings.worker.task_queue!r} at {settings.temporal.target}",
        markup=False,
        highlight=False,
    )
    stop = asyncio.Event()
    install_signal_handlers(stop)
    await host.run(stop)


def _workflows() -> list[type]:
    from workflows import WORKFLOWS

    return list(WORKFLOWS)


@app.command("demo")
def demo() -> None:
    """The main job, end to end, on the embedded stack (what `make demo` runs).

    Brings the stack up, runs a worker in this process, registers three nodes through the
    client helpers (and shows a request refused as bad input), deregisters one, prints the
    outcomes with their correlation and workflow ids, checks the events reached Kafka, and
    says where to find it all in the Temporal UI. The stack keeps running afterwards.

    Example: onex demo
    """
    from workers.demo import DemoEventsMissing, run_demo
    from workers.logging import configure_logging

    settings = settings_or_exit()
    configure_logging("warning")  # the demo's own output tells the story
    try:
        rows = asyncio.run(run_demo(settings, console))
    except (StackError, DemoEventsMissing) as exc:
        fail(ExitCode.UNAVAILABLE, str(exc))
    except WorkerStartError as exc:
        fail(ExitCode.UNAVAILABLE, str(exc))
    if any(row.result.status.value != "success" for row in rows):
        raise typer.Exit(ExitCode.PARTIAL)


def main() -> None:
    """Console-script entry point."""
    app()
