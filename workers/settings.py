"""The one settings object, read once at the entry point.

Every value comes from an environment variable named ``ONEX_<SECTION>__<KEY>`` (for example
``ONEX_POSTGRES__PORT=5433``) or from a ``.env`` file in the working directory. The defaults point
at the embedded stack that ``onex dev up`` starts, so nothing needs to be set on a laptop.

Secrets are ``SecretStr`` from the moment they are read: their ``repr`` and ``str`` show
``**********`` and they are never part of :meth:`OnexSettings.safe_dump`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from activities.resilience.sanitize import register_secret
from contracts.errors import ConfigurationError

# The built-in contracts ship inside the contracts package.
CONTRACTS_DIR = Path(__file__).resolve().parent.parent / "contracts"
ENV_PREFIX = "ONEX_"
ENV_NESTED_DELIMITER = "__"

Port = Annotated[int, Field(ge=1, le=65535)]
Seconds = Annotated[float, Field(gt=0)]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TemporalSettings(_Section):
    """Where the Temporal frontend is and how workflows are addressed."""

    host: str = "127.0.0.1"
    port: Port = 7233
    ui_port: Port = 8233
    namespace: str = Field(default="default", min_length=1)
    api_key: SecretStr | None = None
    tls: bool = False

    @property
    def target(self) -> str:
        """``host:port`` as ``Client.connect`` expects it."""
        return f"{self.host}:{self.port}"

    @property
    def ui_url(self) -> str:
        """The Temporal Web UI of the embedded dev server."""
        return f"http://{self.host}:{self.ui_port}"


class PostgresSettings(_Section):
    """The registry database (SPEC §5): one DSN, a pool of 2..10, explicit timeouts."""

    host: str = "127.0.0.1"
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


class KafkaSettings(_Section):
    """The event stream: producers use ``acks=all``; idempotence is off for the embedded broker."""

    bootstrap_servers: str = "127.0.0.1:9092"
    client_id: str = "onex-orchestrator"
    topic_prefix: str = ""
    enable_idempotence: bool = False
    request_timeout_ms: Annotated[int, Field(ge=1000, le=300_000)] = 30_000
    delivery_timeout_ms: Annotated[int, Field(ge=10_000, le=600_000)] = 120_000
    sasl_username: str | None = None
    sasl_password: SecretStr | None = None
    # For `onex kafka create-topics` on a real cluster (the embedded broker has one node).
    replication_factor: Annotated[int, Field(ge=1, le=10)] = 1


class ConsulSettings(_Section):
    """The service catalog; disabled (steps skipped, and reported so) when no address is set."""

    address: str | None = None
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


class VaultSettings(_Section):
    """The secret store; opt-in: enabled when ``address`` is set."""

    address: str | None = None
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


class SecretsSettings(_Section):
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


class WorkerSettings(_Section):
    """The worker process: identity, task queue, concurrency and shutdown."""

    task_queue: str = Field(default="onex-orchestrator", min_length=1)
    identity: str | None = None
    max_concurrent_activities: Annotated[int, Field(ge=1, le=10_000)] = 100
    max_concurrent_workflow_tasks: Annotated[int, Field(ge=1, le=10_000)] = 100
    graceful_shutdown_timeout: Seconds = 30.0
    contract_paths: list[Path] = Field(default_factory=lambda: [CONTRACTS_DIR / "handlers"])
    operation_paths: list[Path] = Field(default_factory=lambda: [CONTRACTS_DIR / "operations"])
    allowed_namespaces: list[str] = Field(default_factory=lambda: ["activities."])
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # host:port of a Prometheus /metrics endpoint (SDK metrics, breakers, failures); off if None.
    metrics_address: str | None = Field(default=None, pattern=r"^[^:\s]+:\d{1,5}$")


class DevSettings(_Section):
    """The embedded stack of ``onex dev``: where its state lives and how long to wait for it."""

    state_dir: Path = Path(".onex")
    start_timeout: Seconds = 60.0
    stop_timeout: Seconds = 20.0
    # Explicit server binaries; by default they are found in the installed embedded extra.
    temporal_bin: Path | None = None
    postgres_bin: Path | None = None
    kafka_bin: Path | None = None


class OnexSettings(BaseSettings):
    """Everything a process of this project can be told, grouped by the part it configures."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter=ENV_NESTED_DELIMITER,
        env_file=".env",
        extra="forbid",
        frozen=True,
    )

    temporal: TemporalSettings = TemporalSettings()
    postgres: PostgresSettings = PostgresSettings()
    kafka: KafkaSettings = KafkaSettings()
    consul: ConsulSettings = ConsulSettings()
    vault: VaultSettings = VaultSettings()
    secrets: SecretsSettings = SecretsSettings()
    worker: WorkerSettings = WorkerSettings()
    dev: DevSettings = DevSettings()

    def safe_dump(self) -> dict[str, object]:
        """The settings as JSON-ready data; secrets appear only as whether they are set."""
        data: dict[str, object] = self.model_dump(mode="json")
        for section_name in type(self).model_fields:
            section = data[section_name]
            model = getattr(self, section_name)
            if not isinstance(section, dict):
                continue
            for key in list(section):
                if isinstance(getattr(model, key), SecretStr):
                    section[key] = "<set>"
        return data


class SettingsError(ConfigurationError, ValueError):
    """Settings that cannot be used; the message names each bad key and the form it expects."""


def describe_validation_error(error: ValidationError) -> str:
    """One line per problem, naming the environment variable to fix and what it should hold."""
    lines = []
    for problem in error.errors(include_url=False, include_input=False):
        location = [str(part) for part in problem["loc"]]
        variable = ENV_PREFIX + ENV_NESTED_DELIMITER.join(location).upper()
        lines.append(f"{variable}: {problem['msg']}")
    return "invalid settings:\n  " + "\n  ".join(lines)


def load_settings() -> OnexSettings:
    """Read the settings once; a bad value raises :class:`SettingsError` naming the key.

    Every secret read is registered with the sanitizer, which then scrubs it from any message.
    """
    try:
        settings = OnexSettings()
    except ValidationError as exc:
        raise SettingsError(describe_validation_error(exc)) from None
    for section_name in type(settings).model_fields:
        section = getattr(settings, section_name)
        for key in type(section).model_fields:
            value = getattr(section, key)
            if isinstance(value, SecretStr):
                register_secret(value)
    return settings
