"""The Consul handler: the service catalog (SPEC §5), through python-consul2's ``consul.aio``.

Registrations (one per node, with the local agent)::

    ID       onex-<node_type>-<node_id>
    Name     onex-<node_type>
    Tags     "onex", "node-type:<node_type>", then the request's tags (no duplicates)
    Meta     node_id, node_version, correlation_id (when known), health_url, onex_writer (the
             run that registered it: ``<workflow id>/<run id>``, see activities/writer.py)
    Check    HTTP GET on the node's health endpoint, with ConsulSettings' check_interval,
             check_timeout and deregister_critical_after

``health_url`` is kept in the service's meta because the agent's service listing does not return
check definitions: it is what lets a compensation put a replaced registration back with its
health check.

Idempotency rules (every operation may run again: Temporal retries it after a lost reply):

* ``register_service`` reads the registration the ID has now, then registers (Consul replaces a
  registration with the same ID); the one read is returned as ``previous`` for the
  compensation. A repeat succeeds (and registers again).
* Pre-images: the writer (the workflow id and run id of the activity's workflow) names one
  run's operation; a reused correlation id or a reset workflow is another writer. Before it
  writes, the first attempt of ``register_service`` or ``deregister_service`` stores the
  registration it read in KV, at ``onex/preimages/<service_id>/<writer>/<operation>`` (JSON,
  ``{"state": "absent"}`` when there was none), with a create-only check-and-set (``cas=0``).
  When that key exists already, the call is a repeat: it reports the stored registration as
  ``previous`` rather than the one its own first attempt wrote, so the compensation restores
  the true pre-image. Keys are read back with their indexes: one rewritten since it was
  created (ModifyIndex past CreateIndex) is not trusted. Without a writer nothing is stored.
  The keys are never deleted here (remove them by prefix when no workflow can still
  compensate); the ACL token needs write access to the ``onex/preimages/`` prefix.
* Compensations are fenced (an undo never destroys newer work). ``undo_register_service``
  changes the service only while its Meta writer is still this run's: then it deregisters
  (no previous registration) or registers the previous definition again (``restored``). A
  service already as it was before is ``unchanged``; one another run registered (or removed)
  since is left alone, ``superseded``, with a reason naming that run's workflow id.
  Registrations made before writers were recorded are fenced on their correlation id.
* ``deregister_service`` of a service already gone is a success with ``existed=False``; a
  repeat reports the stored pre-image, so ``existed`` stays True after a lost reply.
* ``undo_deregister_service`` registers the removed definition again only while the service
  is still absent, as the deregistration left it; else ``superseded`` (or ``unchanged`` when it
  is already the removed definition).
* An ambiguous compensation (the step failed in a way that may have reached the agent; no
  forward result) uses the pre-image this writer stored: none means the step never got as far
  as writing (``unchanged``); one is undone as above. The agent has no check-and-set for
  services: the fence is a read just before the write, so a registration made by another run
  in that moment can still be overwritten.

Each operation makes one attempt; failures propagate as native python-consul2/aiohttp/OS errors
for the activity boundary to classify. ``consul.aio`` has no per-call timeout, so the Consul
calls of each attempt are bounded here by ``ConsulSettings.timeout`` (``TimeoutError``). The one
retry inside a call: on ``ACLPermissionDenied`` the token is refreshed from the secret store, the
client rebuilt with it, and the operation tried once more (tokens rotate; the cache may be stale).

python-consul2 0.1.5 quirks handled here: its constructor emits DeprecationWarnings (filtered
while constructing), its ``HTTPClient.__del__`` always emits a ResourceWarning and its
``close()`` fails when no request was made (the default client uses an adapter without them, and
:func:`_close_client` closes any client safely). It also lets the ``CONSUL_HTTP_TOKEN`` variable
override the token it is given: the token resolved here is set on the client explicitly.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import uuid
import warnings
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import consul
import consul.aio
import structlog
from consul import base as consul_base
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from activities.base import (
    HandlerBase,
    HandlerConfig,
    HandlerDescription,
    HandlerResources,
    SecretSource,
    secret_or_setting,
)
from activities.resilience.classify import classify
from activities.resilience.correlation import current_correlation_id
from activities.resilience.refresh import refresh_once
from activities.resilience.sanitize import register_secret
from activities.settings import ConsulSettings
from activities.writer import CONSUL_META_KEY, current_writer, is_ours, meta_writer, writer_workflow
from contracts.errors import ConfigurationError, ErrorContext, InfraDataIntegrityError, Transport
from contracts.registry import (
    CompensationInput,
    DeregisterNodeRequest,
    DeregisterServiceResult,
    RegisterNodeRequest,
    RegisterServiceResult,
    UndoAction,
)

__all__ = [
    "CLIENT_FACTORY",
    "DISABLED_REASON",
    "TOKEN_SECRET",
    "ConsulHandler",
    "KvGetRequest",
    "KvGetResult",
    "KvPutRequest",
    "KvPutResult",
    "ServiceHealthRequest",
    "ServiceHealthResult",
    "ServiceInstance",
    "UndoResult",
]

T = TypeVar("T")
M = TypeVar("M", bound=BaseModel)

TOKEN_SECRET: Final = "consul.token"  # noqa: S105 - a name, not a value
"""The logical secret name of the ACL token."""

CLIENT_FACTORY: Final = "consul.client_factory"
"""``HandlerResources.clients`` key of the client factory: a callable taking ``host``, ``port``,
``scheme``, ``token`` and ``dc`` keywords and returning a ``consul.aio.Consul``, or an async
context manager yielding one (such as ``tests.fakes.consul_agent.consul_client``), which is
exited when the client is discarded."""

DISABLED_REASON: Final = "no Consul address is configured (set ONEX_CONSUL__ADDRESS)"

DEFAULT_PORT: Final = 8500

PREIMAGE_PREFIX: Final = "onex/preimages/"
"""KV prefix of the pre-images: ``<prefix><service_id>/<correlation_id>/<operation>``."""

logger = structlog.get_logger("onex.consul")


# ---------------------------------------------------------------------------------------------
# Requests and results of the operations that contracts/registry.py does not define.


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class UndoResult(_Model):
    """``consul.undo_register_service`` / ``consul.undo_deregister_service``: what was done,
    and why when it was superseded."""

    action: UndoAction = Field(description="deregistered, restored, unchanged, or superseded")
    reason: str | None = Field(
        default=None, description="For superseded: which workflow changed the service since"
    )


class ServiceHealthRequest(_Model):
    service_name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    correlation_id: uuid.UUID | None = None


class ServiceInstance(_Model):
    service_id: str
    address: str
    port: int


class ServiceHealthResult(_Model):
    """The instances of ``service_name`` whose every check passes."""

    service_name: str
    passing: int
    instances: tuple[ServiceInstance, ...] = ()


# Consul rejects a key with a leading slash; python-consul2 asserts it (an AssertionError).
_KV_KEY = Field(min_length=1, max_length=512, pattern=r"^[^/\s][^\s]*$")


class KvGetRequest(_Model):
    key: str = _KV_KEY
    recurse: bool = False
    correlation_id: uuid.UUID | None = None


class KvGetResult(_Model):
    """Values as UTF-8 text; an existing key with an empty value reads as ``""``.

    Without ``recurse``: ``value`` (None when the key is missing). With ``recurse``: ``values``,
    every key under the prefix (None when there is none).
    """

    key: str
    value: str | None = None
    values: dict[str, str] | None = None


class KvPutRequest(_Model):
    key: str = _KV_KEY
    value: str
    correlation_id: uuid.UUID | None = None


class KvPutResult(_Model):
    key: str
    ok: bool = Field(description="False when Consul did not apply the write")


# ---------------------------------------------------------------------------------------------
# python-consul2's asyncio client, without its always-warning __del__ and failing close().


class _HTTPClient(consul.aio.HTTPClient):  # type: ignore[misc]
    """``consul.aio.HTTPClient``; each request already opens and closes its own session."""

    def __del__(self) -> None:
        pass

    async def close(self) -> None:
        session = self._session
        if session is not None and not session.closed:
            await session.close()


class _Consul(consul.aio.Consul):  # type: ignore[misc]
    def http_connect(
        self, host: str, port: int, scheme: str, verify: bool = True, cert: Any = None
    ) -> _HTTPClient:
        return _HTTPClient(host, port, scheme, loop=self._loop, verify=verify, cert=cert)


def _default_factory(**options: Any) -> consul.aio.Consul:
    return _Consul(**options)


class _Client:
    """A client in use, and how to discard it."""

    __slots__ = ("api", "close")

    def __init__(self, api: Any, close: Callable[[], Awaitable[Any]] | None) -> None:
        self.api = api
        self.close = close


class ConsulHandler(HandlerBase):
    """The ``consul`` handler: service registrations, their health, and KV.

    Disabled (``enabled`` False, every step skipped by the worker) when no address is set.
    Seam for the composition root and tests, in ``resources.clients``: ``consul.client_factory``
    (see :data:`CLIENT_FACTORY`).
    """

    transport = Transport.CONSUL
    settings_type = ConsulSettings
    secret_names = (TOKEN_SECRET,)

    def __init__(self, resources: HandlerResources[ConsulSettings]) -> None:
        super().__init__(resources)
        self._settings = resources.settings
        self._factory: Callable[..., Any] = resources.clients.get(CLIENT_FACTORY, _default_factory)
        self._client: _Client | None = None
        # Serializes creating and replacing the client (never held while a request runs).
        self._client_lock = asyncio.Lock()
        # Bumped by every rebuild, so that concurrent refusals lead to one rebuild, not many.
        self._client_generation = 0
        self._acl_origin = "none"
        self._datacenters: list[str] = []

    @property
    def datacenter(self) -> str:
        """The datacenter this handler works in (its breaker and log key)."""
        return self._settings.datacenter or "default"

    @property
    def target(self) -> str:
        return f"consul-{self.datacenter}"

    @property
    def enabled(self) -> bool:
        return self._settings.address is not None

    @property
    def disabled_reason(self) -> str | None:
        return None if self.enabled else DISABLED_REASON

    def breaker_key(self, *args: Any, **kwargs: Any) -> str:
        """One circuit breaker per datacenter, whatever the call."""
        return self.datacenter

    # -- lifecycle ---------------------------------------------------------------------------

    async def initialize(self, config: HandlerConfig) -> None:
        """Build the client and check the agent answers (and knows the configured datacenter)."""
        await super().initialize(config)
        if not self.enabled:
            return
        try:
            client = await self._current_client()
            try:
                async with asyncio.timeout(self._settings.timeout):
                    datacenters = await client.api.catalog.datacenters()
            except Exception as exc:
                raise classify(exc, self._context("initialize")) from exc
            self._datacenters = [str(name) for name in datacenters or []]
            wanted = self._settings.datacenter
            if wanted is not None and wanted not in self._datacenters:
                raise ConfigurationError(
                    f"Consul datacenter {wanted!r} is unknown to the agent; available: "
                    f"{', '.join(self._datacenters) or 'none'}",
                    context=self._context("initialize"),
                )
        except BaseException:
            await self.shutdown(self._settings.timeout)
            raise
        logger.info("consul_ready", target=self.target, datacenters=self._datacenters)

    async def shutdown(self, timeout_seconds: float = 30.0) -> None:
        """Discard the client (closing what it holds) within the timeout."""
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_close_client(client), timeout_seconds)

    def describe(self) -> HandlerDescription:
        settings = self._settings
        details: dict[str, Any] = {
            "address": settings.address,
            "scheme": settings.scheme,
            "datacenter": self.datacenter,
            "datacenters": list(self._datacenters),
            "timeout": settings.timeout,
            "check_interval": settings.check_interval,
            "check_timeout": settings.check_timeout,
            "deregister_critical_after": settings.deregister_critical_after,
            "acl_origin": self._acl_origin,
            "initialized": self._client is not None,
            "client_version": "python-consul2 " + getattr(consul, "__version__", "?"),
        }
        return super().describe().model_copy(update={"details": details})

    # -- operations (one attempt each) -------------------------------------------------------

    async def register_service(self, request: RegisterNodeRequest) -> RegisterServiceResult:
        """Register the node (replacing any registration of its ID), returning the one before."""
        writer = current_writer(request.correlation_id)
        definition = self._definition(request, writer)

        async def work(api: Any) -> RegisterServiceResult:
            current = await _read_service(api, request.consul_service_id, self._check)
            previous = await self._preimage(
                api, request.consul_service_id, writer, "register_service", current
            )
            await _register(api, definition)
            return RegisterServiceResult(
                service_id=request.consul_service_id,
                service_name=request.consul_service_name,
                previous=previous,
            )

        return await self._run(work)

    async def undo_register_service(self, compensation: CompensationInput) -> UndoResult:
        """Undo ``register_service``, fenced: remove the service, or put back what it replaced,
        only while the service is still this run's registration (else ``superseded``)."""
        writer = current_writer(compensation.correlation_id)

        async def work(api: Any) -> UndoResult:
            if compensation.ambiguous:
                service_id = _service_id(compensation.request)
                stored = await self._stored(api, service_id, writer, "register_service")
                if stored is None:
                    return UndoResult(action=UndoAction.UNCHANGED)  # it never got this far
                previous = stored.definition
            else:
                forward = self._forward(
                    compensation, RegisterServiceResult, "undo_register_service"
                )
                service_id, previous = forward.service_id, forward.previous
            current = await _read_service(api, service_id, self._check)
            if _same_service(current, previous):
                return UndoResult(action=UndoAction.UNCHANGED)
            if not _registered_by(current, writer, compensation.correlation_id):
                return self._superseded(service_id, current)
            if previous is None:
                removed = await _deregister(api, service_id)
                return UndoResult(
                    action=UndoAction.DEREGISTERED if removed else UndoAction.UNCHANGED
                )
            await _register(api, previous)
            return UndoResult(action=UndoAction.RESTORED)

        return await self._run(work)

    async def deregister_service(self, request: DeregisterNodeRequest) -> DeregisterServiceResult:
        """Remove the node's service; one already gone is a success with ``existed=False``."""
        service_id = request.consul_service_id
        writer = current_writer(request.correlation_id)

        async def work(api: Any) -> DeregisterServiceResult:
            current = await _read_service(api, service_id, self._check)
            previous = await self._preimage(api, service_id, writer, "deregister_service", current)
            removed = await _deregister(api, service_id)
            return DeregisterServiceResult(
                service_id=service_id, existed=removed or previous is not None, previous=previous
            )

        return await self._run(work)

    async def undo_deregister_service(self, compensation: CompensationInput) -> UndoResult:
        """Undo ``deregister_service``, fenced: register the removed definition again only while
        the service is still absent, as the deregistration left it (else ``superseded``)."""
        writer = current_writer(compensation.correlation_id)

        async def work(api: Any) -> UndoResult:
            if compensation.ambiguous:
                service_id = _service_id(compensation.request)
                stored = await self._stored(api, service_id, writer, "deregister_service")
                previous = None if stored is None else stored.definition
            else:
                forward = self._forward(
                    compensation, DeregisterServiceResult, "undo_deregister_service"
                )
                service_id, previous = forward.service_id, forward.previous
            if previous is None:
                return UndoResult(action=UndoAction.UNCHANGED)  # nothing was removed
            current = await _read_service(api, service_id, self._check)
            if _same_service(current, previous):
                return UndoResult(action=UndoAction.UNCHANGED)
            if current is not None:
                return self._superseded(service_id, current)
            await _register(api, previous)
            return UndoResult(action=UndoAction.RESTORED)

        return await self._run(work)

    async def service_health(self, request: ServiceHealthRequest) -> ServiceHealthResult:
        """The instances of the service whose checks all pass."""

        async def work(api: Any) -> ServiceHealthResult:
            _, entries = await api.health.service(request.service_name, passing=True)
            instances = tuple(_instance(entry) for entry in entries or [])
            return ServiceHealthResult(
                service_name=request.service_name, passing=len(instances), instances=instances
            )

        return await self._run(work)

    async def kv_get(self, request: KvGetRequest) -> KvGetResult:
        """Read a key (or, with ``recurse``, every key under a prefix) as UTF-8 text."""

        async def work(api: Any) -> KvGetResult:
            _, found = await api.kv.get(request.key, recurse=request.recurse)
            if request.recurse:
                values = None
                if found:
                    values = {item["Key"]: self._text(item, request) for item in found}
                return KvGetResult(key=request.key, values=values)
            value = None if found is None else self._text(found, request)
            return KvGetResult(key=request.key, value=value)

        return await self._run(work)

    async def kv_put(self, request: KvPutRequest) -> KvPutResult:
        """Write a key (UTF-8 text); ``ok`` is Consul's answer."""

        async def work(api: Any) -> KvPutResult:
            ok = await api.kv.put(request.key, request.value.encode())
            return KvPutResult(key=request.key, ok=bool(ok))

        return await self._run(work)

    # -- clients and credentials -------------------------------------------------------------

    async def _run(self, work: Callable[[Any], Awaitable[T]]) -> T:
        """``work(client)`` once; after a refused token, refresh it and try once more."""

        async def attempt() -> T:
            return await self._attempt(await self._current_client(), work)

        secrets = self.resources.secrets
        seen = self._client_generation
        return await refresh_once(
            attempt,
            refused=consul_base.ACLPermissionDenied,
            refresh=None
            if secrets is None
            else functools.partial(self._replace_client, seen, secrets),
            event="consul_token_refused",
            target=self.target,
            datacenter=self.datacenter,
            action="refresh token, rebuild client, retry once",
        )

    async def _attempt(self, client: _Client, work: Callable[[Any], Awaitable[T]]) -> T:
        # consul.aio has no timeout of its own: bound the attempt's calls together.
        async with asyncio.timeout(self._settings.timeout):
            return await work(client.api)

    async def _current_client(self) -> _Client:
        if self._client is None:
            async with self._client_lock:
                if self._client is None:
                    self._client = await self._create_client()
        return self._client

    async def _replace_client(self, seen_generation: int, secrets: SecretSource) -> None:
        """Build the client again with a freshly resolved token, unless a call that met the
        same refusal already did (the client's generation moved on since ``seen_generation``)."""
        async with self._client_lock:
            if self._client_generation != seen_generation:
                return
            await secrets.refresh(TOKEN_SECRET)
            stale, self._client = self._client, await self._create_client()
            self._client_generation += 1
        if stale is not None:
            await _close_client(stale)

    async def _create_client(self) -> _Client:
        settings = self._settings
        if settings.address is None:
            raise ConfigurationError(DISABLED_REASON, context=self._context("connect"))
        host, port = self._host_port(settings.address)
        token = await self._token()
        secret = None if token is None else token.get_secret_value()
        with warnings.catch_warnings():
            # Every construction warns (legacy ACL API, discovery chain API...), used or not.
            warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"consul\.")
            made = self._factory(
                host=host, port=port, scheme=settings.scheme, token=secret, dc=settings.datacenter
            )
        close: Callable[[], Awaitable[Any]] | None = None
        if hasattr(made, "__aenter__") and hasattr(made, "__aexit__"):
            api = await made.__aenter__()
            close = functools.partial(made.__aexit__, None, None, None)
        else:
            api = made
        # python-consul2 prefers CONSUL_HTTP_TOKEN from the environment over its argument.
        api.token = secret
        return _Client(api, close)

    async def _token(self) -> SecretStr | None:
        """From the secret store when there is one and it knows the name, else the settings."""
        setting = self._settings.token
        token = await secret_or_setting(self.resources.secrets, TOKEN_SECRET, setting)
        if token is None:
            self._acl_origin = "none"
        else:
            self._acl_origin = "settings" if token is setting else "secret store"
        register_secret(token)  # scrubbed from any message that would quote it
        return token

    def _host_port(self, address: str) -> tuple[str, int]:
        """``host:port`` (an IPv6 host in brackets); the port defaults to 8500."""
        host, colon, port = address.rpartition(":")
        if not colon or host.endswith(":"):
            host, port = address, str(DEFAULT_PORT)
        if not host or "/" in address or not port.isdigit() or not 1 <= int(port) <= 65535:
            raise ConfigurationError(
                "ONEX_CONSUL__ADDRESS must be host:port (e.g. 127.0.0.1:8500), without a scheme",
                context=self._context("connect"),
            )
        return host, int(port)

    # -- helpers -----------------------------------------------------------------------------

    async def _preimage(
        self,
        api: Any,
        service_id: str,
        writer: str | None,
        operation: str,
        current: dict[str, Any] | None,
    ) -> dict[str, Any] | None:
        """The registration before the operation: ``current`` on its first attempt, which
        stores it (create-only, ``cas=0``); the stored one on a repeat (same writer: the same
        run). Without a writer nothing is stored and ``current`` is the answer."""
        if writer is None:
            return current
        if await api.kv.put(_preimage_key(service_id, writer, operation), _encode(current), cas=0):
            return current  # the first attempt: what was read now is the pre-image
        stored = await self._stored(api, service_id, writer, operation)
        if stored is None:
            # The key existed a moment ago and was deleted since (by hand): what is there now
            # is the best pre-image left.
            logger.warning("consul_preimage_vanished", target=self.target, service_id=service_id)
            return current
        return stored.definition

    async def _stored(
        self, api: Any, service_id: str, writer: str | None, operation: str
    ) -> _Preimage | None:
        """The pre-image ``writer`` stored for ``operation`` (None if it stored none), read with
        its indexes: a create-only key whose ModifyIndex moved past its CreateIndex was
        rewritten by someone else and is not trusted."""
        if writer is None:
            return None
        key = _preimage_key(service_id, writer, operation)
        _, found = await api.kv.get(key)
        if found is None:
            return None
        if found.get("ModifyIndex") != found.get("CreateIndex"):
            raise InfraDataIntegrityError(
                f"Consul key {key!r} was rewritten after its pre-image was stored; it cannot be "
                "trusted for an undo",
                context=self._context(operation),
            )
        try:
            return _Preimage(_decode_preimage(found.get("Value")), int(found["ModifyIndex"]))
        except ValueError:
            raise ConfigurationError(
                f"Consul key {key!r} does not hold a pre-image written by this handler",
                context=self._context(operation),
            ) from None

    def _superseded(self, service_id: str, current: Mapping[str, Any] | None) -> UndoResult:
        """Leave the service alone: another run changed it after this run's write."""
        if current is None:
            reason = "the service was deregistered since"
        else:
            writer = meta_writer(current.get("Meta") or {})
            reason = f"the service was registered since by {writer_workflow(writer)}"
        logger.info(
            "consul_undo_superseded", target=self.target, service_id=service_id, reason=reason
        )
        return UndoResult(action=UndoAction.SUPERSEDED, reason=reason)

    def _context(self, operation: str, correlation_id: uuid.UUID | None = None) -> ErrorContext:
        return ErrorContext(
            transport=self.transport,
            operation=operation,
            target=self.target,
            correlation_id=correlation_id or current_correlation_id(),
        )

    def _definition(self, request: RegisterNodeRequest, writer: str | None) -> dict[str, Any]:
        """What is registered for the node, in the form :func:`_read_service` returns; the
        writer goes in the Meta, for the compensation's fence."""
        node_type = request.node_type.value
        tags = list(dict.fromkeys(("onex", f"node-type:{node_type}", *request.tags)))
        health_url = str(request.endpoints.health)
        meta = {
            "node_id": str(request.node_id),
            "node_version": request.node_version,
            "health_url": health_url,
        }
        correlation_id = request.correlation_id or current_correlation_id()
        if correlation_id is not None:
            meta["correlation_id"] = str(correlation_id)
        if writer is not None:
            meta[CONSUL_META_KEY] = writer
        return {
            "ID": request.consul_service_id,
            "Name": request.consul_service_name,
            "Address": request.address,
            "Port": request.port,
            "Tags": tags,
            "Meta": meta,
            "Check": self._check(health_url),
        }

    def _check(self, health_url: str) -> dict[str, Any]:
        settings = self._settings
        check: dict[str, Any] = consul.Check.http(
            health_url,
            settings.check_interval,
            timeout=settings.check_timeout,
            deregister=settings.deregister_critical_after,
        )
        return check

    def _forward(self, compensation: CompensationInput, model: type[M], operation: str) -> M:
        try:
            return model.model_validate(compensation.forward_result)
        except ValidationError as exc:
            forward = operation.removeprefix("undo_")
            raise ConfigurationError(
                f"{operation} compensates consul.{forward}: its forward_result must be the "
                f"result of consul.{forward}",
                context=self._context(operation, compensation.correlation_id),
            ) from exc

    def _text(self, item: Mapping[str, Any], request: KvGetRequest) -> str:
        raw = item.get("Value")
        if raw is None:
            return ""
        try:
            return bytes(raw).decode("utf-8")
        except UnicodeDecodeError:
            raise ConfigurationError(
                f"Consul key {item.get('Key', request.key)!r} does not hold UTF-8 text",
                context=self._context("kv_get", request.correlation_id),
            ) from None


# ---------------------------------------------------------------------------------------------
# One function per agent call, shared by the operations above.


async def _read_service(
    api: Any, service_id: str, http_check: Callable[[str], dict[str, Any]]
) -> dict[str, Any] | None:
    """The agent's registration of ``service_id`` as a definition :func:`_register` accepts.

    The agent does not list check definitions: an HTTP check is rebuilt from the ``health_url``
    meta that this handler's registrations carry (a service registered otherwise has none).
    """
    services = await api.agent.services()
    service = (services or {}).get(service_id)
    if service is None:
        return None
    meta = dict(service.get("Meta") or {})
    definition: dict[str, Any] = {
        "ID": service_id,
        "Name": service.get("Service") or service_id,
        "Address": service.get("Address") or None,
        "Port": service.get("Port") or None,
        "Tags": list(service.get("Tags") or []),
        "Meta": meta,
        "Check": http_check(health_url) if (health_url := meta.get("health_url")) else None,
    }
    if service.get("EnableTagOverride"):
        definition["EnableTagOverride"] = True
    return definition


async def _register(api: Any, definition: Mapping[str, Any]) -> bool:
    registered: bool = await api.agent.service.register(
        definition["Name"],
        service_id=definition["ID"],
        address=definition.get("Address"),
        port=definition.get("Port"),
        tags=list(definition.get("Tags") or []),
        meta=dict(definition.get("Meta") or {}),
        check=definition.get("Check"),
        enable_tag_override=bool(definition.get("EnableTagOverride", False)),
    )
    return registered


async def _deregister(api: Any, service_id: str) -> bool:
    """True if it was removed; False if the agent did not know it (404: already gone)."""
    removed: bool = await api.agent.service.deregister(service_id)
    return removed


@dataclass(frozen=True, slots=True)
class _Preimage:
    """A stored pre-image: ``definition`` is None when there was no registration."""

    definition: dict[str, Any] | None
    modify_index: int


def _preimage_key(service_id: str, writer: str, operation: str) -> str:
    return f"{PREIMAGE_PREFIX}{service_id}/{writer}/{operation}"


def _service_id(request: Mapping[str, Any]) -> str:
    """The service id of a register or deregister request (as the workflow hands it over)."""
    return f"onex-{request['node_type']}-{request['node_id']}"


# What identifies a registration's content (the check is rebuilt from Meta's health_url).
_COMPARED = ("ID", "Name", "Address", "Port", "Tags", "Meta", "EnableTagOverride")


def _same_service(current: Mapping[str, Any] | None, previous: Mapping[str, Any] | None) -> bool:
    """No registration either way, or the same registration."""
    if current is None or previous is None:
        return current is previous
    return all(current.get(key) == previous.get(key) for key in _COMPARED)


def _registered_by(
    current: Mapping[str, Any] | None, writer: str | None, correlation_id: uuid.UUID | None
) -> bool:
    """Whether the service as it is now is ``writer``'s registration (see activities.writer)."""
    if current is None:
        return writer is None
    meta = current.get("Meta") or {}
    return is_ours(meta_writer(meta), meta.get("correlation_id"), writer, correlation_id)


def _encode(definition: Mapping[str, Any] | None) -> bytes:
    """A pre-image as stored in KV: the definition, or the sentinel for "no registration"."""
    if definition is None:
        return json.dumps({"state": "absent"}).encode()
    return json.dumps({"state": "present", "definition": definition}).encode()


def _decode_preimage(raw: bytes | None) -> dict[str, Any] | None:
    """The definition stored by :func:`_encode` (None for absent); ValueError if the
    value is not one."""
    try:
        stored = json.loads(bytes(raw or b"").decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise ValueError("not a pre-image") from None
    if not isinstance(stored, dict):
        raise ValueError("not a pre-image")
    if stored.get("state") == "absent":
        return None
    definition = stored.get("definition")
    if stored.get("state") != "present" or not isinstance(definition, dict):
        raise ValueError("not a pre-image")
    return definition


def _instance(entry: Mapping[str, Any]) -> ServiceInstance:
    service = entry.get("Service") or {}
    node = entry.get("Node") or {}
    return ServiceInstance(
        service_id=str(service.get("ID", "")),
        address=str(service.get("Address") or node.get("Address") or ""),
        port=int(service.get("Port") or 0),
    )


async def _close_client(client: _Client) -> None:
    """Discard a client: exit its context manager, or close its HTTP session if one is open."""
    try:
        if client.close is not None:
            await client.close()
            return
        http = getattr(client.api, "http", None)
        session = getattr(http, "_session", None)
        if session is not None and not session.closed:
            await session.close()
    except Exception as exc:  # closing must never fail a shutdown or a refresh
        logger.debug("consul_client_close_failed", error_type=type(exc).__name__)
