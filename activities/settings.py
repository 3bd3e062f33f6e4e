"""The settings sections of the backends: one typed, I/O-free model per dependency.

Each handler is handed its own section only (``HandlerBase.settings_type``); the worker's
settings (:mod:`workers.settings`) compose these sections into one object, read from
``ONEX_<SECTION>__<KEY>`` variables. This module imports no client library (asyncpg, aiokafka,
consul, hvac, valkey): client processes load settings without loading the backends.

Secrets are ``SecretStr`` from the moment they are read: their ``repr`` and ``str`` show
``**********``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, SecretStr, model_validator

from contracts.credentials import find_credential

__all__ = [
    "Address",
    "ConsulSettings",
    "KafkaSettings",
    "Port",
    "PostgresSettings",
    "Seconds",
    "SecretsSettings",
    "Section",
    "ValkeySettings",
    "VaultSettings",
]

Port = Annotated[int, Field(ge=1, le=65535)]


def _no_credentials(value: str) -> str:
    """An address never carries a credential: it is printed, logged and shown in errors."""
    # "@" alone is enough: "user:pw@host" needs no scheme, and the password may hold anything.
    if "@" in value or find_credential(value) is not None:
        # The message names no value: settings errors name the variable, never what it holds.
        raise ValueError(
            "holds userinfo or a credential (user:password@); an address must not: set the "
            "credential in its own setting (a password, token or SASL setting, or a secret)"
        )
    return value


Address = Annotated[str, AfterValidator(_no_credentials)]
"""A host, ``host:port``, URL or comma-separated list of them, refused if it holds userinfo."""
Seconds = Annotated[float, Field(gt=0)]


class Section(BaseModel):
    """One settings section: unknown keys are refused, values never change once read."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class PostgresSettings(Section):
    """The registry database (SPEC §5): one DSN, a pool of 2..10, explicit timeouts."""

    host: Address = "127.0.0.1"
    port: Port = 5432
    database: str = Field(default="onex", min_length=1)
    user: str = Field(default="onex", min_length=1)
    password: SecretStr | None = None
    pool_min_size: Annotated[int, Field(ge=1, le=100)] = 2
    pool_max_size: Annotated[int, Field(ge=1, le=100)] = 10
    connect_timeout: Seconds = 10.0
    query_timeout: Seconds = 30.0

    @property
    def dsn(self) -> str:
        """A DSN without the password: asyncpg takes the password as a separate argument."""
        return f"postgresql://{self.user}@{self.host}:{self.port}/{self.database}"


class KafkaSettings(Section):
    """The event stream: producers use ``acks=all``; idempotence is off for the embedded broker."""

    bootstrap_servers: Address = "127.0.0.1:9092"
    client_id: str = "onex-orchestrator"
    topic_prefix: str = ""
    enable_idempotence: bool = False
    request_timeout_ms: Annotated[int, Field(ge=1000, le=300_000)] = 30_000
    delivery_timeout_ms: Annotated[int, Field(ge=10_000, le=600_000)] = 120_000
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    # For `onex kafka create-topics` on a real cluster (the embedded broker has one node).
    replication_factor: Annotated[int, Field(ge=1, le=10)] = 1


class ConsulSettings(Section):
    """The service catalog; disabled (steps skipped, and reported so) when no address is set."""

    address: Address | None = None
    scheme: Literal["http", "https"] = "http"
    datacenter: str | None = None
    token: SecretStr | None = None
    timeout: Seconds = 30.0
    # The HTTP health check registered with each node (Consul duration strings).
    check_interval: str = Field(default="10s", pattern=r"^\d+(ms|s|m|h)$")
    check_timeout: str = Field(default="5s", pattern=r"^\d+(ms|s|m|h)$")
    deregister_critical_after: str = Field(default="90s", pattern=r"^\d+(ms|s|m|h)$")

    @property
    def enabled(self) -> bool:
        return self.address is not None


class VaultSettings(Section):
    """The secret store; opt-in: enabled when ``address`` is set."""

    address: Address | None = None
    token: SecretStr | None = None
    role_id: str | None = None
    secret_id: SecretStr | None = None
    kv_mount: str = "secret"
    timeout: Seconds = 10.0
    # Renew the token this long before it expires.
    renew_before: Seconds = 300.0

    @property
    def enabled(self) -> bool:
        return self.address is not None


class ValkeySettings(Section):
    """The shared cache and the fleet's breaker state; opt-in: enabled when ``address`` is set.

    ``address`` is ``host:port``. The password is the secret ``valkey.password`` from the secret
    store, else ``password`` here; ``tls`` speaks TLS (``rediss``) with the system's trust store,
    or ``tls_ca_file`` when given. ``timeout`` bounds connecting and every command: a slow
    Valkey must degrade, never stall, the calls it only helps.
    """

    address: Address | None = Field(default=None, pattern=r"^[^:\s/]+:\d{1,5}$")
    username: str | None = None
    password: SecretStr | None = None
    database: Annotated[int, Field(ge=0, le=15)] = 0
    tls: bool = False
    tls_ca_file: Path | None = None
    timeout: Seconds = 2.0
    key_prefix: str = Field(default="onex:", pattern=r"^[A-Za-z0-9_.:-]*$")
    cache_ttl: Seconds = 5.0
    cache_keep: Seconds = 86_400.0

    @model_validator(mode="after")
    def _keep_covers_ttl(self) -> Self:
        if self.cache_keep < self.cache_ttl:
            raise ValueError("cache_keep must be at least cache_ttl")
        return self

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def host_port(self) -> tuple[str, int]:
        """``address`` split; only for an enabled section."""
        host, _, port = (self.address or "").rpartition(":")
        return host, int(port)


class SecretsSettings(Section):
    """Where logical secret names (``database.postgres.password``) are resolved from.

    ``sources`` maps a logical name to ``env:VAR``, ``file:relative/or/absolute/path`` or
    ``vault:path#field``. Unmapped names fall back to the environment variable
    ``ONEX_SECRET_<NAME_WITH_UNDERSCORES>`` when ``env_fallback`` is on.
    """

    sources: dict[str, str] = Field(default_factory=dict)
    secrets_dir: Path = Path("/run/secrets")
    env_fallback: bool = True
    env_ttl: Seconds = 86_400.0
    file_ttl: Seconds = 86_400.0
    vault_ttl: Seconds = 300.0
