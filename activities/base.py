"""What a handler plugin is, and what the worker gives it.

A handler is a class named by a contract (``contracts/handlers/<name>/handler_contract.yaml``).
The worker constructs it with :class:`HandlerResources` (nothing connects at import or
construction time), awaits :meth:`Handler.initialize`, and registers one Temporal activity per
operation of its contract, named ``<handler>.<operation>``, whose implementation is the
handler's method of the same name behind the activity boundary. On shutdown it awaits
:meth:`Handler.shutdown`.

An operation method takes one pydantic model and returns one (the activity's input and result);
a compensation operation takes :class:`~contracts.registry.CompensationInput`. Operations make one
attempt and raise on failure: the boundary classifies, sanitizes and Temporal retries.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from pydantic import BaseModel, ConfigDict

from activities.resilience.breaker import BreakerRegistry
from contracts.errors import Transport
from contracts.resilience import ResiliencePolicy
from workers.settings import OnexSettings


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


@dataclass(kw_only=True)
class HandlerResources:
    """Everything a handler may use, built once by the worker's composition root."""

    settings: OnexSettings
    breakers: BreakerRegistry
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
    """Shared behaviour: the lifecycle no-ops, ``execute`` by name, and ``describe``."""

    handler_type = "effect"
    transport: Transport = Transport.RUNTIME

    def __init__(self, resources: HandlerResources) -> None:
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
