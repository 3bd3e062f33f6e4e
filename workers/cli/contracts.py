"""``onex contracts validate | schema``: check contracts and keep their JSON Schemas current."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from workers.cli.common import (
    EPILOG,
    JsonOption,
    console,
    err_console,
    fail,
    relative,
    settings_or_exit,
)
from workers.cli.exit_codes import ExitCode

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
            console.print(f"wrote {relative(str(path))}")
        return
    stale = stale_schemas()
    if stale:
        fail(
            ExitCode.BAD_INPUT,
            f"out of date: {', '.join(stale)}; run `onex contracts schema --write`",
        )
    console.print("contract schemas are up to date")
