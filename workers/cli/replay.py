"""``onex replay``: recorded histories against the current workflow code."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from workers.cli.common import JsonOption, console, fail, run_async, settings_or_exit
from workers.cli.exit_codes import ExitCode
from workers.cli.operations import with_client


def replay_command(
    source: Annotated[
        str | None,
        typer.Argument(help="A history JSON file or a directory of them"),
    ] = None,
    query: Annotated[
        str | None,
        typer.Option(help="Replay the histories of the workflows a visibility query lists"),
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Replay recorded histories against the current workflow code (non-determinism check).

    With ONEX_CODEC__ENABLED, encrypted histories are decrypted with the keys of the secret
    temporal.payload_key; plaintext histories replay either way.

    Examples: onex replay tests/histories/ ;
    onex replay --query "OnexOperation='register_node' AND CloseTime > '2026-01-01T00:00:00Z'"
    """
    from workers.converter import build_data_converter
    from workers.replay import ReplayOutcome, replay_files, replay_query

    if (source is None) == (query is None):
        fail(ExitCode.BAD_INPUT, "give a history file or directory, or --query (one of them)")
    if source is not None:
        path = Path(source)
        if not path.exists():
            fail(ExitCode.NOT_FOUND, f"{source} does not exist")
        settings = settings_or_exit()

        async def replay() -> list[ReplayOutcome]:
            converter = await build_data_converter(settings)
            return await replay_files(path, data_converter=converter)

        outcomes = run_async(replay)
    else:
        settings = settings_or_exit()
        outcomes = with_client(settings, lambda client: replay_query(client, query or ""))
    failed = [outcome for outcome in outcomes if not outcome.ok]
    if as_json:
        typer.echo(json.dumps([outcome.__dict__ for outcome in outcomes], indent=2))
    else:
        for outcome in outcomes:
            mark = "ok    " if outcome.ok else "FAILED"
            console.print(f"{mark} {outcome.name} {outcome.error or ''}", markup=False)
        console.print(f"{len(outcomes)} replayed, {len(failed)} failed")
    if not outcomes:
        raise typer.Exit(ExitCode.NOT_FOUND)
    if failed:
        raise typer.Exit(ExitCode.FAILED)
