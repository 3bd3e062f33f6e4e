"""The client helpers users import to start and watch operations.

::

    from workers.client import connect, register_node, result_of, start_register_node
    from workers.settings import load_settings
    from contracts.registry import RegisterNodeRequest

    settings = load_settings()
    client = await connect(settings)
    result = await register_node(client, RegisterNodeRequest(...), settings=settings)
    print(result.status, result.failed_backends)
    handle = await start_register_node(client, RegisterNodeRequest(...), settings=settings)
    result = await result_of(handle)  # later, or elsewhere

Each operation has a pair: ``<operation>`` waits for the :class:`OperationResult`,
``start_<operation>`` returns the typed :data:`OperationHandle` at once.

This module is light: it reads the contracts (schema checks only, through
:mod:`workers.contract_files`) and never imports a handler class, so a process that only starts
operations does not load asyncpg, aiokafka, consul or hvac. The worker checks the classes.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TypeAlias

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
from contracts.operation_contract import OperationContract, OperationPlan, PlanError, compile_plan
from contracts.operations_io import OperationInput, OperationResult, OperationStatus
from contracts.registry import DeregisterNodeRequest, RegisterNodeRequest
from contracts.search_attributes import CORRELATION_ID, NODE_ID, ONEX_OPERATION, ONEX_STATUS
from workers.contract_files import read_handlers, read_operations
from workers.converter import DATA_CONVERTER
from workers.interceptors import CorrelationInterceptor
from workers.settings import OnexSettings
from workflows.operation import OperationWorkflow

OperationHandle: TypeAlias = WorkflowHandle[OperationWorkflow, OperationResult]
"""A started operation: ``await result_of(handle)`` for its result, ``handle.id`` to find it."""


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
    """The operation has ended, so it can no longer be retried (or resumed); ``status`` says how."""

    def __init__(self, workflow_id: str, status: OperationStatus, action: str = "retry") -> None:
        super().__init__(
            f"nothing to {action}: operation {workflow_id} has finished ({status.value})"
        )
        self.status = status


@dataclass(frozen=True)
class Operations:
    """The compiled plans of the operation contracts, by operation name (read-only mappings).

    :meth:`load` compiles the configured contracts once per process and returns the same
    object afterwards: the plans depend only on the contract files, not on the Temporal
    connection, so every client and every call shares them, and the helpers keep their plain
    ``(client, request, settings=...)`` form with no client object to build and carry. The
    cache key is the configured contract paths (made absolute), so settings that point
    elsewhere get their own plans. Like the worker, which reads its contracts at start, a
    process sees a contract change when it starts again (or through :meth:`compile`).
    """

    plans: Mapping[str, OperationPlan]
    contracts: Mapping[str, OperationContract]

    @classmethod
    def load(cls, settings: OnexSettings) -> Operations:
        """The configured operations, compiled on the first call and reused after that.

        Raises :class:`~contracts.operation_contract.PlanError` (not cached) when a contract
        cannot be read or does not fit the handler contracts it names.
        """
        worker = settings.worker
        return _compiled(_absolute(worker.contract_paths), _absolute(worker.operation_paths))

    @classmethod
    def compile(
        cls, *, handler_paths: Sequence[Path], operation_paths: Sequence[Path]
    ) -> Operations:
        """Read the contracts under the paths and compile every operation, now (no cache).

        Schema checks only: handler classes are neither imported nor checked (the worker does
        that), so this needs none of the backend libraries. Every problem is listed at once.
        """
        handlers = read_handlers(handler_paths)
        operations = read_operations(operation_paths)
        problems = [refused.message for refused in (*handlers.refused, *operations.refused)]
        plans = {}
        for name, contract in operations.contracts.items():
            try:
                plans[name] = compile_plan(contract, handlers.contracts)
            except PlanError as error:
                problems.append(error.message)
        if problems:
            raise PlanError(f"the contracts are invalid: {'; '.join(problems)}")
        return cls(
            plans=MappingProxyType(plans), contracts=MappingProxyType(dict(operations.contracts))
        )


def _absolute(paths: Sequence[Path]) -> tuple[Path, ...]:
    # Lexical only (no file system access), so glob patterns keep their meaning.
    return tuple(path.absolute() for path in paths)


@functools.cache
def _compiled(handler_paths: tuple[Path, ...], operation_paths: tuple[Path, ...]) -> Operations:
    return Operations.compile(handler_paths=handler_paths, operation_paths=operation_paths)


async def start_operation(
    client: Client,
    operation: str,
    request: BaseModel,
    *,
    settings: OnexSettings,
    operations: Operations | None = None,
) -> OperationHandle:
    """Start ``operation`` for ``request``; a start for a still-running id attaches to it.

    The correlation id is the request's, or a new one (then written into the request). The
    plans are ``operations``, or the configured ones (:meth:`Operations.load`).
    """
    if operations is None:
        operations = Operations.load(settings)
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
        task_queue=settings.worker.task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
        search_attributes=TypedSearchAttributes(attributes),
        memo={"operation": operation, "correlation_id": str(correlation_id)},
    )


async def run_operation(
    client: Client,
    operation: str,
    request: BaseModel,
    *,
    settings: OnexSettings,
    operations: Operations | None = None,
) -> OperationResult:
    """Start ``operation`` (as :func:`start_operation`) and wait for its result."""
    handle = await start_operation(
        client, operation, request, settings=settings, operations=operations
    )
    return await result_of(handle)


async def result_of(handle: OperationHandle) -> OperationResult:
    """The operation's result; a failed compensation's result is read from its failure."""
    try:
        return await handle.result()
    except WorkflowFailureError as failure:
        cause = failure.cause
        if isinstance(cause, ApplicationError) and cause.type == CompensationFailedError.__name__:
            return OperationResult.model_validate(cause.details[0])
        raise


async def start_register_node(
    client: Client,
    request: RegisterNodeRequest,
    *,
    settings: OnexSettings,
    operations: Operations | None = None,
) -> OperationHandle:
    """Start registering a node (Consul and PostgreSQL at once); the handle, at once."""
    return await start_operation(
        client, "register_node", request, settings=settings, operations=operations
    )


async def register_node(
    client: Client,
    request: RegisterNodeRequest,
    *,
    settings: OnexSettings,
    operations: Operations | None = None,
) -> OperationResult:
    """Register a node (Consul and PostgreSQL at once) and wait for the result."""
    return await result_of(
        await start_register_node(client, request, settings=settings, operations=operations)
    )


async def start_deregister_node(
    client: Client,
    request: DeregisterNodeRequest,
    *,
    settings: OnexSettings,
    operations: Operations | None = None,
) -> OperationHandle:
    """Start removing a node from Consul and deactivating it in PostgreSQL; the handle."""
    return await start_operation(
        client, "deregister_node", request, settings=settings, operations=operations
    )


async def deregister_node(
    client: Client,
    request: DeregisterNodeRequest,
    *,
    settings: OnexSettings,
    operations: Operations | None = None,
) -> OperationResult:
    """Remove a node from Consul and deactivate it in PostgreSQL, and wait for the result."""
    return await result_of(
        await start_deregister_node(client, request, settings=settings, operations=operations)
    )


async def retry_failed(
    client: Client, workflow_id: str, backend: str | None = None
) -> OperationResult:
    """Re-run the failed backends of a partial operation (or one of them)."""
    return await _update(
        client,
        workflow_id,
        "retry",
        lambda h: h.execute_update(OperationWorkflow.retry_failed, backend),
    )


async def resume_compensation(client: Client, workflow_id: str) -> OperationResult:
    """Re-run the stuck compensations of a ``compensation_paused`` operation."""
    return await _update(
        client,
        workflow_id,
        "resume",
        lambda h: h.execute_update(OperationWorkflow.resume_compensation),
    )


async def abandon_compensation(client: Client, workflow_id: str, reason: str) -> OperationResult:
    """Give up on a paused operation's stuck compensations; it ends ``compensation_failed``."""
    return await _update(
        client,
        workflow_id,
        "abandon",
        lambda h: h.execute_update(OperationWorkflow.abandon, reason),
    )


async def _update(
    client: Client,
    workflow_id: str,
    action: str,
    send: Callable[[OperationHandle], Awaitable[OperationResult]],
) -> OperationResult:
    """Send an Update; a closed (or missing) workflow says so instead of a bare NOT_FOUND."""
    handle: OperationHandle = client.get_workflow_handle(workflow_id, result_type=OperationResult)
    try:
        return await send(handle)
    except RPCError as error:
        if error.status != RPCStatusCode.NOT_FOUND:
            raise
    # Not found: either no such workflow, or one that has already closed.
    status = await get_status(client, workflow_id)
    raise OperationFinished(workflow_id, status.status, action)


async def get_status(client: Client, workflow_id: str) -> OperationResult:
    """The current (or final) status of an operation."""
    handle: OperationHandle = client.get_workflow_handle(workflow_id, result_type=OperationResult)
    try:
        return await handle.query(OperationWorkflow.status)
    except RPCError as error:
        if error.status == RPCStatusCode.NOT_FOUND:
            raise OperationNotFound(workflow_id) from None
        raise
