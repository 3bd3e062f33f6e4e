"""``onex worker``: serve activities and workflows until SIGTERM or SIGINT."""

from __future__ import annotations

import asyncio

from activities.resilience.sanitize import sanitize_exception
from contracts.errors import InfraConnectionError, InfraError
from workers.cli.common import console, run_async, settings_or_exit
from workers.settings import OnexSettings


def worker() -> None:
    """Serve activities (and workflows) until SIGTERM or SIGINT, then drain.

    Loads the handler contracts (ONEX_WORKER__CONTRACT_PATHS), initializes each handler
    (connecting its backend), prints which handlers loaded, are disabled (and why) or were
    refused, and polls the task queue ONEX_WORKER__TASK_QUEUE. On SIGTERM it stops polling,
    lets in-flight activities finish within ONEX_WORKER__GRACEFUL_SHUTDOWN_TIMEOUT seconds
    (30 by default), closes its clients and exits 0. Unless ONEX_INGRESS__ENABLED=false it
    also runs the Kafka ingress (nodes registered from their introspection events, heartbeats
    recorded) and applies the liveness sweep's Schedule, when it serves the registry (the
    postgres handler's contract).

    Example: onex dev up && onex worker
    """
    settings = settings_or_exit(library_logs="live")
    run_async(lambda: _serve(settings), failing="cannot start the worker")


async def _serve(settings: OnexSettings) -> None:
    from workers.host import build_host, install_signal_handlers

    try:
        host = await build_host(settings, workflows=_workflows())
    except InfraError:
        raise
    except RuntimeError as exc:  # the SDK's "Failed client connect"
        raise InfraConnectionError(
            f"cannot reach Temporal at {settings.temporal.target}: {sanitize_exception(exc)}"
        ) from exc
    try:
        report = await host.start()
    except BaseException:
        await host.shutdown()  # close what the handlers that did start had opened
        raise
    if settings.ingress.enabled:
        from workers.ingress import SWEEP_ACTIVITY, attach_ingress

        if SWEEP_ACTIVITY in report.activities:
            await attach_ingress(host, settings)
        else:  # the ingress needs the registry: a worker serving other contracts runs without
            console.print("no Kafka ingress: this worker serves no registry handler (postgres)")
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
