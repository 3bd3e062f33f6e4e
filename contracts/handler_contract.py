"""The handler contract: ``contracts/handlers/<handler>/handler_contract.yaml`` (SPEC §3.1).

One YAML file declares one plugin: which class implements it, what it talks to, its operations
(each becomes the Temporal activity ``<handler>.<operation>``; the name is a wire contract) and
any resilience values that differ from its transport's defaults. Contracts hold no secrets.
"""

from __future__ import annotations

import re
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator
from pydantic.fields import FieldInfo

from contracts.errors import Transport
from contracts.resilience import (
    BreakerSettings,
    ResiliencePolicy,
    RetrySettings,
    TimeoutSettings,
    resolve_policy,
)

LOWER_SNAKE = r"^[a-z][a-z0-9_]*$"
CLASS_PATH = r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*$"


def _partial(model: type[BaseModel]) -> type[BaseModel]:
    """``model`` with every field optional (None: keep the default), constraints kept."""
    fields: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        annotation: Any = info.annotation
        fields[name] = (annotation | None, FieldInfo.merge_field_infos(info, default=None))
    return create_model(
        f"{model.__name__}Override",
        __config__=ConfigDict(extra="forbid", frozen=True),
        **fields,
    )


RetryOverride = _partial(RetrySettings)
BreakerOverride = _partial(BreakerSettings)
TimeoutOverride = _partial(TimeoutSettings)


class ResilienceOverrides(BaseModel):
    """Only what differs from the transport's defaults (SPEC §4.2)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    timeouts: TimeoutOverride | None = None  # type: ignore[valid-type]
    retry: RetryOverride | None = None  # type: ignore[valid-type]
    circuit_breaker: BreakerOverride | None = None  # type: ignore[valid-type]

    def as_overrides(self) -> dict[str, dict[str, Any]]:
        return {
            section: {key: value for key, value in values.items() if value is not None}
            for section, values in self.model_dump().items()
            if values is not None
        }


class OperationSpec(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    compensation: str | None = Field(
        default=None, description="The operation of this handler that undoes this one"
    )
    idempotent: bool = Field(description="A repeat of a completed call changes nothing")
    description: str = ""


class HandlerContract(BaseModel):
    """One handler plugin."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    handler_name: str = Field(pattern=LOWER_SNAKE, max_length=64)
    handler_class: str = Field(pattern=CLASS_PATH, examples=["activities.postgres:PostgresHandler"])
    handler_type: Literal["effect"] = Field(
        description="Handlers run as activities and do I/O: they are effects"
    )
    transport: Literal["database", "kafka", "consul", "vault", "http"]
    description: str = ""
    capability_tags: tuple[str, ...] = ()
    operations: dict[str, OperationSpec] = Field(min_length=1)
    resilience: ResilienceOverrides = ResilienceOverrides()

    @model_validator(mode="after")
    def _operations_are_consistent(self) -> HandlerContract:
        for name, spec in self.operations.items():
            if not _is_lower_snake(name):
                raise ValueError(f"operation name {name!r} must be lower_snake_case")
            if spec.compensation is not None and spec.compensation not in self.operations:
                raise ValueError(
                    f"operation {name!r} names compensation {spec.compensation!r}, which is not "
                    f"an operation of this handler ({', '.join(sorted(self.operations))})"
                )
        resolve_policy(Transport(self.transport), self.resilience.as_overrides())
        return self

    @property
    def module_path(self) -> str:
        return self.handler_class.split(":", 1)[0]

    @property
    def class_name(self) -> str:
        return self.handler_class.split(":", 1)[1]

    def policy(self) -> ResiliencePolicy:
        return resolve_policy(Transport(self.transport), self.resilience.as_overrides())

    def activity_name(self, operation: str) -> str:
        return f"{self.handler_name}.{operation}"


def _is_lower_snake(name: str) -> bool:
    return re.fullmatch(LOWER_SNAKE, name) is not None
