"""Node registry contracts: the requests users send and what the backends return (SPEC §3.3).

Each operation has one request model (the workflow input) and each activity one result model.
A forward step receives the operation's request; a compensation receives
:class:`CompensationInput`: the same request and the result of the step it undoes.
"""

from __future__ import annotations

import re
import uuid
from datetime import datetime
from enum import StrEnum
from typing import Any
from urllib.parse import parse_qsl

from pydantic import AnyHttpUrl, BaseModel, ConfigDict, Field, field_validator

from contracts.credentials import credential_key, find_credential

# Keys that name credentials (a subset of the sanitizer's list, kept here because contracts
# import nothing that does I/O).
_SECRET_KEY = re.compile(
    r"passw(or)?d|passphrase|secret|token|api[_-]?key|access[_-]?key|credential|private[_-]?key"
    r"|authorization|cookie|session[_-]?id|dsn|(^|[_-])auth($|[_-])",
    re.IGNORECASE,
)
SEMVER = r"^(0|[1-9]\d*)\.(0|[1-9]\d*)\.(0|[1-9]\d*)(?:-[0-9A-Za-z.-]+)?(?:\+[0-9A-Za-z.-]+)?$"


class NodeType(StrEnum):
    EFFECT = "effect"
    COMPUTE = "compute"
    REDUCER = "reducer"
    ORCHESTRATOR = "orchestrator"


class NodeStatus(StrEnum):
    ACTIVE = "active"
    INACTIVE = "inactive"


class _Contract(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


def _no_credential(field: str, text: str) -> None:
    """Refuse a free-text value that holds a credential; name the field and the rule, never the
    value (request fields reach Consul, the registry, Kafka and the Temporal history)."""
    rule = find_credential(text)
    if rule is not None:
        raise ValueError(
            f"{field} looks like it holds a credential ({rule}); request fields are stored and "
            "shown everywhere: keep secrets in the secret store"
        )


class NodeEndpoints(_Contract):
    health: AnyHttpUrl = Field(description="The URL Consul's HTTP health check polls")

    @field_validator("health")
    @classmethod
    def _no_credentials(cls, url: AnyHttpUrl) -> AnyHttpUrl:
        # The URL is stored in Consul, PostgreSQL and the workflow history: no userinfo, and no
        # token in its query string.
        if url.username or url.password:
            raise ValueError("the health URL must not carry credentials (user:password@)")
        for name, _ in parse_qsl(url.query or "", keep_blank_values=True):
            if credential_key(name):
                raise ValueError(
                    f"the health URL's query parameter {name!r} names a credential; a health "
                    "check must not need one in its URL"
                )
        _no_credential("the health URL", str(url))
        return url


class RegisterNodeRequest(_Contract):
    """Register a node in the service catalog and the registry database at the same time."""

    node_id: uuid.UUID
    node_type: NodeType
    node_version: str = Field(examples=["1.4.2"], description="A semantic version")
    service_name: str = Field(min_length=1, max_length=200, pattern=r"^[a-z0-9][a-z0-9._-]*$")
    address: str = Field(min_length=1, max_length=253)
    port: int = Field(ge=1, le=65535)
    tags: tuple[str, ...] = Field(default=(), max_length=64)
    endpoints: NodeEndpoints
    metadata: dict[str, str] = Field(default_factory=dict, max_length=64)
    correlation_id: uuid.UUID | None = None

    @field_validator("node_version")
    @classmethod
    def _semantic_version(cls, version: str) -> str:
        if not re.fullmatch(SEMVER, version):
            raise ValueError(f"{version!r} is not a semantic version such as 1.4.2")
        return version

    @field_validator("metadata")
    @classmethod
    def _no_secret_metadata(cls, metadata: dict[str, str]) -> dict[str, str]:
        # Metadata is shown everywhere (Consul, the registry, Temporal): never a credential.
        for key, value in metadata.items():
            if _SECRET_KEY.search(key) or credential_key(key):
                raise ValueError(
                    f"metadata key {key!r} looks like a credential; metadata is public, keep "
                    "secrets in the secret store"
                )
            _no_credential(f"the value of metadata key {key!r}", value)
        return metadata

    @field_validator("tags")
    @classmethod
    def _tags_are_short_words(cls, tags: tuple[str, ...]) -> tuple[str, ...]:
        for number, tag in enumerate(tags, start=1):
            _no_credential(f"tag {number}", tag)
            if not tag or len(tag) > 100 or any(c.isspace() for c in tag):
                raise ValueError(f"tag {tag!r} must be 1-100 characters without spaces")
        return tags

    @field_validator("address")
    @classmethod
    def _plain_address(cls, address: str) -> str:
        if "@" in address:
            raise ValueError("the address must be a host or IP, without user:password@")
        _no_credential("the address", address)
        return address

    @property
    def consul_service_id(self) -> str:
        return f"onex-{self.node_type.value}-{self.node_id}"

    @property
    def consul_service_name(self) -> str:
        return f"onex-{self.node_type.value}"


class DeregisterNodeRequest(_Contract):
    """Remove a node from the catalog and deactivate it in the registry."""

    node_id: uuid.UUID
    node_type: NodeType
    reason: str = Field(default="requested", max_length=200)
    correlation_id: uuid.UUID | None = None

    @field_validator("reason")
    @classmethod
    def _no_secret_reason(cls, reason: str) -> str:
        _no_credential("the reason", reason)
        return reason

    @property
    def consul_service_id(self) -> str:
        return f"onex-{self.node_type.value}-{self.node_id}"


class NodeRecord(_Contract):
    """A row of the registry's nodes table."""

    node_id: uuid.UUID
    node_type: NodeType
    node_version: str
    service_name: str
    address: str
    port: int
    tags: tuple[str, ...]
    endpoints: dict[str, str]
    metadata: dict[str, str]
    status: NodeStatus
    row_version: int
    correlation_id: uuid.UUID | None
    registered_at: datetime
    updated_at: datetime
    # The run that wrote the row last (``<workflow id>/<run id>``, see activities/writer.py);
    # None for rows written before writers were recorded. Compensations fence on it.
    written_by: str | None = None


class CompensationInput(_Contract):
    """What a compensation activity receives: the request, and the result of the step it undoes.

    ``ambiguous``: the step finally failed in a way that may have reached the backend (a
    retryable error or a timeout), so there is no ``forward_result`` (``{}``); the compensation
    looks up the pre-image this run recorded, if any, and undoes only what it finds.
    ``forward_activity`` names the step (``postgres.upsert_node``) for a compensation that
    undoes more than one kind of step. Both default so that older payloads still validate.
    """

    request: dict[str, Any]
    forward_result: dict[str, Any]
    correlation_id: uuid.UUID | None = None
    ambiguous: bool = False
    forward_activity: str | None = None


class UpsertNodeResult(_Contract):
    """``postgres.upsert_node``: the row now, and the row before (None if it was new)."""

    node: NodeRecord
    previous: NodeRecord | None


class UndoAction(StrEnum):
    """What a compensation did. ``superseded``: the row or service is no longer what this run
    wrote (a newer operation changed it), so it was left as it is."""

    RESTORED = "restored"
    DELETED = "deleted"
    DEREGISTERED = "deregistered"
    UNCHANGED = "unchanged"
    SUPERSEDED = "superseded"


class RestoreNodeResult(_Contract):
    """``postgres.restore_node``: what the compensation did, and why when it was superseded."""

    action: UndoAction = Field(description="restored, deleted, unchanged, or superseded")
    reason: str | None = Field(
        default=None, description="For superseded: which workflow wrote the row since"
    )


class DeactivateNodeResult(_Contract):
    """``postgres.deactivate_node``: the row before (None if there was no such node)."""

    previous: NodeRecord | None
    deactivated: bool


class GetNodeRequest(_Contract):
    node_id: uuid.UUID
    correlation_id: uuid.UUID | None = None


class GetNodeResult(_Contract):
    node: NodeRecord | None


class EnqueueEventResult(_Contract):
    """``postgres.enqueue_event``: False when an event with that id was already queued."""

    event_id: uuid.UUID
    enqueued: bool


class RegisterServiceResult(_Contract):
    """``consul.register_service``; ``previous`` is the registration it replaced, if any."""

    service_id: str
    service_name: str
    previous: dict[str, Any] | None = None


class DeregisterServiceResult(_Contract):
    """``consul.deregister_service``: ``existed`` is False when it was already gone;
    ``previous`` is the registration removed, so that the compensation can put it back."""

    service_id: str
    existed: bool
    previous: dict[str, Any] | None = None


class SkippedResult(_Contract):
    """What a step returns when its backend is disabled in this deployment (never a success)."""

    skipped: bool = True
    reason: str
