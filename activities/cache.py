"""A read-through cache in Valkey that degrades gracefully, for registry reads (IDX-2).

:class:`ReadThroughCache` wraps a loader (the query that reads PostgreSQL, injected by the
caller) and answers from Valkey while an entry is fresh (``ttl_seconds``, short)::

    fresh entry in Valkey              the entry                     stale=False, from cache
    else the loader answers            its answer (and it is cached) stale=False, from database
    the loader fails as an outage      the entry, however old        stale=True,  from cache
      (connection, timeout, unavailable)   (kept ``keep_seconds``)
      ... and nothing is cached        the loader's error
    Valkey down or slow                the loader, uncached          stale=False, from database

Only an outage falls back to the cache: a refusal (not found, bad input, permissions) is the
database's answer and is raised as it is. PostgreSQL stays the source of truth: a stale answer
says so (:attr:`Cached.stale`, :attr:`Cached.age_seconds`), and writers may :meth:`invalidate`.

Valkey going away costs one bounded command (its ``timeout``); the cache then leaves it alone
for ``retry_valkey_seconds`` and reads go straight to the loader, which is logged once per
outage.
"""

from __future__ import annotations

import json
import time
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

import structlog
from pydantic import TypeAdapter, ValidationError
from valkey.asyncio import Valkey
from valkey.exceptions import ValkeyError

from activities.resilience.classify import classify
from activities.resilience.sanitize import sanitize_exception
from contracts.errors import ErrorContext, Transport
from contracts.fleet import Cached

__all__ = ["Cached", "ReadThroughCache", "is_outage"]

T = TypeVar("T")

logger = structlog.get_logger("onex.cache")

_LOADER_CONTEXT = ErrorContext(
    transport=Transport.DATABASE, operation="read", target="postgresql-primary"
)


def is_outage(exc: Exception) -> bool:
    """Whether a loader's failure means the database is unreachable (not that it refused)."""
    return classify(exc, _LOADER_CONTEXT).transport_failure


class ReadThroughCache(Generic[T]):
    """Reads of one kind (``namespace``: e.g. ``registry.node``) through Valkey.

    ``client`` None (Valkey not configured) makes every read go to the loader. ``adapter``
    turns values to JSON and back (a pydantic ``TypeAdapter`` of the loader's result type).
    """

    def __init__(
        self,
        client: Valkey | None,
        *,
        namespace: str,
        adapter: TypeAdapter[T],
        ttl_seconds: float = 5.0,
        keep_seconds: float = 86_400.0,
        prefix: str = "onex:",
        retry_valkey_seconds: float = 5.0,
        outage: Callable[[Exception], bool] = is_outage,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 0 < ttl_seconds <= keep_seconds:
            raise ValueError("ttl_seconds must be positive and at most keep_seconds")
        self.client = client
        self.namespace = namespace
        self.adapter = adapter
        self.ttl_seconds = ttl_seconds
        self.keep_seconds = keep_seconds
        self.prefix = prefix
        self.retry_valkey_seconds = retry_valkey_seconds
        self._outage = outage
        self._clock = clock
        self._valkey_back_at = 0.0  # clock time before which Valkey is left alone

    def key(self, key: str) -> str:
        return f"{self.prefix}cache:{self.namespace}:{key}"

    async def get(self, key: str, loader: Callable[[], Awaitable[T]]) -> Cached[T]:
        """The value for ``key``: from the cache while fresh, else from ``loader`` (see the
        module doc for what happens when either side is down)."""
        entry = await self._read(key)
        now = self._clock()
        if entry is not None and now - entry[1] < self.ttl_seconds:
            return Cached(entry[0], stale=False, source="cache", age_seconds=now - entry[1])
        try:
            value = await loader()
        except Exception as exc:
            if entry is None or not self._outage(exc):
                raise
            logger.warning(
                "cache_served_stale",
                namespace=self.namespace,
                age_seconds=round(now - entry[1], 3),
                error=sanitize_exception(exc),
            )
            return Cached(entry[0], stale=True, source="cache", age_seconds=now - entry[1])
        await self._write(key, value)
        return Cached(value, stale=False, source="database")

    async def invalidate(self, key: str) -> None:
        """Forget ``key`` (a writer changed it); Valkey being down is not an error."""
        if self._usable():
            try:
                await self._client().delete(self.key(key))
            except (ValkeyError, OSError) as exc:
                self._valkey_down(exc)

    # -- Valkey, never a reason to fail a read ---------------------------------------------

    def _usable(self) -> bool:
        return self.client is not None and self._clock() >= self._valkey_back_at

    def _client(self) -> Valkey:
        if self.client is None:
            raise RuntimeError("no Valkey client")
        return self.client

    async def _read(self, key: str) -> tuple[T, float] | None:
        if not self._usable():
            return None
        try:
            text = await self._client().get(self.key(key))
        except (ValkeyError, OSError) as exc:
            self._valkey_down(exc)
            return None
        self._valkey_back_at = 0.0
        if text is None:
            return None
        try:
            data = json.loads(text)
            return self.adapter.validate_python(data["value"]), float(data["stored_at"])
        except (ValueError, KeyError, TypeError, ValidationError):
            return None  # an entry of another shape (an older release): read through

    async def _write(self, key: str, value: T) -> None:
        if not self._usable():
            return
        entry = {"stored_at": self._clock(), "value": self.adapter.dump_python(value, mode="json")}
        try:
            await self._client().set(
                self.key(key), json.dumps(entry), px=int(self.keep_seconds * 1000)
            )
        except (ValkeyError, OSError) as exc:
            self._valkey_down(exc)

    def _valkey_down(self, exc: BaseException) -> None:
        if self._valkey_back_at == 0.0:
            logger.warning(
                "cache_bypassed",
                namespace=self.namespace,
                error=sanitize_exception(exc),
                detail="Valkey is unreachable: reads go straight to the database",
            )
        self._valkey_back_at = self._clock() + self.retry_valkey_seconds
