"""What a handler plugin is, and what the worker gives it.

A handler is a class named by a contract (``contracts/handlers/<name>/handler_contract.yaml``).
The worker constructs it with :class:`HandlerResources` (nothing connects at import or
construction time), awaits :meth:`Handler.initialize`, and registers one Temporal activity per
operation of its contract, named ``<handler>.<operation>``, whose implementation is the
handler's method of the same name behind the activity boundary. On shutdown it awaits
:meth:`Handler.shutdown`.

A handler class says what it needs, and the worker hands it exactly that: ``settings_type``
names its section of the settings (:mod:`activities.settings`; the handler sees no other
section) and ``secret_names`` the logical secrets it may resolve (any other name is refused).
What it runs beside its activities it declares through hooks the worker calls once every
handler is initialized: :meth:`HandlerBase.offers` (what it lends to the other handlers, by
name), :meth:`HandlerBase.background_services` (named services, supervised by the worker) and
:meth:`HandlerBase.breaker_listeners` (hearing every circuit breaker's transitions).

An operation method takes one pydantic model and returns one (the activity's input and result);
a compensation operation takes :class:`~contracts.registry.CompensationInput`. Operations make one
attempt and raise on failure: the boundary classifies, sanitizes and Temporal retries.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Collection, Coroutine, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Generic, Protocol, TypeVar, runtime_checkable

from pydantic import BaseModel, ConfigDict, SecretStr

from activities.resilience.breaker import BreakerRegistry, Listener
from activities.resilience.sanitize import register_secret
from contracts.errors import ConfigurationError, ErrorContext, Transport
from contracts.resilience import ResiliencePolicy

S = TypeVar("S")

BackgroundService = Callable[[asyncio.Event], Coroutine[Any, Any, None]]
"""A service the worker runs until the event is set (restarted if it fails or returns)."""


class HandlerDescription(BaseModel):
    """What ``onex worker`` reports about a handler: never a credential."""

    model_config = ConfigDict(frozen=True)

    handler_name: str
    handler_type: str
    transport: Transport
    target: str
    operations: tuple[str, ...]
    enabled: bool = True
    disabled_reason: str | None = None
    details: dict[str, Any] = {}


class SecretSource(Protocol):
    """Resolves logical secret names (``database.postgres.password``) to values."""

    async def get_secret(self, name: str, *, required: bool = True) -> Any: ...

    async def refresh(self, name: str) -> None: ...


class ScopedSecrets:
    """A secret source that resolves only the names one handler declared (``secret_names``)."""

    def __init__(self, source: SecretSource, names: Collection[str], *, owner: str) -> None:
        self._source = source
        self._names = frozenset(names)
        self._owner = owner

    @property
    def names(self) -> frozenset[str]:
        return self._names

    async def get_secret(self, name: str, *, required: bool = True) -> Any:
        self._check(name)
        return await self._source.get_secret(name, required=required)

    async def refresh(self, name: str) -> None:
        self._check(name)
        await self._source.refresh(name)

    def _check(self, name: str) -> None:
        if name not in self._names:
            raise ConfigurationError(
                f"handler {self._owner} asked for secret {name}, which it does not declare: "
                "add the name to its class's secret_names",
                context=ErrorContext(
                    transport=Transport.RUNTIME, operation="get_secret", target=self._owner
                ),
            )


async def secret_or_setting(
    secrets: SecretSource | None, name: str, setting: SecretStr | None
) -> SecretStr | None:
    """The secret ``name`` from the store when there is one and it knows the name, else
    ``setting`` (returned as it is, so a caller can tell where the value came from).

    A value from the store is registered with the sanitizer, which scrubs it from any message.
    """
    value = None if secrets is None else await secrets.get_secret(name, required=False)
    if value is None:
        return setting
    secret = value if isinstance(value, SecretStr) else SecretStr(str(value))
    register_secret(secret)
    return secret


@dataclass(kw_only=True)
class HandlerResources(Generic[S]):
    """What one handler may use: its own settings section, its own secrets, shared breakers."""

    settings: S
    breakers: BreakerRegistry
    # Resolves only the handler's ``secret_names`` when the worker built it.
    secrets: SecretSource | None = None
    # Shared clients keyed by name (e.g. "kafka.producer"), created by the composition root.
    clients: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Handler(Protocol):
    """The members every handler class has (checked by the loader before it is used)."""

    @property
    def handler_type(self) -> str: ...

    async def initialize(self, config: HandlerConfig) -> None: ...

    async def shutdown(self, timeout_seconds: float = 30.0) -> None: ...

    async def execute(self, operation: str, request: Any) -> Any: ...

    def describe(self) -> HandlerDescription: ...


@dataclass(frozen=True, kw_only=True)
class HandlerConfig:
    """What the contract says about this handler, resolved against the transport's defaults."""

    handler_name: str
    transport: Transport
    operations: tuple[str, ...]
    policy: ResiliencePolicy
    options: Mapping[str, Any] = field(default_factory=dict)


class HandlerBase:
    """Shared behaviour: the lifecycle no-ops, ``execute`` by name, ``describe``, the hooks."""

    handler_type = "effect"
    transport: Transport = Transport.RUNTIME
    settings_type: ClassVar[type[BaseModel] | None] = None
    """The settings section this handler is given as ``resources.settings`` (None: none)."""
    secret_names: ClassVar[tuple[str, ...]] = ()
    """The logical secrets this handler may resolve through ``resources.secrets``."""

    def __init__(self, resources: HandlerResources[Any]) -> None:
        self.resources = resources
        self.config: HandlerConfig | None = None

    @property
    def handler_name(self) -> str:
        return self.config.handler_name if self.config else type(self).__name__

    @property
    def target(self) -> str:
        """The logical name of the dependency, shown in errors and logs (never a DSN)."""
        return self.transport.value

    @property
    def enabled(self) -> bool:
        return True

    @property
    def disabled_reason(self) -> str | None:
        return None

    async def initialize(self, config: HandlerConfig) -> None:
        self.config = config

    async def shutdown(self, timeout_seconds: float = 30.0) -> None:
        return None

    def operation(self, name: str) -> Callable[[Any], Awaitable[Any]]:
        """The method implementing operation ``name``."""
        method = getattr(self, name, None)
        if name.startswith("_") or not callable(method):
            raise AttributeError(f"{type(self).__name__} has no operation {name!r}")
        return method  # type: ignore[no-any-return]

    async def execute(self, operation: str, request: Any) -> Any:
        return await self.operation(operation)(request)

    def offers(self) -> Mapping[str, object]:
        """What this handler lends to the other handlers of the worker, by name."""
        return {}

    def background_services(self, offered: Mapping[str, object]) -> Mapping[str, BackgroundService]:
        """Services the worker runs while this handler serves, by the name the worker reports;
        ``offered`` is what the other handlers lend (their :meth:`offers`)."""
        return {}

    def breaker_listeners(self) -> Sequence[Listener]:
        """Listeners the worker adds to its circuit breakers (hearing every transition)."""
        return ()

    def describe(self) -> HandlerDescription:
        return HandlerDescription(
            handler_name=self.handler_name,
            handler_type=self.handler_type,
            transport=self.transport,
            target=self.target,
            operations=self.config.operations if self.config else (),
            enabled=self.enabled,
            disabled_reason=self.disabled_reason,
        )
