"""``onex demo`` (``make demo``): the main job, end to end, on the embedded stack."""

from __future__ import annotations

import typer

from workers.cli.common import console, run_async, settings_or_exit
from workers.cli.exit_codes import ExitCode


def demo() -> None:
    """The main job, end to end, on the embedded stack (what `make demo` runs).

    Brings the stack up, runs a worker in this process, registers three nodes through the
    client helpers (and shows a request refused as bad input), deregisters one, prints the
    outcomes with their correlation and workflow ids, checks the events reached Kafka, lets
    simulated nodes register themselves through Kafka and heartbeat (one falls silent and is
    marked unhealthy), and says where to find it all in the Temporal UI. The stack keeps
    running afterwards.

    Example: onex demo
    """
    from workers.demo import run_demo
    from workers.logging import configure_logging

    settings = settings_or_exit()
    configure_logging("warning", libraries="on_failure")  # the demo's own output tells the story
    rows = run_async(lambda: run_demo(settings, console))
    if any(row.result.status.value != "success" for row in rows):
        raise typer.Exit(ExitCode.PARTIAL)
