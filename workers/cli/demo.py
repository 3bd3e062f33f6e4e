"""``onex demo`` (``make demo``): the main job, end to end, on the embedded stack."""

from __future__ import annotations

import asyncio

import typer

from workers.cli.common import ExitCode, console, fail, settings_or_exit
from workers.devstack import StackError
from workers.host import WorkerStartError


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
