"""Workflow runs as activities see them: handler calls made inside an activity context whose
info names a workflow id and a run id (the writer the fenced compensations compare against)."""

from __future__ import annotations

import dataclasses
import uuid
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from temporalio.testing import ActivityEnvironment

from contracts.registry import CompensationInput, DeregisterNodeRequest, RegisterNodeRequest

T = TypeVar("T")


class Run:
    """One run of a workflow: ``await run(handler.operation, argument)`` calls the operation as
    an activity of that run would."""

    def __init__(self, workflow_id: str, run_id: str | None = None) -> None:
        self.workflow_id = workflow_id
        self.run_id = run_id or str(uuid.uuid4())
        self._env = ActivityEnvironment()
        self._env.info = dataclasses.replace(
            ActivityEnvironment.default_info(),
            workflow_id=self.workflow_id,
            workflow_run_id=self.run_id,
        )

    @property
    def writer(self) -> str:
        return f"{self.workflow_id}/{self.run_id}"

    async def __call__(self, operation: Callable[..., Awaitable[T]], *args: Any) -> T:
        result: T = await self._env.run(operation, *args)
        return result


def register_run(node_id: uuid.UUID) -> Run:
    return Run(f"onex-register-node-{node_id}")


def deregister_run(node_id: uuid.UUID) -> Run:
    return Run(f"onex-deregister-node-{node_id}")


def ambiguous(
    request: RegisterNodeRequest | DeregisterNodeRequest, forward_activity: str
) -> CompensationInput:
    """The compensation the workflow pushes for a step that failed ambiguously: no forward
    result, the flag, and the step's activity (as after Temporal's JSON round trip)."""
    return CompensationInput(
        request=request.model_dump(mode="json"),
        forward_result={},
        correlation_id=request.correlation_id,
        ambiguous=True,
        forward_activity=forward_activity,
    )
