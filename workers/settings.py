"""The one settings object, read once at the entry point.

The backend sections (PostgreSQL, Kafka, Consul, Vault, Valkey, secrets) are defined beside the
handlers, in :mod:`activities.settings`; this module adds the process's own sections (Temporal,
worker, dev stack, payload codec, Kafka ingress and liveness) and composes them all into
:class:`OnexSettings`.

Every value comes from an environment variable named ``ONEX_<SECTION>__<KEY>`` (for example
``ONEX_POSTGRES__PORT=5433``) or from a ``.env`` file in the working directory. The defaults point
at the embedded stack that ``onex dev up`` starts, so nothing needs to be set on a laptop.

Secrets are ``SecretStr`` from the moment they are read: their ``repr`` and ``str`` show
``**********`` and they are never part of :meth:`OnexSettings.safe_dump`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal, TypeVar

from pydantic import BaseModel, Field, SecretStr, ValidationError
from pydantic_settings import BaseSettings, SettingsConfigDict

from activities.resilience.sanitize import register_secret
from activities.settings import (
    Address,
    ConsulSettings,
    KafkaSettings,
    Port,
    PostgresSettings,
    Seconds,
    SecretsSettings,
    Section,
    ValkeySettings,
    VaultSettings,
)
from contracts.errors import ConfigurationError

# The built-in contracts ship inside the contracts package.
CONTRACTS_DIR = Path(__file__).resolve().parent.parent / "contracts"
ENV_PREFIX = "ONEX_"
ENV_NESTED_DELIMITER = "__"

S = TypeVar("S", bound=BaseModel)


class TemporalSettings(Section):
    """Where the Temporal frontend is and how workflows are addressed."""

    host: Address = "127.0.0.1"
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


class WorkerSettings(Section):
    """The worker process: identity, task queue, concurrency and shutdown."""

    task_queue: str = Field(default="onex-orchestrator", min_length=1)
    identity: str | None = None
    # Sized for a small machine (2 cores; docs/performance.md says how to size a fleet).
    # Activities wait on the network, so many run at once on one event loop; workflow tasks
    # are CPU-bound Python (the sandbox, the converter) under one GIL, so more slots than a
    # few per core only queue inside the process instead of on the server, where another
    # worker could take them.
    max_concurrent_activities: Annotated[int, Field(ge=1, le=10_000)] = 100
    max_concurrent_workflow_tasks: Annotated[int, Field(ge=1, le=10_000)] = 16
    # The event writes (local activities, run inside workflow tasks).
    max_concurrent_local_activities: Annotated[int, Field(ge=1, le=10_000)] = 50
    # Long polls held open per task queue kind; half the workflow pollers take new workflows
    # (the non-sticky queue), half the worker's own cached ones (its sticky queue).
    workflow_task_pollers: Annotated[int, Field(ge=2, le=100)] = 4
    activity_task_pollers: Annotated[int, Field(ge=1, le=100)] = 4
    graceful_shutdown_timeout: Seconds = 30.0
    contract_paths: list[Path] = Field(default_factory=lambda: [CONTRACTS_DIR / "handlers"])
    operation_paths: list[Path] = Field(default_factory=lambda: [CONTRACTS_DIR / "operations"])
    allowed_namespaces: list[str] = Field(default_factory=lambda: ["activities."])
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # host:port of a Prometheus /metrics endpoint (SDK metrics, breakers, failures); off if None.
    metrics_address: str | None = Field(default=None, pattern=r"^[^:\s]+:\d{1,5}$")


class DevSettings(Section):
    """The embedded stack of ``onex dev``: where its state lives and how long to wait for it."""

    state_dir: Path = Path(".onex")
    start_timeout: Seconds = 60.0
    stop_timeout: Seconds = 20.0
    # Explicit server binaries; by default they are found in the installed embedded extra.
    temporal_bin: Path | None = None
    postgres_bin: Path | None = None
    kafka_bin: Path | None = None
    valkey_bin: Path | None = None
    # The embedded Valkey listens here; workers use it only once ONEX_VALKEY__ADDRESS names it.
    valkey_port: Port = 6379


class CodecSettings(Section):
    """Payload encryption and ``onex codec-server`` (docs/security.md).

    ``enabled`` turns AES-256-GCM encryption on for every client, worker and replay of this
    process; its keys are the secret ``temporal.payload_key`` and the codec server's token the
    secret ``temporal.codec_token`` (both resolved through ``ONEX_SECRETS__SOURCES``).
    """

    enabled: bool = False
    host: str = "127.0.0.1"
    port: Port = 8089
    # The Temporal UI's origin, allowed by CORS; by default the embedded UI (temporal.ui_url).
    ui_origin: str | None = Field(default=None, pattern=r"^https?://[^/\s]+$")
    # A larger request body is refused (413) before it is read.
    max_body_bytes: Annotated[int, Field(ge=1024, le=64 * 1024 * 1024)] = 4 * 1024 * 1024


class IngressSettings(Section):
    """The Kafka ingress (``onex worker``, or ``onex ingress`` on its own) and node liveness.

    The dispatcher registers nodes from introspection events and deregisters them on shutdown
    events; the heartbeat consumer records heartbeats; the liveness Schedule sweeps every
    ``sweep_interval`` seconds and marks a node silent for more than ``liveness_window``
    seconds unhealthy (defaults: heartbeats every 30 s, unhealthy after 90 s, jitter over 15 s
    counted). Short values are for tests and the demo.
    """

    enabled: bool = True
    group_id: str = Field(default="onex-ingress", min_length=1)
    heartbeat_group_id: str = Field(default="onex-heartbeats", min_length=1)
    max_records: Annotated[int, Field(ge=1, le=100_000)] = 500
    heartbeat_max_records: Annotated[int, Field(ge=1, le=100_000)] = 5000
    poll_timeout_ms: Annotated[int, Field(ge=10, le=60_000)] = 200
    # How long the dispatcher waits for Temporal to accept one start (then it is a failure).
    accept_timeout: Seconds = 30.0
    # The dispatcher's breaker around the Temporal frontend (DISP-3's dispatcher figures).
    breaker_failure_threshold: Annotated[int, Field(ge=1, le=1000)] = 3
    breaker_open_seconds: Seconds = 20.0
    # A failed batch (database or dead-letter topic down) is fetched again after this long.
    retry_delay: Seconds = 1.0
    heartbeat_interval: Seconds = 30.0
    liveness_window: Seconds = 90.0
    jitter_limit: Seconds = 15.0
    sweep_interval: Seconds = 30.0
    # The silence policy: deregister a node silent this long (through the ingress); off if None.
    deregister_after: Seconds | None = None
    schedule_id: str = Field(default="onex-liveness-sweep", min_length=1)


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
    valkey: ValkeySettings = ValkeySettings()
    secrets: SecretsSettings = SecretsSettings()
    worker: WorkerSettings = WorkerSettings()
    dev: DevSettings = DevSettings()
    codec: CodecSettings = CodecSettings()
    ingress: IngressSettings = IngressSettings()

    def section(self, kind: type[S]) -> S:
        """The one section of type ``kind`` (what a handler's ``settings_type`` asks for)."""
        names = [
            name for name, field in type(self).model_fields.items() if field.annotation is kind
        ]
        if len(names) != 1:
            raise SettingsError(
                f"{kind.__name__} must be exactly one section of OnexSettings, not {len(names)}"
            )
        section: S = getattr(self, names[0])
        return section

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
