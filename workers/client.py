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

import contextlib
import functools
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import MappingProxyType
from typing import Any, TypeVar

from pydantic import BaseModel, TypeAdapter
from temporalio.client import (
    Client,
    WithStartWorkflowOperation,
    WorkflowFailureError,
    WorkflowHandle,
    WorkflowUpdateStage,
)
from temporalio.common import (
    SearchAttributePair,
    TypedSearchAttributes,
    WorkflowIDConflictPolicy,
    WorkflowIDReusePolicy,
)
from temporalio.runtime import Runtime
from temporalio.service import RPCError, RPCStatusCode, TLSConfig

from activities.base import SecretSource
from activities.resilience.correlation import ensure_correlation_id
from contracts.errors import ErrorContext, InfraError, OperationError, Transport
from contracts.fleet import Cached, FleetState, NodeView
from contracts.node import NodeInput, NodeState, Submission, node_workflow_id
from contracts.operation_contract import (
    OperationContract,
    OperationPlan,
    PlanError,
    compile_plan,
    supersedes_problems,
)
from contracts.operations_io import OperationInput, OperationResult, OperationStatus
from contracts.registry import DeregisterNodeRequest, RegisterNodeRequest
from contracts.search_attributes import NODE_ID, operation_attributes
from workers.contract_files import read_handlers, read_operations
from workers.converter import build_data_converter
from workers.interceptors import CorrelationInterceptor
from workers.settings import OnexSettings
from workflows.node import NodeWorkflow
from workflows.operation import OperationWorkflow, result_in_failure

T = TypeVar("T")


async def connect(
    settings: OnexSettings, *, runtime: Runtime | None = None, secrets: SecretSource | None = None
) -> Client:
    """A Temporal client with the project's data converter and correlation interceptor.

    The converter is :func:`~workers.converter.build_data_converter`'s: encrypting when
    ``settings.codec.enabled``, with the keys from ``secrets`` (or the configured secret store).
    Workers built from this client inherit the converter and the interceptor, so correlation
    ids flow from the client through workflows into activity logs.
    """
    temporal = settings.temporal
    api_key = temporal.api_key.get_secret_value() if temporal.api_key else None
    return await Client.connect(
        temporal.target,
        namespace=temporal.namespace,
        data_converter=await build_data_converter(settings, secrets=secrets),
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
            problems += supersedes_problems(contract, operations.contracts)
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
    request_id: str | None = None,
) -> OperationHandle:
    """Hand ``operation`` for ``request`` to Temporal; the handle once it is accepted.

    A request that names a node goes to that node's workflow (``onex-node-<node_id>``, started
    if need be) in one update-with-start call: it runs after the operations on the node before
    it, and an identical request still open is attached to, not run twice. Other requests
    start their operation workflow directly (a start for a still-running id attaches to it).

    The correlation id is the request's, or a new one (then written into the request). The
    plans are ``operations``, or the configured ones (:meth:`Operations.load`). ``request_id``
    makes a repeated send of the same request (a redelivered message) the same Update.
    """
    submission = _submission(operation, request, settings=settings, operations=operations)
    node_id = submission.operation.request.get("node_id")
    if node_id is None:
        return await _start_directly(client, submission, settings)
    async with _node_busy(node_id):
        update = await client.start_update_with_start_workflow(
            NodeWorkflow.submit,
            submission,
            start_workflow_operation=_node_start(node_id, settings),
            wait_for_stage=WorkflowUpdateStage.ACCEPTED,
            id=request_id,
        )
    # A refusal (the validator's: the node is full) comes back as an outcome already known at
    # acceptance: raise it now, not when the caller asks for the result (result() then reads
    # the known outcome without a call). The SDK has no public accessor for it.
    if getattr(update, "_known_outcome", None) is not None:
        await update.result()
    return OperationHandle(submission.workflow_id, node_workflow_id(node_id), update.result)


async def _start_directly(
    client: Client, submission: Submission, settings: OnexSettings
) -> OperationHandle:
    """Start an operation that names no node as its own workflow (attaching to a running one)."""
    workflow = await client.start_workflow(
        OperationWorkflow.run,
        submission.operation,
        id=submission.workflow_id,
        task_queue=settings.worker.task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        id_reuse_policy=WorkflowIDReusePolicy.ALLOW_DUPLICATE,
        search_attributes=_attributes(submission),
        memo=_memo(submission),
    )
    return OperationHandle(submission.workflow_id, None, lambda: _workflow_result(workflow))


async def run_operation(
    client: Client,
    operation: str,
    request: BaseModel,
    *,
    settings: OnexSettings,
    operations: Operations | None = None,
    request_id: str | None = None,
) -> OperationResult:
    """Run ``operation`` (as :func:`start_operation`) and wait for its result.

    For a node's operation this is one call: the update-with-start returns the result.
    """
    submission = _submission(operation, request, settings=settings, operations=operations)
    node_id = submission.operation.request.get("node_id")
    if node_id is None:
        return await (await _start_directly(client, submission, settings)).result()
    async with _node_busy(node_id):
        return await client.execute_update_with_start_workflow(
            NodeWorkflow.submit,
            submission,
            start_workflow_operation=_node_start(node_id, settings),
            id=request_id,
        )


class NodeBusy(OperationError, RuntimeError):
    """Temporal refused the request: the node's workflow has too many callers waiting."""


@contextlib.asynccontextmanager
async def _node_busy(node_id: str) -> AsyncIterator[None]:
    """Temporal's own cap on in-flight Updates, as a clear error (nothing was started)."""
    try:
        yield
    except RPCError as error:
        # The multi-operation's own error says only "could not be executed"; its status is
        # RESOURCE_EXHAUSTED when the cap on in-flight Updates was reached.
        if error.status != RPCStatusCode.RESOURCE_EXHAUSTED:
            raise
        raise NodeBusy(
            f"node {node_id} has too many requests waiting; nothing was started: try again "
            f"when its operations have ended (onex status {node_workflow_id(node_id)})"
        ) from None


_OperationWorkflowHandle = WorkflowHandle[OperationWorkflow, OperationResult]


@dataclass(frozen=True)
class OperationHandle:
    """An accepted operation: ``await handle.result()`` (or :func:`result_of`) for its result.

    ``id`` is the operation's workflow id, which ``onex status``, :func:`get_status` and
    :func:`retry_failed` take; ``node_workflow_id`` is the node workflow that runs it in turn
    (None for an operation that names no node).
    """

    id: str
    node_workflow_id: str | None
    _result: Callable[[], Awaitable[OperationResult]] = field(repr=False)

    async def result(self) -> OperationResult:
        return await self._result()


async def result_of(handle: OperationHandle | _OperationWorkflowHandle) -> OperationResult:
    """The operation's result; a failed compensation's result is read from its failure."""
    if isinstance(handle, OperationHandle):
        return await handle.result()
    return await _workflow_result(handle)


async def _workflow_result(handle: _OperationWorkflowHandle) -> OperationResult:
    try:
        return await handle.result()
    except WorkflowFailureError as failure:
        failed = result_in_failure(failure.cause)
        if failed is None:
            raise
        return failed


def _submission(
    operation: str,
    request: BaseModel,
    *,
    settings: OnexSettings,
    operations: Operations | None,
) -> Submission:
    if operations is None:
        operations = Operations.load(settings)
    contract = operations.contracts[operation]
    correlation_id = ensure_correlation_id(getattr(request, "correlation_id", None))
    if hasattr(request, "correlation_id"):
        request = request.model_copy(update={"correlation_id": correlation_id})
    data = request.model_dump(mode="json")
    return Submission(
        workflow_id=contract.workflow_id.format(**data),
        operation=OperationInput(
            plan=operations.plans[operation], request=data, correlation_id=correlation_id
        ),
    )


def _attributes(submission: Submission) -> TypedSearchAttributes:
    operation = submission.operation
    node_id = operation.request.get("node_id")
    return operation_attributes(
        operation.plan.operation,
        str(operation.correlation_id),
        None if node_id is None else str(node_id),
    )


def _memo(submission: Submission) -> dict[str, str]:
    operation = submission.operation
    return {"operation": operation.plan.operation, "correlation_id": str(operation.correlation_id)}


def _node_start(node_id: str, settings: OnexSettings) -> WithStartWorkflowOperation[Any, Any]:
    return WithStartWorkflowOperation(
        NodeWorkflow.run,
        NodeInput(node_id=uuid.UUID(str(node_id))),
        id=node_workflow_id(node_id),
        task_queue=settings.worker.task_queue,
        id_conflict_policy=WorkflowIDConflictPolicy.USE_EXISTING,
        search_attributes=TypedSearchAttributes([SearchAttributePair(NODE_ID, str(node_id))]),
    )


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
    return await run_operation(
        client, "register_node", request, settings=settings, operations=operations
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
    return await run_operation(
        client, "deregister_node", request, settings=settings, operations=operations
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
    send: Callable[
        [WorkflowHandle[OperationWorkflow, OperationResult]], Awaitable[OperationResult]
    ],
) -> OperationResult:
    """Send an Update; a closed (or missing) workflow says so instead of a bare NOT_FOUND."""
    handle: _OperationWorkflowHandle = client.get_workflow_handle(
        workflow_id, result_type=OperationResult
    )
    try:
        return await send(handle)
    except RPCError as error:
        if error.status != RPCStatusCode.NOT_FOUND:
            raise
    # Not found: either no such workflow, or one that has already closed.
    status = await get_status(client, workflow_id)
    raise OperationFinished(workflow_id, status.status, action)


async def get_status(client: Client, workflow_id: str) -> OperationResult:
    """The current (or final) status of an operation; ``queued`` while it waits its turn."""
    handle = client.get_workflow_handle(workflow_id, result_type=OperationResult)
    try:
        return await handle.query(OperationWorkflow.status)
    except RPCError as error:
        if error.status != RPCStatusCode.NOT_FOUND:
            raise
    waiting = await _queued(client, workflow_id)
    if waiting is None:
        raise OperationNotFound(workflow_id)
    return waiting


async def _queued(client: Client, workflow_id: str) -> OperationResult | None:
    """The operation ``workflow_id`` as its node's workflow holds it, if it waits there.

    Operation workflow ids end with the node id (the contracts' ``...-{node_id}``), and an
    accepted operation has no workflow of its own until its turn comes.
    """
    try:
        node_id = uuid.UUID(workflow_id[-36:])
        state = await get_node_state(client, node_id)
    except (ValueError, OperationNotFound):
        return None
    for ahead, entry in enumerate(([state.running] if state.running else []) + state.queued):
        if entry.workflow_id == workflow_id:
            return OperationResult(
                operation=entry.operation,
                workflow_id=workflow_id,
                status=OperationStatus.QUEUED,
                backends=[],
                correlation_id=entry.correlation_id,
                duration_ms=0.0,
                failed_backends=[],
                reason=(
                    f"waiting behind {ahead} operation(s) on node {node_id}: "
                    f"onex status {state.workflow_id}"
                    if ahead
                    else "accepted; its workflow is starting"
                ),
            )
    return None


async def get_node_state(client: Client, node_id: uuid.UUID | str) -> NodeState:
    """What the node's workflow runs and has waiting (``node_id``, or its workflow id)."""
    workflow_id = str(node_id)
    if not workflow_id.startswith(node_workflow_id("")):
        workflow_id = node_workflow_id(node_id)
    handle = client.get_workflow_handle(workflow_id, result_type=NodeState)
    try:
        return await handle.query(NodeWorkflow.state)
    except RPCError as error:
        if error.status == RPCStatusCode.NOT_FOUND:
            raise OperationNotFound(workflow_id) from None
        raise


class NodeNotFound(OperationError, LookupError):
    """The registry has no node with that id."""


_REGISTRY_READ = ErrorContext(
    transport=Transport.DATABASE, operation="read_fleet", target="postgresql-primary"
)


async def list_nodes(
    settings: OnexSettings,
    *,
    state: FleetState | None = None,
    secrets: SecretSource | None = None,
    limit: int = 10_000,
) -> Cached[list[NodeView]]:
    """The registry's nodes with their liveness (``state``: only active, unhealthy or inactive),
    and where the answer came from (``.value``, ``.stale``, ``.source``, ``.age_seconds``).

    Reads PostgreSQL (:func:`activities.liveness.read_fleet`, imported here so that a process
    that only starts operations does not load asyncpg), through the Valkey cache when
    ``ONEX_VALKEY__ADDRESS`` is set (:func:`_read_registry`). Each ``state`` and ``limit`` is
    an entry of its own.
    """
    from activities.liveness import read_fleet

    return await _read_registry(
        settings,
        namespace="registry.nodes",
        key=f"{state.value if state else 'all'}:{limit}",
        adapter=TypeAdapter(list[NodeView]),
        loader=lambda: read_fleet(settings.postgres, secrets=secrets, state=state, limit=limit),
        secrets=secrets,
    )


async def get_node(
    settings: OnexSettings,
    node_id: uuid.UUID,
    *,
    client: Client | None = None,
    secrets: SecretSource | None = None,
) -> Cached[NodeView]:
    """One node, and where the answer came from (as :func:`list_nodes`); with the operation
    open on it when ``client`` is given (asked of its node workflow, never cached).

    An unknown node raises :class:`NodeNotFound` (never cached: the registry is asked again).
    """
    from activities.liveness import read_fleet

    async def load() -> NodeView:
        found = await read_fleet(settings.postgres, secrets=secrets, node_id=node_id, limit=1)
        if not found:
            raise NodeNotFound(f"the registry has no node {node_id}: onex nodes list shows them")
        return found[0]

    answer = await _read_registry(
        settings,
        namespace="registry.node",
        key=str(node_id),
        adapter=TypeAdapter(NodeView),
        loader=load,
        secrets=secrets,
    )
    if client is None:
        return answer
    try:
        state = await get_node_state(client, node_id)
    except (OperationNotFound, RPCError):  # no node workflow, or no worker to answer
        return answer
    running = state.running or (state.queued[0] if state.queued else None)
    node = answer.value.model_copy(
        update={"open_operation": running.workflow_id if running else None}
    )
    return replace(answer, value=node)


async def _read_registry(
    settings: OnexSettings,
    *,
    namespace: str,
    key: str,
    adapter: TypeAdapter[T],
    loader: Callable[[], Awaitable[T]],
    secrets: SecretSource | None = None,
) -> Cached[T]:
    """``loader()`` (a registry query) through the Valkey read-through cache, when Valkey is
    configured; without it, the query alone (no other I/O).

    An entry is fresh for ``ONEX_VALKEY__CACHE_TTL`` seconds. While PostgreSQL is unreachable
    the last answer (kept ``ONEX_VALKEY__CACHE_KEEP`` seconds) comes back marked stale; while
    Valkey is, the query answers, fresh (:class:`activities.cache.ReadThroughCache`). An
    unreachable PostgreSQL with nothing cached raises the outage as the error tree's class
    (:class:`~contracts.errors.InfraConnectionError`, ``InfraTimeoutError`` or
    ``InfraUnavailableError``); a refusal (a missing table, ...) is raised as it is.
    """
    from activities.cache import ReadThroughCache, is_outage
    from activities.resilience.classify import classify

    valkey = settings.valkey
    connection = None
    if valkey.enabled:
        from activities.valkey import connect_valkey

        connection = await connect_valkey(valkey, secrets, client_name="onex-client")
    cache = ReadThroughCache(
        connection,
        namespace=namespace,
        adapter=adapter,
        ttl_seconds=valkey.cache_ttl,
        keep_seconds=valkey.cache_keep,
        prefix=valkey.key_prefix,
    )
    try:
        return await cache.get(key, loader)
    except Exception as exc:
        if isinstance(exc, InfraError) or not is_outage(exc):
            raise
        raise classify(exc, _REGISTRY_READ) from exc
    finally:
        if connection is not None:
            await connection.aclose()
