"""``onex db migrate`` and ``onex kafka create-topics``: one-off setup of the backends."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import TypeVar

import typer

from activities.resilience.sanitize import sanitize_exception
from contracts.errors import InfraError, InfraUnavailableError
from workers.cli.common import EPILOG, console, run_async, settings_or_exit

T = TypeVar("T")


async def _on_backend(work: Awaitable[T]) -> T:
    """``await work``; what the driver raised (asyncpg, aiokafka, a refused socket) means the
    backend could not be used: exit 6. The project's own errors keep their codes."""
    try:
        return await work
    except InfraError:
        raise
    except Exception as exc:
        raise InfraUnavailableError(sanitize_exception(exc)) from exc


db_app = typer.Typer(
    help="The registry database.\n\nExample:\n\n  onex db migrate",
    epilog=EPILOG,
    no_args_is_help=True,
    rich_markup_mode=None,
)


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

    async def migrate() -> list[str]:
        resolver, _ = await build_secret_resolver(settings)
        password = await resolve_password(settings.postgres, resolver)
        return await _on_backend(
            migrate_dsn(
                settings.postgres.dsn,
                password=password.get_secret_value() if password else None,
            )
        )

    applied = run_async(migrate, failing="migration failed")
    console.print(f"applied: {', '.join(applied)}" if applied else "the schema is up to date")


kafka_app = typer.Typer(
    help="The event stream.\n\nExample:\n\n  onex kafka create-topics",
    epilog=EPILOG,
    no_args_is_help=True,
    rich_markup_mode=None,
)


@kafka_app.command("create-topics")
def kafka_create_topics() -> None:
    """Create the topic catalog (15 topics, 3 partitions each, retention per topic).

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
        return await _on_backend(
            create_topics(
                settings.kafka.bootstrap_servers,
                prefix=settings.kafka.topic_prefix,
                replication_factor=settings.kafka.replication_factor,
                client_options=options,
            )
        )

    names = run_async(create, failing="cannot create the topics")
    console.print(f"{len(names)} topics present", markup=False)
