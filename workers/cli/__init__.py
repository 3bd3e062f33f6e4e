"""The ``onex`` command line: one module per command group, assembled here.

Exit codes (the same for every command):

* 0 — done;
* 2 — bad input: a wrong option, argument or setting (the message says which and how to fix it);
* 3 — needs you: partial (retry the failed backends) or compensation paused (resume or
  abandon the undo);
* 4 — failed or compensated;
* 5 — not found;
* 6 — a service is unavailable (could not be started, reached or stopped);
* 1 — a bug (the message says so), 130 — interrupted (Ctrl-C).

What a command raises decides its code, in one table: :mod:`workers.cli.exit_codes`.
"""

from __future__ import annotations

import typer

from workers.cli import operations
from workers.cli.admin import db_app, kafka_app
from workers.cli.breakers import breakers_app
from workers.cli.codec import codec_server
from workers.cli.common import EPILOG
from workers.cli.contracts import contracts_app
from workers.cli.demo import demo
from workers.cli.dev import dev_app
from workers.cli.fleet import ingress, nodes_app, schedules_app, simulate_nodes
from workers.cli.replay import replay_command
from workers.cli.worker import worker

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
app.add_typer(dev_app, name="dev")
app.add_typer(contracts_app, name="contracts")
app.command("register-node")(operations.register_node_command)
app.command("deregister-node")(operations.deregister_node_command)
app.command("retry")(operations.retry_command)
app.command("compensate")(operations.compensate_command)
app.command("status")(operations.status_command)
app.command("replay")(replay_command)
app.add_typer(db_app, name="db")
app.add_typer(kafka_app, name="kafka")
app.add_typer(breakers_app, name="breakers")
app.command("worker")(worker)
app.command("ingress")(ingress)
app.add_typer(nodes_app, name="nodes")
app.add_typer(schedules_app, name="schedules")
app.command("simulate-nodes")(simulate_nodes)
app.command("codec-server")(codec_server)
app.command("demo")(demo)


def main() -> None:
    """Console-script entry point."""
    app()
