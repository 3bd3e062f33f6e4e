"""The client helpers users import to start and watch operations.

::

    from workers.client import connect, register_node
    from workers.settings import load_settings
    from contracts.registry import RegisterNodeRequest

    settings = load_settings()
    client = await connect(settings)
    result = await register_node(client, RegisterNodeRequest(...), settings=settings)
    print(result.status, result.failed_backends)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel
from temporalio.client import Client, WorkflowFailureError, WorkflowHandle
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.exceptions import ApplicationError
from temporalio.runtime import Runtime
from temporalio.service import RPCError, RPCStatusCode, TLSConfig

from activities.resilience.correlation import ensure_correlation_id
from contracts.errors import CompensationFailedError, OperationError
from contracts.operation_contract import OperationContract, OperationPlan, compile_plan
from contracts.operations_io import OperationInput, OperationResult, OperationStatus
from contracts.registry import DeregisterNodeRequest, RegisterNodeRequest
from contracts.search_attributes import CORRELATION_ID, NODE_ID, ONEX_OPERATION, ONEX_STATUS
from workers.converter import DATA_CONVERTER
from workers.interceptors import CorrelationInterceptor
from workers.settings import OnexSettings
from workflows.operation import OperationWorkflow


async def connect(settings: OnexSettings, *, runtime: Runtime | None = None) -> Client:
    """A Temporal client with the project's data converter and correlation interceptor.

    Workers built from this client inherit the interceptor, so correlation ids flow from the
    client through workflows into activity logs.
    """
    temporal = settings.temporal
    api_key = temporal.api_key.get_secret_value() if temporal.api_key else None
    return await Client.connect(
        temporal.target,
        namespace=temporal.namespace,
        data_converter=DATA_CONVERTER,
        interceptors=[CorrelationInterceptor()],
        api_key=api_key,
        tls=TLSConfig() if temporal.tls or api_key else False,
        runtime=runtime,
    )


class OperationNotFound(OperationError, LookupError):
    """No workflow with that id exists (or it is not an operation workflow)."""


class OperationFinished(OperationError, ValueError):
    """The operation has ended, so it can no longer be retried; ``status`` says how."""

    def __init__(self, workflow_id: str, status: OperationStatus) -> None:
        super().__init__(f"nothing to retry: operation {workflow_id} has finished ({status.value})")
        self.status = status


@dataclass(frozen=True)
class Operations:
    """The compiled plans of the configured operation contracts."""

    plans: dict[str, OperationPlan]
    contracts: dict[str, OperationContract]

    @classmethod
    def load(cls, settings: OnexSettings) -> Operations:
        from workers.validate import validate_contracts

        report = validate_contracts(settings)
        if not report.ok:
            problems = "; ".join(problem.message for problem in report.problems)
            raise ValueError(f"the contracts are invalid: {problems}")
        return cls(
            plans={
                name: compile_plan(contract, report.handlers)
                for name, contract in report.operations.items()
            },
            contracts=report.operations,
        )


async def start_operation(
    client: Client,
    operations: Operations,
    operation: str,
    request: BaseModel,
    *,
    task_queue: str,
) -> WorkflowHandle[Any, OperationResult]:
    """Start ``operation`` for ``request``; a start for a still-running id attaches to it.

    The correlation id is the request's, or a new one (then written into the request).
    """
    contract = operations.contracts[operation]
    correlation_id = ensure_correlation_id(getattr(request, "correlation_id", None))
    if hasattr(request, "correlation_id"):
        request = request.model_copy(update={"correlation_id": correlation_id})
    data = request.model_dump(mode="json")
    workflow_id = contract.workflow_id.format(**data)
    attributes = [
        SearchAttributePair(CORRELATION_ID, str(correlation_id)),
        SearchAttributePair(ONEX_OPERATION, operation),
        SearchAttributePair(ONEX_STATUS, OperationStatus.RUNNING.value),
    ]
    if "node_id" in data:
        attributes.append(SearchAttributePair(NODE_ID, str(data["node_id"])))
    return await client.start_workflow(
        OperationWorkflow.run,
        OperationInput(
            plan=operations.plans[operation], request=data, correlation_id=correlation_id
        ),
        id=workflow_id,
        task_queue=task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
        search_attributes=TypedSearchAttributes(attributes),
        memo={"operation": operation, "correlation_id": str(correlation_id)},
    )


async def _run(
    client: Client,
    settings: OnexSettings,
    operation: str,
    request: BaseModel,
    *,
    wait: bool,
    operations: Operations | None,
) -> OperationResult | WorkflowHandle[Any, OperationResult]:
    handle = await start_operation(
        client,
        operations or Operations.load(settings),
        operation,
        request,
        task_queue=settings.worker.task_queue,
    )
    if not wait:
        return handle
    return await result_of(handle)


async def result_of(handle: WorkflowHandle[Any, OperationResult]) -> OperationResult:
    """The operation's result; a failed compensation's result is read from its failure."""
    try:
        return await handle.result()
    except WorkflowFailureError as failure:
        cause = failure.cause
        if isinstance(cause, ApplicationError) and cause.type == CompensationFailedError.__name__:
            return OperationResult.model_validate(cause.details[0])
        raise


async def register_node(
    client: Client,
    request: RegisterNodeRequest,
    *,
    settings: OnexSettings,
    wait: bool = True,
    operations: Operations | None = None,
) -> Any:
    """Register a node (Consul and PostgreSQL at once); the result, or the handle if not wait."""
    return await _run(client, settings, "register_node", request, wait=wait, operations=operations)


async def deregister_node(
    client: Client,
    request: DeregisterNodeRequest,
    *,
    settings: OnexSettings,
    wait: bool = True,
    operations: Operations | None = None,
) -> Any:
    """Remove a node from Consul and deactivate it in PostgreSQL."""
    return await _run(
        client, settings, "deregister_node", request, wait=wait, operations=operations
    )


async def retry_failed(
    client: Client, workflow_id: str, backend: str | None = None
) -> OperationResult:
    """Re-run the failed backends of a partial operation (or one of them)."""
    handle = client.get_workflow_handle(workflow_id, result_type=OperationResult)
    try:
        return await handle.execute_update(OperationWorkflow.retry_failed, backend)
    except RPCError as error:
        if error.status != RPCStatusCode.NOT_FOUND:
            raise
    # Not found: either no such workflow, or one that has already closed.
    status = await get_status(client, workflow_id)
    raise OperationFinished(workflow_id, status.status)


async def get_status(client: Client, workflow_id: str) -> OperationResult:
    """The current (or final) status of an operation."""
    handle = client.get_workflow_handle(workflow_id, result_type=OperationResult)
    try:
        return await handle.query(OperationWorkflow.status)
    except RPCError as error:
        if error.status == RPCStatusCode.NOT_FOUND:
            raise OperationNotFound(workflow_id) from None
        raise
