"""``onex worker``: the composition root.

settings → logging → secret resolver → client (its data converter encrypting when
``ONEX_CODEC__ENABLED``, keys from the resolver) → breakers (shared with the fleet through Valkey
when ``ONEX_VALKEY__ADDRESS`` is set) → handlers from contracts (each
given its own settings section and the secrets it declares, then initialized, which connects its
clients) → one activity per (handler, operation) named ``<handler>.<operation>`` behind the activity
boundary → the Temporal worker (the client's data converter, correlation interceptor) → the
background services the handlers declare (the outbox relay) and the host's own (Vault token
renewal), each supervised: one that fails or returns early is logged and restarted, after 1 s
doubling up to 30 s. The host knows no handler class: what runs beside the activities comes from
the handlers' hooks (:class:`activities.base.HandlerBase`).

On SIGTERM or SIGINT the worker stops polling, lets in-flight activities finish within the
graceful shutdown timeout (30 s by default), then shuts the handlers down, closing their clients.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import structlog
from temporalio import activity
from temporalio.client import Client
from temporalio.runtime import PrometheusConfig, Runtime, TelemetryConfig
from temporalio.worker import PollerBehaviorSimpleMaximum, Worker

from activities.base import (
    BackgroundService,
    HandlerBase,
    HandlerConfig,
    HandlerResources,
    ScopedSecrets,
    SecretSource,
)
from activities.resilience.boundary import ActivityBoundary
from activities.resilience.breaker import (
    BreakerRegistry,
    MetricsListener,
    log_state_change,
)
from activities.resilience.sanitize import sanitize_exception
from contracts.errors import HandlerLoadError, InfraError, InfraPermanentError, Transport
from contracts.registry import SkippedResult
from workers.loader import LoadedHandler, load_handlers
from workers.settings import OnexSettings, SettingsError

logger = structlog.get_logger("onex.worker")

RESTART_DELAY = 1.0
"""Seconds before a failed background service is restarted the first time (then doubled)."""
RESTART_DELAY_MAX = 30.0
"""The longest wait between two restarts of a background service."""


class WorkerStartError(InfraPermanentError, RuntimeError):
    """A handler could not be initialized; the message is sanitized and says which."""


@dataclass
class HostedHandler:
    loaded: LoadedHandler
    instance: HandlerBase

    @property
    def name(self) -> str:
        return self.loaded.contract.handler_name


@dataclass
class StartupReport:
    """Which handlers serve, which are disabled (and why), which contracts were refused."""

    loaded: list[dict[str, Any]] = field(default_factory=list)
    disabled: list[dict[str, Any]] = field(default_factory=list)
    refused: list[dict[str, str]] = field(default_factory=list)
    activities: list[str] = field(default_factory=list)
    services: list[str] = field(default_factory=list)

    def lines(self) -> list[str]:
        lines = []
        for handler in self.loaded:
            lines.append(
                f"loaded   {handler['handler']:<10} {handler['target']:<22} "
                f"{', '.join(handler['operations'])}"
            )
        for handler in self.disabled:
            lines.append(f"disabled {handler['handler']:<10} {handler['reason']}")
        for refusal in self.refused:
            lines.append(f"refused  {refusal['subject']:<10} {refusal['message']}")
        for service in self.services:
            lines.append(f"running  {service}")
        return lines


class WorkerHost:
    """Builds and runs one worker process from settings and contracts."""

    def __init__(
        self,
        settings: OnexSettings,
        client: Client,
        *,
        secrets: SecretSource | None = None,
        workflows: Sequence[type] = (),
        clients: dict[str, Any] | None = None,
    ) -> None:
        self.settings = settings
        self.client = client
        listeners: list[Callable[[Any], None]] = [log_state_change]
        runtime = client.service_client.config.runtime or Runtime.default()
        listeners.append(MetricsListener(runtime.metric_meter))
        self._meter = runtime.metric_meter
        self.breakers = BreakerRegistry(listeners=listeners)
        self.secrets = secrets
        # Shared clients keyed by name (e.g. "kafka.publisher"): seams for tests and embedders.
        self.clients = clients or {}
        self.workflows = list(workflows)
        self.handlers: list[HostedHandler] = []
        self.report = StartupReport()
        self.worker: Worker | None = None
        self._background: list[asyncio.Task[None]] = []
        # The host's own services (Vault token renewal); the handlers' are added at start.
        self.background_services: list[BackgroundService] = []
        self._named_services: list[tuple[str, BackgroundService]] = []
        self.closers: list[Callable[[], object]] = []
        self._stop_background = asyncio.Event()
        # A background service that fails or returns early is restarted after this delay,
        # doubled after each restart up to the maximum (reset once a run lasted that long).
        self.restart_delay = RESTART_DELAY
        self.restart_delay_max = RESTART_DELAY_MAX
        self.restarts: dict[str, int] = {}
        self.fleet: Any = None  # the FleetBreakers when Valkey is configured

    async def start(self) -> StartupReport:
        """Load and initialize the handlers and build the Temporal worker (not yet polling)."""
        worker_settings = self.settings.worker
        load = load_handlers(
            worker_settings.contract_paths, allowed_namespaces=worker_settings.allowed_namespaces
        )
        self.report.refused = [
            {"code": e.loader_code, "subject": e.context.target, "message": e.message}
            for e in load.refused
        ]
        await self._share_breakers()
        activities: dict[str, Callable[..., Any]] = {}
        for loaded in load.loaded:
            hosted = await self._initialize(loaded)
            self.handlers.append(hosted)
            activities.update(self._activities_of(hosted))
        self.report.activities = sorted(activities)
        if not activities and not self.workflows:
            raise WorkerStartError("no handler loaded and no workflow to serve: nothing to do")
        self._run_hooks()
        self.worker = Worker(
            self.client,
            task_queue=worker_settings.task_queue,
            workflows=self.workflows,
            activities=list(activities.values()),
            identity=worker_settings.identity,
            max_concurrent_activities=worker_settings.max_concurrent_activities,
            max_concurrent_workflow_tasks=worker_settings.max_concurrent_workflow_tasks,
            max_concurrent_local_activities=worker_settings.max_concurrent_local_activities,
            workflow_task_poller_behavior=PollerBehaviorSimpleMaximum(
                worker_settings.workflow_task_pollers
            ),
            # New workflows (a node's first operation, each operation's child) are as common
            # as tasks of cached ones here, so the non-sticky queue gets half the pollers.
            nonsticky_to_sticky_poll_ratio=1.0,
            activity_task_poller_behavior=PollerBehaviorSimpleMaximum(
                worker_settings.activity_task_pollers
            ),
            graceful_shutdown_timeout=timedelta(seconds=worker_settings.graceful_shutdown_timeout),
        )
        for line in self.report.lines():
            logger.info("handler_report", line=line)
        return self.report

    @property
    def worker_id(self) -> str:
        """This process in the fleet: the worker identity, else Temporal's default shape."""
        return self.settings.worker.identity or f"{os.getpid()}@{socket.gethostname()}"

    async def _share_breakers(self) -> None:
        """With Valkey configured, the breakers share their state with the fleet (opt-in)."""
        if not self.settings.valkey.enabled:
            return
        from activities.resilience.fleet import FleetBreakers
        from activities.valkey import connect_valkey

        client = self.clients.get("valkey")
        if client is None:
            client = await connect_valkey(
                self.settings.valkey, self.secrets, client_name="onex-worker"
            )
            self.clients["valkey"] = client
            self.closers.append(client.aclose)
        fleet = FleetBreakers(
            client,
            self.breakers,
            worker_id=self.worker_id,
            prefix=self.settings.valkey.key_prefix,
            meter=self._meter,
        )
        fleet.attach()
        self.fleet = fleet
        name = "breaker fleet state (valkey)"
        self._named_services.append((name, fleet.run))
        self.report.services.append(name)

    async def _initialize(self, loaded: LoadedHandler) -> HostedHandler:
        contract = loaded.contract
        instance = loaded.handler_class(self._resources_for(loaded))
        config = HandlerConfig(
            handler_name=contract.handler_name,
            transport=Transport(contract.transport),
            operations=tuple(contract.operations),
            policy=contract.policy(),
        )
        try:
            await instance.initialize(config)
        except HandlerLoadError:
            raise
        except Exception as exc:
            # Sanitize once: the error tree's messages are written to be shown (and sanitized
            # where they are built); only a foreign exception's text is sanitized here.
            shown = str(exc) if isinstance(exc, InfraError) else sanitize_exception(exc)
            raise WorkerStartError(
                f"handler {contract.handler_name!r} failed to initialize: {shown}"
            ) from None
        hosted = HostedHandler(loaded, instance)
        description = instance.describe()
        if description.enabled:
            self.report.loaded.append(
                {
                    "handler": contract.handler_name,
                    "target": description.target,
                    "operations": list(contract.operations),
                }
            )
        else:
            self.report.disabled.append(
                {"handler": contract.handler_name, "reason": description.disabled_reason or ""}
            )
        return hosted

    def _resources_for(self, loaded: LoadedHandler) -> HandlerResources[Any]:
        """Exactly what the handler class declares: its settings section, its secrets."""
        handler_class = loaded.handler_class
        name = loaded.contract.handler_name
        settings_type = getattr(handler_class, "settings_type", None)
        try:
            section = None if settings_type is None else self.settings.section(settings_type)
        except SettingsError as exc:
            raise WorkerStartError(f"handler {name!r}: {exc}") from None
        names = tuple(getattr(handler_class, "secret_names", ()))
        secrets = None
        if self.secrets is not None and names:
            secrets = ScopedSecrets(self.secrets, names, owner=name)
        return HandlerResources(
            settings=section, breakers=self.breakers, secrets=secrets, clients=self.clients
        )

    def _run_hooks(self) -> None:
        """What the handlers declare beside their activities: breaker listeners, then the
        background services, given what every handler offers the others."""
        offered: dict[str, tuple[str, object]] = {}
        for hosted in self.handlers:
            for key, value in hosted.instance.offers().items():
                if key in offered:
                    raise WorkerStartError(
                        f"handlers {offered[key][0]!r} and {hosted.name!r} both offer {key!r}"
                    )
                offered[key] = (hosted.name, value)
        for hosted in self.handlers:
            for listener in hosted.instance.breaker_listeners():
                self.breakers.add_listener(listener)
            peers = {key: value for key, (owner, value) in offered.items() if owner != hosted.name}
            for name, service in hosted.instance.background_services(peers).items():
                self._named_services.append((name, service))
                self.report.services.append(name)

    def _activities_of(self, hosted: HostedHandler) -> dict[str, Callable[..., Any]]:
        contract = hosted.loaded.contract
        instance = hosted.instance
        boundary = ActivityBoundary(
            transport=Transport(contract.transport),
            target=instance.target,
            policy=contract.policy(),
            breakers=self.breakers,
            breaker_key=getattr(instance, "breaker_key", None),
        )
        definitions = {}
        for operation in contract.operations:
            name = contract.activity_name(operation)
            if instance.enabled:
                implementation = boundary.wrap(operation, instance.operation(operation))
            else:
                implementation = _skipping(instance.operation(operation), instance)
            definitions[name] = activity.defn(name=name)(implementation)
        return definitions

    async def run(self, stop: asyncio.Event) -> None:
        """Poll until ``stop`` is set, then drain and shut down."""
        if self.worker is None:
            await self.start()
        worker = self.worker
        if worker is None:
            raise WorkerStartError("the worker was not built")
        services = [
            *self._named_services,
            *((_service_name(service), service) for service in self.background_services),
        ]
        for name, service in services:
            self._background.append(asyncio.create_task(self._supervise(name, service)))
        try:
            async with worker:
                logger.info(
                    "worker_started",
                    task_queue=self.settings.worker.task_queue,
                    activities=len(self.report.activities),
                    workflows=len(self.workflows),
                )
                await stop.wait()
                logger.info(
                    "worker_draining", timeout=self.settings.worker.graceful_shutdown_timeout
                )
        finally:
            await self.shutdown()

    async def _supervise(self, name: str, service: BackgroundService) -> None:
        """Run ``service`` until the worker stops, restarting it whenever it fails or returns.

        A failure is logged (sanitized) and so is an early return; the restart waits
        ``restart_delay`` seconds, doubled after each restart up to ``restart_delay_max``, and
        back to ``restart_delay`` after a run that lasted at least ``restart_delay_max``.
        """
        stop = self._stop_background
        loop = asyncio.get_running_loop()
        delay = self.restart_delay
        while not stop.is_set():
            started = loop.time()
            failure: Exception | None = None
            try:
                await service(stop)
            except Exception as exc:
                failure = exc
            if stop.is_set():
                if failure is not None:
                    logger.warning(
                        "background_service_failed_on_stop",
                        service=name,
                        error=sanitize_exception(failure),
                    )
                return
            if loop.time() - started >= self.restart_delay_max:
                delay = self.restart_delay  # it ran well for a while: a fresh failure
            if failure is not None:
                logger.error(
                    "background_service_failed",
                    service=name,
                    error=sanitize_exception(failure),
                    restart_in=delay,
                )
            else:
                logger.error("background_service_returned", service=name, restart_in=delay)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            if stop.is_set():
                return
            self.restarts[name] = self.restarts.get(name, 0) + 1
            logger.info("background_service_restarted", service=name, restarts=self.restarts[name])
            delay = min(delay * 2, self.restart_delay_max)

    async def shutdown(self) -> None:
        """Stop background services, then every handler (each within the drain timeout)."""
        self._stop_background.set()
        for task in self._background:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await asyncio.wait_for(task, self.settings.worker.graceful_shutdown_timeout)
        self._background.clear()
        timeout = self.settings.worker.graceful_shutdown_timeout
        for hosted in reversed(self.handlers):
            try:
                await hosted.instance.shutdown(timeout)
            except Exception as exc:
                logger.warning(
                    "handler_shutdown_failed", handler=hosted.name, error=sanitize_exception(exc)
                )
        self.handlers.clear()
        for close in self.closers:
            with contextlib.suppress(Exception):
                outcome = close()
                if asyncio.iscoroutine(outcome):
                    await outcome
        logger.info("worker_stopped")


def _service_name(service: BackgroundService) -> str:
    return getattr(service, "__qualname__", None) or type(service).__name__


def _skipping(
    operation: Callable[..., Awaitable[Any]], instance: HandlerBase
) -> Callable[..., Awaitable[Any]]:
    """An activity for a disabled backend: it reports the step as skipped, with the reason."""

    @functools.wraps(operation)
    async def skipped(*args: Any, **kwargs: Any) -> Any:
        return SkippedResult(reason=instance.disabled_reason or "backend disabled")

    skipped.__annotations__ = {**operation.__annotations__, "return": SkippedResult}
    return skipped


async def build_host(settings: OnexSettings, *, workflows: Sequence[type] = ()) -> WorkerHost:
    """The composition root: secret resolver (and Vault), client, then the host itself."""
    from activities.vault import build_secret_resolver
    from workers.client import connect

    runtime = None
    if settings.worker.metrics_address:
        runtime = Runtime(
            telemetry=TelemetryConfig(
                metrics=PrometheusConfig(bind_address=settings.worker.metrics_address)
            )
        )
    # The resolver first: the client's converter takes its payload keys from it.
    resolver, vault = await build_secret_resolver(settings)
    try:
        client = await connect(settings, runtime=runtime, secrets=resolver)
    except BaseException:
        if vault is not None:
            vault.close()
        raise
    host = WorkerHost(settings, client, secrets=resolver, workflows=workflows)
    if vault is not None:
        host.background_services.append(vault.keep_token_fresh)
        host.report.services.append("vault token renewal")
        host.closers.append(vault.close)
    return host


def install_signal_handlers(stop: asyncio.Event) -> None:
    """SIGTERM and SIGINT ask the worker to drain and stop."""
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
