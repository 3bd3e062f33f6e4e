"""The operation contract, ``contracts/operations/<operation>.yaml``, and its compiled plan.

An operation contract says which handler operations an orchestrated operation runs (its steps,
each with its compensation), in parallel or in sequence, how results aggregate, how long a
partial result stays open for a targeted retry, and which events announce the outcome.

The client compiles it, with the handler contracts it names, into an :class:`OperationPlan`
that travels in the workflow's input: a running workflow never reads files (deterministic), and
a contract change never alters a workflow already running (``version`` says which plan it runs).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from contracts.errors import ConfigurationError, Transport
from contracts.handler_contract import LOWER_SNAKE, HandlerContract
from contracts.resilience import ResiliencePolicy, RetrySettings, TimeoutSettings
from contracts.topics import TOPICS_BY_NAME


class _Contract(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StepContract(_Contract):
    backend: str = Field(pattern=LOWER_SNAKE, description="The name results and retries use")
    handler: str = Field(pattern=LOWER_SNAKE)
    operation: str = Field(pattern=LOWER_SNAKE)
    compensation: str | None = Field(
        default=None,
        description="Overrides the compensation the handler contract declares for the operation",
    )


class PartialFailureContract(_Contract):
    retry_window_seconds: float = Field(default=900.0, gt=0, le=7 * 86_400)
    on_expiry: Literal["compensate"] = "compensate"


class EventsContract(_Contract):
    on_success: str | None = None
    on_failure: str | None = None
    via: str = Field(
        default="postgres.enqueue_event",
        pattern=r"^[a-z][a-z0-9_]*\.[a-z][a-z0-9_]*$",
        description="The <handler>.<operation> that queues events (the outbox)",
    )

    @model_validator(mode="after")
    def _topics_exist(self) -> EventsContract:
        for topic in (self.on_success, self.on_failure):
            if topic is not None and topic not in TOPICS_BY_NAME:
                raise ValueError(f"event topic {topic!r} is not in the topic catalog")
        return self


class OperationContract(_Contract):
    operation: str = Field(pattern=LOWER_SNAKE)
    version: int = Field(ge=1)
    description: str = ""
    input_model: str = Field(
        pattern=r"^contracts(\.[a-z_][a-z0-9_]*)+:[A-Za-z_][A-Za-z0-9_]*$",
        description="The request model, a class under the contracts package",
    )
    workflow_id: str = Field(
        description="Workflow id template; {field} is a field of the request",
        examples=["onex-register-node-{node_id}"],
    )
    steps: tuple[StepContract, ...] = Field(min_length=1)
    execution_mode: Literal["parallel", "sequential"] = "parallel"
    aggregation: Literal["all_or_nothing", "all_or_partial"] = "all_or_nothing"
    partial_failure: PartialFailureContract = PartialFailureContract()
    events: EventsContract = EventsContract()
    supersedes: tuple[str, ...] = Field(
        default=(),
        description=(
            "Operations on the same node this one overrides: one of them waiting in partial "
            "for a retry is closed (compensated) so that this one runs next"
        ),
        examples=[["register_node"]],
    )

    @model_validator(mode="after")
    def _backends_are_unique(self) -> OperationContract:
        backends = [step.backend for step in self.steps]
        duplicates = sorted({name for name in backends if backends.count(name) > 1})
        if duplicates:
            raise ValueError(f"step backends must be unique; repeated: {', '.join(duplicates)}")
        for field in re.findall(r"{([^}]*)}", self.workflow_id):
            if not re.fullmatch(LOWER_SNAKE, field):
                raise ValueError(f"workflow_id placeholder {{{field}}} is not a field name")
        return self


class PlanStep(_Contract):
    """One step as the workflow runs it: activity names and their options, resolved."""

    backend: str
    transport: Transport
    activity: str
    policy: ResiliencePolicy
    compensation_activity: str | None = None
    compensation_policy: ResiliencePolicy | None = None


class OperationPlan(_Contract):
    """An operation contract compiled against the handler contracts it names."""

    operation: str
    version: int
    execution_mode: Literal["parallel", "sequential"]
    aggregation: Literal["all_or_nothing", "all_or_partial"]
    retry_window_seconds: float
    steps: tuple[PlanStep, ...]
    on_success_event: str | None = None
    on_failure_event: str | None = None
    event_activity: str | None = None
    event_policy: ResiliencePolicy | None = None
    # Plans recorded before the per-node workflow have none: they override nothing.
    supersedes: tuple[str, ...] = ()

    def step(self, backend: str) -> PlanStep:
        for step in self.steps:
            if step.backend == backend:
                return step
        raise KeyError(backend)


class PlanError(ConfigurationError, ValueError):
    """An operation contract that does not fit the handler contracts it names.

    The client raises it too when it cannot compile its plans because a contract is unreadable
    (the message then carries the loader code), so one ``except`` covers both.
    """


def compensation_policy(policy: ResiliencePolicy) -> ResiliencePolicy:
    """More patient than the forward step: undoing half-done work matters more than speed."""
    retry = policy.retry
    return policy.model_copy(
        update={
            "retry": RetrySettings(
                max_attempts=10,
                initial_interval=retry.initial_interval,
                max_interval=min(300.0, max(60.0, retry.max_interval * 2)),
                backoff_coefficient=retry.backoff_coefficient,
                jitter=retry.jitter,
            ),
            "timeouts": TimeoutSettings(start_to_close=policy.timeouts.start_to_close),
        }
    )


def compile_plan(
    contract: OperationContract, handlers: Mapping[str, HandlerContract]
) -> OperationPlan:
    """The plan for ``contract``; every step's handler, operation and compensation must exist."""
    problems = plan_problems(contract, handlers)
    if problems:
        raise PlanError("; ".join(problems))
    steps = []
    for step in contract.steps:
        handler = handlers[step.handler]
        policy = handler.policy()
        compensation = step.compensation or handler.operations[step.operation].compensation
        steps.append(
            PlanStep(
                backend=step.backend,
                transport=Transport(handler.transport),
                activity=handler.activity_name(step.operation),
                policy=policy,
                compensation_activity=handler.activity_name(compensation) if compensation else None,
                compensation_policy=compensation_policy(policy) if compensation else None,
            )
        )
    event_handler_name, event_operation = contract.events.via.split(".", 1)
    event_handler = handlers[event_handler_name]
    return OperationPlan(
        event_activity=event_handler.activity_name(event_operation),
        event_policy=event_handler.policy(),
        operation=contract.operation,
        version=contract.version,
        execution_mode=contract.execution_mode,
        aggregation=contract.aggregation,
        retry_window_seconds=contract.partial_failure.retry_window_seconds,
        steps=tuple(steps),
        on_success_event=contract.events.on_success,
        on_failure_event=contract.events.on_failure,
        supersedes=contract.supersedes,
    )


def plan_problems(
    contract: OperationContract, handlers: Mapping[str, HandlerContract]
) -> list[str]:
    """Every cross-reference of ``contract`` that does not resolve, as readable sentences."""
    problems = []
    via_handler, via_operation = contract.events.via.split(".", 1)
    if via_operation not in getattr(handlers.get(via_handler), "operations", {}):
        problems.append(
            f"operation {contract.operation!r}: events.via {contract.events.via!r} is not an "
            "operation of a known handler"
        )
    for step in contract.steps:
        handler = handlers.get(step.handler)
        where = f"operation {contract.operation!r}, step {step.backend!r}"
        if handler is None:
            problems.append(
                f"{where}: no handler contract named {step.handler!r} "
                f"(known: {', '.join(sorted(handlers)) or 'none'})"
            )
            continue
        if step.operation not in handler.operations:
            problems.append(
                f"{where}: handler {step.handler!r} has no operation {step.operation!r} "
                f"(it has: {', '.join(sorted(handler.operations))})"
            )
            continue
        if step.compensation is not None and step.compensation not in handler.operations:
            problems.append(
                f"{where}: compensation {step.compensation!r} is not an operation of "
                f"handler {step.handler!r}"
            )
    return problems


def supersedes_problems(contract: OperationContract, known: Collection[str]) -> list[str]:
    """``contract`` may supersede only operations that some contract (``known``) defines."""
    unknown = sorted(set(contract.supersedes) - set(known))
    if not unknown:
        return []
    return [
        f"operation {contract.operation!r}: supersedes {', '.join(unknown)}, which no "
        f"operation contract defines (known: {', '.join(sorted(known))})"
    ]
