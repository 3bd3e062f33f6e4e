"""Secrets by logical name (SPEC §5, SECRET-*): the resolver, and the Vault client behind it.

Code never reads a secret from the environment itself: it asks a :class:`SecretResolver` for a
logical name such as ``database.postgres.password`` (lowercase dotted segments). The settings map
each name to its source (``ONEX_SECRETS__SOURCES``)::

    env:VAR              the environment variable VAR
    file:path            a file; a relative path is under secrets_dir and may not leave it
    vault:path#field     a KV v2 secret at settings.vault.kv_mount; without #field, its first value

An unmapped name falls back (when ``env_fallback`` is on) to ``ONEX_SECRET_<NAME_UPPER>``, dots
becoming underscores. Empty values count as missing. Values are cached as ``SecretStr`` for a
time per source (env and file 24 h, Vault 5 min) on an injectable monotonic clock; ``refresh``
drops one name (a handler calls it after the backend refused the cached credential), so the next
read goes to the source again. Every value read is registered with the sanitizer, which then
scrubs it from any message. Errors and log lines name the logical secret and its source kind
(``env``, ``file`` or ``vault``) only: never a value, a file path or a Vault path (a secret's
location tells an attacker where to look). A name mapped in ``ONEX_SECRETS__SOURCES`` that its
source does not have is an error for every caller: the operator said where it is.

Vault is opt-in: enabled when ``settings.vault.address`` is set. Its bootstrap credentials (the
token, or the AppRole role_id and secret_id) come only from the settings, never from Vault
itself. :class:`VaultClient` runs the synchronous ``hvac`` client in a thread, behind the
``vault`` circuit breaker (3 failures, 60 s); failures are classified
(:func:`activities.resilience.classify.classify`) into the error hierarchy. A refused token is
replaced by an AppRole login (when configured) and the call tried once more.
:meth:`VaultClient.keep_token_fresh` is a background task that renews the token
``renew_before`` seconds ahead of its expiry, and logs in again when renewal is refused.
"""

from __future__ import annotations

import asyncio
import functools
import os
import re
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, Literal, Protocol, TypeVar

import hvac
import structlog
from pydantic import BaseModel, ConfigDict, SecretStr

from activities.resilience.breaker import (
    BreakerRegistry,
    CircuitBreaker,
    CircuitOpenError,
    is_transport_failure,
)
from activities.resilience.classify import classify
from activities.resilience.correlation import current_correlation_id
from activities.resilience.refresh import refresh_once
from activities.resilience.sanitize import register_secret
from activities.settings import SecretsSettings, VaultSettings
from contracts.errors import (
    ConfigurationError,
    ErrorContext,
    InfraAuthenticationError,
    InfraConnectionError,
    InfraError,
    InfraTimeoutError,
    InfraUnavailableError,
    SecretResolutionError,
    Transport,
)
from contracts.resilience import default_policy

__all__ = [
    "ENV_FALLBACK_PREFIX",
    "SECRET_NAME",
    "SecretCacheStats",
    "SecretResolver",
    "SecretSourceInfo",
    "SourceType",
    "VaultClient",
    "build_secret_resolver",
]

T = TypeVar("T")
Clock = Callable[[], float]
SourceType = Literal["env", "file", "vault"]

SECRET_NAME: Final = re.compile(r"^[a-z][a-z0-9_]*(?:\.[a-z][a-z0-9_]*)+$")
"""A logical secret name: two or more lowercase dotted segments (``database.postgres.password``)."""

ENV_FALLBACK_PREFIX: Final = "ONEX_SECRET_"
VAULT_TARGET: Final = "vault"
VAULT_BREAKER: Final = "vault"
RESOLVER_TARGET: Final = "secret_resolver"

_NAME_FORM = (
    "lowercase dotted segments of letters, digits and underscores, each starting with a letter, "
    "such as database.postgres.password"
)
_SOURCE_FORMS = "'env:VAR', 'file:path' or 'vault:path#field'"
_ENV_VAR = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

logger = structlog.get_logger("onex.secrets")


# ---------------------------------------------------------------------------------------------
# Vault


class VaultClient:
    """KV v2 reads and token upkeep through ``hvac``, each call in a thread, behind a breaker.

    Authentication: ``settings.token`` when set, otherwise an AppRole login (``role_id`` and
    ``secret_id``) made by :meth:`connect`. With AppRole configured, a token Vault refuses (403:
    revoked or expired) is replaced by a new login, and the refused call is made once more.
    """

    def __init__(
        self,
        settings: VaultSettings,
        *,
        breakers: BreakerRegistry | None = None,
        min_renew_interval: float = 0.5,
        retry_interval: float = 1.0,
    ) -> None:
        if settings.address is None:
            raise ConfigurationError(
                "Vault is not configured: set ONEX_VAULT__ADDRESS to enable it",
                context=_vault_context("connect"),
            )
        if settings.token is None and not self._has_approle(settings):
            raise ConfigurationError(
                "Vault needs a token (ONEX_VAULT__TOKEN) or AppRole credentials "
                "(ONEX_VAULT__ROLE_ID and ONEX_VAULT__SECRET_ID)",
                context=_vault_context("connect"),
            )
        self.settings = settings
        self.min_renew_interval = min_renew_interval
        self.retry_interval = retry_interval
        # An explicit "" keeps hvac from reading VAULT_TOKEN or ~/.vault-token behind our back.
        token = settings.token.get_secret_value() if settings.token is not None else ""
        self._client: Any = hvac.Client(url=settings.address, token=token, timeout=settings.timeout)
        self._breaker = (breakers or BreakerRegistry()).get(
            VAULT_BREAKER, default_policy(Transport.VAULT).circuit_breaker
        )
        self._login_lock = asyncio.Lock()
        # Bumped by every login, so that concurrent refusals lead to one new login, not many.
        self._token_generation = 0
        self.logins = 0
        self.renewals = 0

    @staticmethod
    def _has_approle(settings: VaultSettings) -> bool:
        return bool(settings.role_id) and settings.secret_id is not None

    @property
    def approle_configured(self) -> bool:
        return self._has_approle(self.settings)

    @property
    def breaker(self) -> CircuitBreaker:
        """The ``vault`` circuit breaker (for status reports and tests)."""
        return self._breaker

    # -- authentication ----------------------------------------------------------------------

    async def connect(self) -> float:
        """Log in with AppRole when there is no token, else check the token; returns its TTL.

        What goes wrong here is what a user starting a worker reads, so it says what to do:
        a refused token names the settings to fix, an unreachable Vault its address (which
        the settings guarantee holds no credential) and the setting it comes from.
        """
        try:
            if self.settings.token is None:
                return await self.login()  # a refusal already says what to check
            return await self.token_ttl()
        except InfraAuthenticationError as refused:
            if self.approle_configured:
                raise  # the token was replaced by an AppRole login, and that was refused
            raise InfraAuthenticationError.at(
                VAULT_TARGET,
                "the token (ONEX_VAULT__TOKEN) was refused: it is expired, revoked or unknown; "
                "set a valid token, or AppRole credentials (ONEX_VAULT__ROLE_ID and "
                "ONEX_VAULT__SECRET_ID) to log in with",
                context=refused.context,
            ) from refused.__cause__  # chained to the native exception, as classify() does
        except (InfraConnectionError, InfraTimeoutError) as unreachable:
            what = (
                "timed out" if isinstance(unreachable, InfraTimeoutError) else "connection failed"
            )
            cause = unreachable.__cause__
            native = "" if cause is None else f" ({type(cause).__name__})"
            raise type(unreachable)(
                f"cannot reach {VAULT_TARGET} at {self.settings.address}: {what}{native}; check "
                "ONEX_VAULT__ADDRESS and that Vault is running",
                context=unreachable.context,
            ) from cause

    async def login(self) -> float:
        """An AppRole login; the new token replaces the current one. Returns its TTL (seconds)."""
        role_id, secret_id = self.settings.role_id, self.settings.secret_id
        if not role_id or secret_id is None:
            raise ConfigurationError(
                "Vault AppRole login needs ONEX_VAULT__ROLE_ID and ONEX_VAULT__SECRET_ID",
                context=_vault_context("login"),
            )

        def login() -> Any:
            return self._client.auth.approle.login(
                role_id=role_id, secret_id=secret_id.get_secret_value()
            )

        try:
            response = await self._guarded("login", login)
        # Vault answers 400 to a wrong role or secret ID (403 when a policy forbids the login).
        except (ConfigurationError, InfraAuthenticationError) as refused:
            raise InfraAuthenticationError.at(
                VAULT_TARGET,
                "the AppRole login was refused: check ONEX_VAULT__ROLE_ID and "
                "ONEX_VAULT__SECRET_ID (a secret ID can expire or run out of uses: issue a new "
                "one)",
                context=_vault_context("login"),
            ) from refused
        auth = response.get("auth") or {}
        register_secret(auth.get("client_token"))
        self._token_generation += 1
        self.logins += 1
        lease = float(auth.get("lease_duration") or 0)
        logger.info("vault_login", method="approle", ttl=lease)
        return lease

    async def _relogin(self, seen_generation: int) -> None:
        async with self._login_lock:
            if self._token_generation != seen_generation:
                return  # another call logged in meanwhile
            await self.login()

    # -- token lifetime ----------------------------------------------------------------------

    async def token_ttl(self) -> float:
        """Seconds the current token has left (``lookup-self``); 0 means it never expires."""
        response = await self._call("lookup_token", self._client.auth.token.lookup_self)
        return float((response.get("data") or {}).get("ttl") or 0)

    async def renew_token(self) -> float:
        """Renew the current token (``renew-self``); returns its new lease in seconds."""
        response = await self._call(
            "renew_token", self._client.auth.token.renew_self, relogin=False
        )
        self.renewals += 1
        lease = float((response.get("auth") or {}).get("lease_duration") or 0)
        logger.info("vault_token_renewed", ttl=lease)
        return lease

    def renew_delay(self, ttl: float) -> float:
        """How long to wait before renewing a token with ``ttl`` seconds left.

        ``renew_before`` ahead of expiry, but never sooner than a third of the TTL (a lease
        shorter than ``renew_before`` would otherwise be renewed in a busy loop) nor sooner
        than ``min_renew_interval``.
        """
        return max(ttl - self.settings.renew_before, ttl / 3, self.min_renew_interval)

    async def keep_token_fresh(self, stop: asyncio.Event) -> None:
        """Renew the token ahead of its expiry until ``stop`` is set (a background service).

        Each round: wait until ``renew_before`` seconds before expiry, renew, repeat with the new
        lease. A refused renewal (revoked or expired token, or one that is not renewable) is
        followed by an AppRole login when configured. Other failures (Vault down) are retried
        with a growing delay. A token that never expires needs nothing: the task just waits.
        """
        ttl: float | None = None
        failures = 0
        while not stop.is_set():
            try:
                if ttl is None:
                    ttl = await self.token_ttl()
                if ttl <= 0:
                    logger.info("vault_token_never_expires")
                    await stop.wait()
                    return
                delay = self.renew_delay(ttl)
                logger.debug("vault_token_renewal_scheduled", ttl=ttl, renew_in=round(delay, 3))
                if await _stopped_within(stop, delay):
                    return
                ttl = await self._renew_or_login()
                failures = 0
            except InfraError as error:
                ttl = None
                failures += 1
                retry_in = min(self.retry_interval * 2 ** (failures - 1), 30.0)
                logger.warning(
                    "vault_token_renewal_failed",
                    error_type=error.error_type,
                    failures=failures,
                    retry_in=retry_in,
                )
                if await _stopped_within(stop, retry_in):
                    return

    async def _renew_or_login(self) -> float:
        seen = self._token_generation
        try:
            return await self.renew_token()
        except (InfraAuthenticationError, ConfigurationError) as refused:
            # 403: revoked or expired; 400: not renewable. Only a new login can help.
            if not self.approle_configured:
                raise
            logger.warning(
                "vault_token_renewal_refused",
                error_type=refused.error_type,
                action="approle login",
            )
            async with self._login_lock:
                if self._token_generation != seen:
                    return await self.token_ttl()
                return await self.login()

    # -- KV v2 -------------------------------------------------------------------------------

    async def read(self, path: str, field: str | None = None, *, name: str = "") -> SecretStr:
        """The value of ``field`` (or the first value) of the KV v2 secret at ``path``.

        ``name`` is the logical name shown in errors: a missing secret or field raises
        :class:`SecretResolutionError` naming it, never the path.
        """
        label = name or "<unnamed>"
        mount = self.settings.kv_mount
        location = path.strip("/")

        def read() -> Any:
            return self._client.secrets.kv.v2.read_secret_version(
                path=location, mount_point=mount, raise_on_deleted_version=True
            )

        try:
            response = await self._call("read_secret", read)
        except SecretResolutionError as missing:
            raise SecretResolutionError(
                f"secret not found in Vault: {label}", context=_vault_context("read_secret", name)
            ) from missing
        data = ((response.get("data") or {}).get("data")) or {}
        value = data.get(field) if field is not None else next(iter(data.values()), None)
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise SecretResolutionError(
                f"secret not found in Vault: {label} (no such field, or not a text value)",
                context=_vault_context("read_secret", name),
            )
        secret = SecretStr(str(value))
        register_secret(secret)
        return secret

    def close(self) -> None:
        """Close the HTTP session."""
        self._client.adapter.close()

    # -- calls -------------------------------------------------------------------------------

    async def _call(self, operation: str, request: Callable[[], T], *, relogin: bool = True) -> T:
        """``request`` in a thread behind the breaker; a refused token: log in, try once more."""
        seen = self._token_generation
        return await refresh_once(
            functools.partial(self._guarded, operation, request),
            refused=InfraAuthenticationError,
            refresh=functools.partial(self._relogin, seen)
            if relogin and self.approle_configured
            else None,
            event="vault_token_refused",
            operation=operation,
            action="approle login",
        )

    async def _guarded(self, operation: str, request: Callable[[], T]) -> T:
        context = _vault_context(operation)
        admitted = False
        try:
            # Only transport failures say Vault is unhealthy; a 403 or a 404 is an answer.
            async with self._breaker.guard(is_failure=is_transport_failure):
                admitted = True
                try:
                    return await asyncio.to_thread(request)
                except Exception as exc:
                    raise classify(exc, context) from exc
        except CircuitOpenError as rejected:
            if admitted:
                raise
            logger.warning("vault_circuit_open", operation=operation)
            raise InfraUnavailableError(
                f"{operation} on {VAULT_TARGET} not attempted: its circuit breaker is open",
                context=context,
                retry_after=rejected.retry_after,
            ) from None


def _vault_context(operation: str, secret: str | None = None) -> ErrorContext:
    return ErrorContext(
        transport=Transport.VAULT,
        operation=operation,
        target=VAULT_TARGET,
        correlation_id=current_correlation_id(),
        extra={"secret": secret} if secret else {},
    )


async def _stopped_within(stop: asyncio.Event, seconds: float) -> bool:
    """Wait up to ``seconds`` for ``stop``; True when it was set (a scheduler, not a test sleep)."""
    try:
        await asyncio.wait_for(stop.wait(), timeout=seconds)
    except TimeoutError:
        return False
    return True


# ---------------------------------------------------------------------------------------------
# The resolver


class SecretSourceInfo(BaseModel):
    """Where a logical name is resolved from, masked: never a value or a real path.

    ``expires_at`` is on the resolver's clock (monotonic seconds), None when not cached.
    """

    model_config = ConfigDict(frozen=True)

    name: str
    source_type: SourceType
    masked_path: str
    is_cached: bool
    expires_at: float | None = None


class SecretCacheStats(BaseModel):
    """Cache counters (SECRET-7); ``refreshes`` counts refresh and refresh_all calls."""

    model_config = ConfigDict(frozen=True)

    total_entries: int
    hits: int
    misses: int
    hit_rate: float
    refreshes: int
    expired_evictions: int


@dataclass(frozen=True, slots=True)
class _Source:
    kind: SourceType
    location: str  # the variable, the file path or the Vault path: never shown
    field: str | None = None


@dataclass(frozen=True, slots=True)
class _Entry:
    value: SecretStr
    kind: SourceType
    expires_at: float


class SecretResolver:
    """Logical secret names to ``SecretStr`` values (implements ``activities.base.SecretSource``).

    One instance per worker, no global state. ``clock`` is monotonic seconds (injectable).
    """

    def __init__(
        self,
        settings: SecretsSettings,
        *,
        vault: VaultClient | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        self.settings = settings
        self.vault = vault
        self._clock = clock
        self._secrets_dir = settings.secrets_dir
        self._sources = {name: _parse_source(name, spec) for name, spec in settings.sources.items()}
        self._ttl: dict[SourceType, float] = {
            "env": settings.env_ttl,
            "file": settings.file_ttl,
            "vault": settings.vault_ttl,
        }
        self._cache: dict[str, _Entry] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self._hits = 0
        self._misses = 0
        self._refreshes = 0
        self._expired_evictions = 0

    # -- the SecretSource protocol -----------------------------------------------------------

    async def get_secret(self, name: str, *, required: bool = True) -> SecretStr | None:
        """The value of ``name``: cached, else read from its source.

        Missing (unset, unreadable, outside secrets_dir, not in Vault, Vault disabled):
        :class:`SecretResolutionError`, naming the logical secret and its source kind (env,
        file or vault), never a path or a value. Only a name without a mapping in
        ``ONEX_SECRETS__SOURCES`` may be optional: with ``required=False`` it is None when
        unmapped or not found under the ``ONEX_SECRET_<NAME>`` convention. Vault being down or
        refusing us raises its classified error either way: that is not a missing secret.
        """
        _check_name(name)
        cached = self._cached(name)
        if cached is not None:
            return cached
        lock = self._locks.get(name)
        if lock is None:
            lock = self._locks[name] = asyncio.Lock()
        async with lock:
            cached = self._cached(name)  # a concurrent caller may have fetched it meanwhile
            if cached is not None:
                return cached
            self._misses += 1
            source = self._source_of(name)
            if source is None:
                value, reason = (
                    None,
                    f"secret {name} is not available: no source is configured for it (map it "
                    "in ONEX_SECRETS__SOURCES)",
                )
            else:
                value, reason = await self._fetch(name, source)
                if value is not None:
                    register_secret(value)
                    expires_at = self._clock() + self._ttl[source.kind]
                    self._cache[name] = _Entry(value, source.kind, expires_at)
                    return value
        # A name mapped in the settings is expected where it was mapped: missing there, it is
        # an error even for a caller that could do without it (else the mistake would surface
        # later as a refused or absent credential, far from its cause).
        if required or name in self._sources:
            raise SecretResolutionError(reason, context=_context(name))
        return None

    async def refresh(self, name: str) -> None:
        """Forget the cached value of ``name``: the next read goes to its source."""
        _check_name(name)
        self._refreshes += 1
        dropped = self._cache.pop(name, None) is not None
        logger.info("secret_refreshed", secret=name, was_cached=dropped)

    # -- more --------------------------------------------------------------------------------

    async def refresh_all(self) -> int:
        """Forget every cached value; returns how many were dropped."""
        self._refreshes += 1
        dropped = len(self._cache)
        self._cache.clear()
        logger.info("secrets_refreshed", dropped=dropped)
        return dropped

    async def prefetch(self) -> list[str]:
        """Read every Vault-sourced name now (at start-up); returns the names found.

        A missing secret is logged and skipped (its handler will report it when it needs it);
        Vault being down or refusing us raises.
        """
        found = []
        for name, source in self._sources.items():
            if source.kind != "vault":
                continue
            try:
                await self.get_secret(name)
            except SecretResolutionError:
                logger.warning("secret_prefetch_missing", secret=name)
            else:
                found.append(name)
        logger.info("secrets_prefetched", count=len(found))
        return found

    def list_configured_secrets(self) -> list[str]:
        """The logical names mapped in the settings (names only)."""
        return sorted(self._sources)

    def get_source_info(self, name: str) -> SecretSourceInfo | None:
        """Where ``name`` comes from, masked; None when it has no source."""
        _check_name(name)
        source = self._source_of(name)
        if source is None:
            return None
        entry = self._cache.get(name)
        live = entry is not None and entry.expires_at > self._clock()
        return SecretSourceInfo(
            name=name,
            source_type=source.kind,
            masked_path=self._masked(source),
            is_cached=live,
            expires_at=entry.expires_at if entry is not None and live else None,
        )

    def stats(self) -> SecretCacheStats:
        lookups = self._hits + self._misses
        return SecretCacheStats(
            total_entries=len(self._cache),
            hits=self._hits,
            misses=self._misses,
            hit_rate=self._hits / lookups if lookups else 0.0,
            refreshes=self._refreshes,
            expired_evictions=self._expired_evictions,
        )

    # -- internals ---------------------------------------------------------------------------

    def _cached(self, name: str) -> SecretStr | None:
        entry = self._cache.get(name)
        if entry is None:
            return None
        if entry.expires_at <= self._clock():
            del self._cache[name]
            self._expired_evictions += 1
            return None
        self._hits += 1
        return entry.value

    def _source_of(self, name: str) -> _Source | None:
        source = self._sources.get(name)
        if source is None and self.settings.env_fallback:
            source = _Source("env", ENV_FALLBACK_PREFIX + name.upper().replace(".", "_"))
        return source

    async def _fetch(self, name: str, source: _Source) -> tuple[SecretStr | None, str]:
        """The value, or None and why (a message safe to show: no path, no value)."""
        if source.kind == "env":
            raw = os.environ.get(source.location)
            if name in self._sources:  # the variable is not named: a mapping is not echoed
                why = f"the variable is not set or empty; set it, {_ELSEWHERE}"
            else:  # the convention's variable follows from the name: safe to name
                why = f"set {source.location}, or map the secret in ONEX_SECRETS__SOURCES"
            return _non_empty(raw), _unavailable(name, "env", why)
        if source.kind == "file":
            return await self._read_file(name, source.location)
        if self.vault is None:
            logger.warning("secret_vault_disabled", secret=name)
            return None, _unavailable(
                name, "vault", f"Vault is not configured: set ONEX_VAULT__ADDRESS, {_ELSEWHERE}"
            )
        try:
            value = await self.vault.read(source.location, source.field, name=name)
        except SecretResolutionError:
            logger.warning("secret_not_in_vault", secret=name)
            return None, _unavailable(
                name,
                "vault",
                f"it is not in Vault (no such secret or field); write it there, {_ELSEWHERE}",
            )
        return value, ""

    async def _read_file(self, name: str, location: str) -> tuple[SecretStr | None, str]:
        path = Path(location)
        if not path.is_absolute():
            base = self._secrets_dir.resolve()
            try:
                path = (base / path).resolve()
            except (OSError, RuntimeError):  # a symlink loop
                logger.warning("secret_file_unresolvable", secret=name)
                return None, _unavailable(
                    name,
                    "file",
                    f"the file cannot be resolved (a link loop); fix the link, {_ELSEWHERE}",
                )
            if not path.is_relative_to(base):
                logger.warning("secret_file_outside_secrets_dir", secret=name)
                return None, _unavailable(
                    name,
                    "file",
                    "the file is outside the secrets directory (ONEX_SECRETS__SECRETS_DIR); "
                    f"move it there, {_ELSEWHERE}",
                )
        try:
            text = await asyncio.to_thread(path.read_text, encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            logger.warning("secret_file_unreadable", secret=name, error_type=type(exc).__name__)
            return None, _unavailable(
                name, "file", f"the file is missing or unreadable; create it, {_ELSEWHERE}"
            )
        if text.endswith("\r\n"):
            text = text[:-2]
        elif text.endswith("\n"):
            text = text[:-1]
        return _non_empty(text), _unavailable(
            name, "file", f"the file is empty; write the secret into it, {_ELSEWHERE}"
        )

    def _masked(self, source: _Source) -> str:
        if source.kind == "env":
            return f"env:{source.location}"
        if source.kind == "file":
            if Path(source.location).is_absolute():
                return "file:***"
            return f"file:{self._secrets_dir.as_posix().rstrip('/')}/***"
        first = source.location.strip("/").split("/", 1)[0]
        return f"vault:{first}/***/***"


_ELSEWHERE = "or map the secret elsewhere in ONEX_SECRETS__SOURCES"


def _unavailable(name: str, kind: SourceType, reason: str) -> str:
    """Why a secret is missing, naming the logical secret and its source kind: never the
    variable of a mapping, the path or the value (a location tells an attacker where to look)."""
    return f"secret {name} is not available from its {kind} source: {reason}"


def _non_empty(raw: str | None) -> SecretStr | None:
    return SecretStr(raw) if raw else None


def _context(name: str | None = None) -> ErrorContext:
    return ErrorContext(
        transport=Transport.RUNTIME,
        operation="get_secret",
        target=RESOLVER_TARGET,
        correlation_id=current_correlation_id(),
        extra={"secret": name} if name else {},
    )


def _check_name(name: str) -> None:
    # The bad name is not echoed: a caller may have passed a value by mistake.
    if not isinstance(name, str) or not SECRET_NAME.fullmatch(name):
        raise ConfigurationError(f"invalid secret name: expected {_NAME_FORM}", context=_context())


def _parse_source(name: str, spec: str) -> _Source:
    """``env:VAR``, ``file:path`` or ``vault:path#field``; errors never quote the spec."""
    if not SECRET_NAME.fullmatch(name):
        raise ConfigurationError(
            f"invalid secret name {name!r} in ONEX_SECRETS__SOURCES: expected {_NAME_FORM}",
            context=_context(),
        )
    kind, separator, rest = spec.partition(":")
    invalid = ConfigurationError(
        f"invalid source for secret {name}: expected {_SOURCE_FORMS}", context=_context(name)
    )
    if not separator or not rest.strip():
        raise invalid
    if kind == "env":
        if not _ENV_VAR.fullmatch(rest):
            raise invalid
        return _Source("env", rest)
    if kind == "file":
        return _Source("file", rest)
    if kind == "vault":
        path, _, field = rest.partition("#")
        if not path.strip("/"):
            raise invalid
        return _Source("vault", path.strip("/"), field or None)
    raise invalid


# ---------------------------------------------------------------------------------------------
# The composition root's entry point


class SecretStoreSettings(Protocol):
    """The sections a secret resolver is built from (the worker's settings have both)."""

    @property
    def vault(self) -> VaultSettings: ...

    @property
    def secrets(self) -> SecretsSettings: ...


async def build_secret_resolver(
    settings: SecretStoreSettings,
    *,
    breakers: BreakerRegistry | None = None,
    clock: Clock = time.monotonic,
) -> tuple[SecretResolver, VaultClient | None]:
    """The worker's resolver, and its Vault client when Vault is enabled (connected, prefetched).

    Run ``vault.keep_token_fresh`` as a background service and ``vault.close()`` at shutdown.
    """
    vault = None
    if settings.vault.enabled:
        vault = VaultClient(settings.vault, breakers=breakers)
        try:
            ttl = await vault.connect()
            logger.info("vault_connected", ttl=ttl)
        except BaseException:
            vault.close()
            raise
    resolver = SecretResolver(settings.secrets, vault=vault, clock=clock)
    if vault is not None:
        try:
            await resolver.prefetch()
        except BaseException:
            vault.close()
            raise
    return resolver, vault
