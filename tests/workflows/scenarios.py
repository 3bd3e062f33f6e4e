"""Scripted backends and the workflow scenarios that the tests and the golden histories share.

The activities here carry the real activity names (``consul.register_service``, ...) and go
through the real activity boundary, but their behaviour is scripted: each scenario says which
calls fail and how. ``make record-histories`` runs the same scenarios to write the golden
histories that the replay tests check.
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import Any

from temporalio import activity
from temporalio.client import Client, WorkflowHandle
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker
from typer.testing import CliRunner, Result

from activities.resilience.boundary import ActivityBoundary
from activities.resilience.breaker import BreakerRegistry
from contracts.errors import ErrorContext, InfraAuthenticationError, Transport
from contracts.events import EventEnvelope
from contracts.operation_contract import OperationPlan, compile_plan
from contracts.operations_io import OperationInput, OperationResult
from contracts.registry import (
    CompensationInput,
    DeregisterNodeRequest,
    EnqueueEventResult,
    NodeStatus,
    RegisterNodeRequest,
    SkippedResult,
)
from contracts.resilience import ResiliencePolicy, RetrySettings, default_policy
from workers.cli import app
from workers.client import Operations
from workers.contract_files import read_handlers, read_operations
from workers.settings import CONTRACTS_DIR
from workflows import WORKFLOWS
from workflows.operation import OperationWorkflow

NODE_ID = uuid.UUID("7d7f3c1e-4f7b-4c59-9a2e-1f0c2b3a4d5e")
CORRELATION_ID = uuid.UUID("0b9a8c7d-6e5f-4a3b-8c2d-1e0f9a8b7c6d")


def plan(operation: str = "register_node", **changes: Any) -> OperationPlan:
    """A built-in plan, with fast retries so that failures exhaust quickly in tests."""
    handlers = read_handlers([CONTRACTS_DIR / "handlers"]).contracts
    operations = read_operations([CONTRACTS_DIR / "operations"]).contracts
    compiled = compile_plan(operations[operation], handlers)
    fast = RetrySettings(max_attempts=3, initial_interval=1.0, max_interval=4.0)
    steps = tuple(
        step.model_copy(update={"policy": step.policy.model_copy(update={"retry": fast})})
        for step in compiled.steps
    )
    return compiled.model_copy(update={"steps": steps, **changes})


def request(**changes: Any) -> RegisterNodeRequest:
    base = RegisterNodeRequest(
        node_id=NODE_ID,
        node_type="effect",
        node_version="1.2.3",
        service_name="billing",
        address="10.0.0.7",
        port=8080,
        tags=("onex",),
        endpoints={"health": "http://10.0.0.7:8080/health"},
        correlation_id=CORRELATION_ID,
    )
    return base.model_copy(update=changes)


Behaviour = Callable[[int], Awaitable[Any] | Any]


@dataclass
class Backends:
    """Scripted consul and postgres activities; ``calls`` records every invocation."""

    behaviours: dict[str, Behaviour] = field(default_factory=dict)
    calls: dict[str, list[Any]] = field(default_factory=lambda: defaultdict(list))
    events: list[EventEnvelope] = field(default_factory=list)

    def script(self, name: str, behaviour: Behaviour) -> None:
        self.behaviours[name] = behaviour

    async def _call(self, name: str, argument: Any, default: Any) -> Any:
        self.calls[name].append(argument)
        behaviour = self.behaviours.get(name)
        if behaviour is None:
            return default
        outcome = behaviour(len(self.calls[name]))
        if asyncio.iscoroutine(outcome):
            outcome = await outcome
        return default if outcome is None else outcome

    def activities(self, *, only: Collection[str] | None = None) -> list[Callable[..., Any]]:
        """The scripted activities (those named in ``only``, if given)."""
        breakers = BreakerRegistry()

        def boundary(transport: Transport) -> ActivityBoundary:
            return ActivityBoundary(
                transport=transport,
                target=f"{transport.value}-scripted",
                policy=scripted_policy(transport),
                breakers=breakers,
                uniform=lambda: 0.5,
            )

        consul = boundary(Transport.CONSUL)
        postgres = boundary(Transport.DATABASE)

        async def register_service(request: RegisterNodeRequest) -> dict[str, Any]:
            return await self._call(  # type: ignore[no-any-return]
                "consul.register_service",
                request,
                {"service_id": request.consul_service_id, "service_name": "onex-effect"},
            )

        async def undo_register_service(compensation: CompensationInput) -> dict[str, Any]:
            return await self._call(  # type: ignore[no-any-return]
                "consul.undo_register_service", compensation, undone(compensation, "deregistered")
            )

        async def upsert_node(request: RegisterNodeRequest) -> dict[str, Any]:
            return await self._call(  # type: ignore[no-any-return]
                "postgres.upsert_node",
                request,
                {
                    "node": {"node_id": str(request.node_id), "status": NodeStatus.ACTIVE.value},
                    "previous": None,
                },
            )

        async def restore_node(compensation: CompensationInput) -> dict[str, Any]:
            return await self._call(  # type: ignore[no-any-return]
                "postgres.restore_node", compensation, undone(compensation, "deleted")
            )

        async def deregister_service(request: DeregisterNodeRequest) -> dict[str, Any]:
            return await self._call(  # type: ignore[no-any-return]
                "consul.deregister_service",
                request,
                {"service_id": request.consul_service_id, "existed": True, "previous": None},
            )

        async def undo_deregister_service(compensation: CompensationInput) -> dict[str, Any]:
            return await self._call(  # type: ignore[no-any-return]
                "consul.undo_deregister_service", compensation, {"action": "unchanged"}
            )

        async def deactivate_node(request: DeregisterNodeRequest) -> dict[str, Any]:
            return await self._call(  # type: ignore[no-any-return]
                "postgres.deactivate_node", request, {"previous": None, "deactivated": False}
            )

        async def enqueue_event(envelope: EventEnvelope) -> EnqueueEventResult:
            await self._call("postgres.enqueue_event", envelope, None)  # raises if scripted to
            self.events.append(envelope)
            return EnqueueEventResult(event_id=envelope.event_id, enqueued=True)

        definitions: dict[str, Callable[..., Awaitable[Any]]] = {
            "consul.register_service": consul.wrap("register_service", register_service),
            "consul.undo_register_service": consul.wrap(
                "undo_register_service", undo_register_service
            ),
            "postgres.upsert_node": postgres.wrap("upsert_node", upsert_node),
            "postgres.restore_node": postgres.wrap("restore_node", restore_node),
            "postgres.enqueue_event": postgres.wrap("enqueue_event", enqueue_event),
            "consul.deregister_service": consul.wrap("deregister_service", deregister_service),
            "consul.undo_deregister_service": consul.wrap(
                "undo_deregister_service", undo_deregister_service
            ),
            "postgres.deactivate_node": postgres.wrap("deactivate_node", deactivate_node),
        }
        return [
            activity.defn(name=name)(fn)
            for name, fn in definitions.items()
            if only is None or name in only
        ]


def scripted_policy(transport: Transport) -> ResiliencePolicy:
    """The transport's policy with a breaker that never opens in a workflow test.

    A breaker's clock is the process's, which does not skip with the time-skipping server's:
    an open breaker would hold a retry or a compensation for real seconds while the server
    skips a 15-minute window or a compensation's budget in a moment. Breakers are tested on
    their own (tests/activities/test_breaker.py)."""
    policy = default_policy(transport)
    breaker = policy.circuit_breaker.model_copy(update={"failure_threshold": 1000})
    return policy.model_copy(update={"circuit_breaker": breaker})


def undone(compensation: CompensationInput, action: str) -> dict[str, Any]:
    """A scripted compensation's default answer: ``action``; for an ambiguous one (its step
    failed), ``unchanged``, since a scripted step that raised wrote nothing."""
    return {"action": "unchanged" if compensation.ambiguous else action}


def refused(attempt: int) -> None:
    raise ConnectionRefusedError(111, "connection refused")


def denied(attempt: int) -> None:
    raise InfraAuthenticationError(
        "ACL permission denied - check token permissions",
        context=ErrorContext(transport=Transport.CONSUL, operation="x", target="consul"),
    )


def skipped(attempt: int) -> dict[str, Any]:
    return SkippedResult(reason="no Consul address is configured").model_dump()


def worker(client: Client, task_queue: str, backends: Backends) -> Worker:
    return Worker(
        client,
        task_queue=task_queue,
        workflows=WORKFLOWS,
        activities=backends.activities(),
        identity="onex-test-worker",
    )


async def start(
    client: Client,
    task_queue: str,
    operation_plan: OperationPlan,
    node_request: RegisterNodeRequest | DeregisterNodeRequest | None = None,
) -> WorkflowHandle[Any, OperationResult]:
    node_request = node_request or request()
    return await client.start_workflow(
        OperationWorkflow.run,
        OperationInput(
            plan=operation_plan,
            request=node_request.model_dump(mode="json"),
            correlation_id=CORRELATION_ID,
        ),
        id=f"onex-register-node-{node_request.node_id}-{uuid.uuid4().hex[:8]}",
        task_queue=task_queue,
    )


HISTORIES = Path(__file__).resolve().parents[1] / "histories"


async def record(handle: WorkflowHandle[Any, Any], name: str) -> None:
    """With ONEX_RECORD_HISTORIES=1 (``make record-histories``), keep a new history as golden.

    A committed history is never overwritten: it stands for workflows that ran with earlier
    code, and must keep replaying (delete the file first to re-record it on purpose).
    """
    path = HISTORIES / f"{name}.json"
    if os.environ.get("ONEX_RECORD_HISTORIES") != "1" or path.exists():
        return
    history = await handle.fetch_history()
    HISTORIES.mkdir(exist_ok=True)
    path.write_text(history.to_json() + "\n")


def operations(**changes: Any) -> Operations:
    """The built-in operations with the fast plans of :func:`plan`, for the client helpers."""
    contracts = read_operations([CONTRACTS_DIR / "operations"]).contracts
    return Operations(
        plans=MappingProxyType({name: plan(name, **changes) for name in contracts}),
        contracts=MappingProxyType(dict(contracts)),
    )


async def onex(env: WorkflowEnvironment, cli_env: dict[str, str], *args: str) -> Result:
    """Run ``onex`` against ``env``'s server (in a thread: the command runs its own loop)."""
    host, port = env.client.service_client.config.target_host.rsplit(":", 1)
    variables = {**cli_env, "ONEX_TEMPORAL__HOST": host, "ONEX_TEMPORAL__PORT": port}
    return await asyncio.to_thread(CliRunner().invoke, app, list(args), env=variables)
