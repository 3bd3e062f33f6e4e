"""The per-node workflow: at most one operation changes a node at a time.

A long-lived workflow per node (id ``onex-node-<node_id>``) receives every operation on that node
through the ``submit`` Update, sent with update-with-start, so one client call starts the node
workflow if needed, hands it the operation and (for the waiting helpers) returns the result. It
runs the operations one at a time, in the order they were accepted, each as a child
:class:`~workflows.operation.OperationWorkflow` under the operation's own workflow id, so the
operation keeps its history, its Updates (``retry_failed``, ``resume_compensation``) and its
place in the UI.

What happens to a request that arrives while another operation on the node is open:

* the same request (same :func:`~contracts.node.fingerprint`) attaches to the open one and gets
  its result; nothing runs twice;
* a different request waits its turn in the queue (bounded by
  :data:`~contracts.node.MAX_QUEUED`, and the callers waiting at once by
  :data:`~contracts.node.MAX_CALLERS`; beyond them the Update is refused, with the reason);
* a request whose contract ``supersedes`` the running operation (a deregister for a register
  waiting in ``partial``) closes that operation's retry window first: it compensates, then the
  new request runs.

The queue is workflow state, so it is durable; the ``state`` query and ``onex status
onex-node-<id>`` show it. The workflow ends after it has been idle for a while (a later request
starts it again) and continues as new when its history grows, only while nothing runs or waits.
"""

from __future__ import annotations

import asyncio
import contextlib
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.exceptions import (
    ApplicationError,
    CancelledError,
    ChildWorkflowError,
    WorkflowAlreadyStartedError,
)
from temporalio.workflow import ParentClosePolicy

with workflow.unsafe.imports_passed_through():
    from contracts.node import (
        MAX_CALLERS,
        MAX_QUEUED,
        NodeInput,
        NodeOperation,
        NodeState,
        Submission,
        fingerprint,
    )
    from contracts.operations_io import OperationInput, OperationResult, OperationStatus
    from contracts.search_attributes import NODE_ID, operation_attributes
    from workflows.operation import OperationWorkflow, result_in_failure

IDLE_TIMEOUT = timedelta(hours=1)
"""How long the node workflow waits for another operation before it ends."""


@dataclass
class _Entry:
    view: NodeOperation
    input: OperationInput


@workflow.defn
class NodeWorkflow:
    """Serializes the operations on one node; see the module docstring."""

    @workflow.init
    def __init__(self, node: NodeInput) -> None:
        # The input is taken here, not in run(): an update-with-start delivers the Update in
        # the first workflow task, and its validator needs to know the node.
        self._node = node
        self._running: _Entry | None = None
        self._child: workflow.ChildWorkflowHandle[OperationWorkflow, OperationResult] | None = None
        self._queue: list[_Entry] = []
        # Results of the operations finished in this run, by sequence, for the callers waiting.
        self._results: dict[int, OperationResult] = {}
        self._accepted = node.accepted
        self._completed = node.completed
        self._last = node.last
        self._signals: set[asyncio.Task[None]] = set()
        self._callers = 0  # submit Updates in flight

    @workflow.run
    async def run(self, node: NodeInput) -> NodeState:
        workflow.upsert_search_attributes([NODE_ID.value_set(str(node.node_id))])
        while True:
            if not self._queue:
                with contextlib.suppress(TimeoutError):
                    await workflow.wait_condition(lambda: bool(self._queue), timeout=IDLE_TIMEOUT)
            if not self._queue:
                # Idle: end once every caller has its answer, unless a request came meanwhile.
                await workflow.wait_condition(
                    lambda: bool(self._queue) or workflow.all_handlers_finished()
                )
                if not self._queue:
                    return self.state()
                continue
            entry = self._queue.pop(0)
            self._running = entry
            result = await self._run_operation(entry)
            self._results[entry.view.sequence] = result
            self._running = None
            self._child = None
            self._completed += 1
            self._last = {"workflow_id": entry.view.workflow_id, "status": result.status.value}
            finished_here = self._completed - node.completed
            if not self._queue and (
                finished_here >= node.continue_after
                or workflow.info().is_continue_as_new_suggested()
            ):
                await workflow.wait_condition(
                    lambda: bool(self._queue) or workflow.all_handlers_finished()
                )
                if not self._queue:
                    workflow.continue_as_new(
                        NodeInput(
                            node_id=node.node_id,
                            accepted=self._accepted,
                            completed=self._completed,
                            last=self._last,
                            continue_after=node.continue_after,
                        )
                    )

    @workflow.query
    def state(self) -> NodeState:
        node = self._node
        return NodeState(
            node_id=node.node_id,
            workflow_id=workflow.info().workflow_id,
            running=self._running.view if self._running else None,
            queued=[entry.view for entry in self._queue],
            accepted=self._accepted,
            completed=self._completed,
            last=self._last,
        )

    @workflow.update
    async def submit(self, submission: Submission) -> OperationResult:
        """Run the operation on this node after the ones before it; its result.

        An identical request already running or waiting is attached to instead.
        """
        self._callers += 1
        try:
            entry = self._open(fingerprint(submission.operation))
            if entry is None:
                entry = self._accept(submission)
            sequence = entry.view.sequence
            await workflow.wait_condition(lambda: sequence in self._results)
            return self._results[sequence]
        finally:
            self._callers -= 1

    @submit.validator
    def _validate_submit(self, submission: Submission) -> None:
        node = self._node
        operation = submission.operation
        node_id = operation.request.get("node_id")
        if str(node_id) != str(node.node_id):
            raise ValueError(
                f"this workflow serves node {node.node_id}; the request is for node {node_id}"
            )
        waiting = f"wait for them (onex status {workflow.info().workflow_id})"
        if self._callers >= MAX_CALLERS:
            raise ValueError(
                f"node {node.node_id} already has {self._callers} callers waiting (at most "
                f"{MAX_CALLERS}); {waiting}"
            )
        if self._open(fingerprint(operation)) is None and len(self._queue) >= MAX_QUEUED:
            raise ValueError(
                f"node {node.node_id} already has {len(self._queue)} operations waiting (at most "
                f"{MAX_QUEUED}); {waiting}"
            )

    # -- internals ---------------------------------------------------------------------------

    def _open(self, content: str) -> _Entry | None:
        """The running or waiting operation with this content, if any."""
        for entry in [self._running, *self._queue]:
            if entry is not None and entry.view.fingerprint == content:
                return entry
        return None

    def _accept(self, submission: Submission) -> _Entry:
        operation = submission.operation
        self._accepted += 1
        entry = _Entry(
            view=NodeOperation(
                sequence=self._accepted,
                workflow_id=submission.workflow_id,
                operation=operation.plan.operation,
                fingerprint=fingerprint(operation),
                correlation_id=operation.correlation_id,
                accepted_at=workflow.now(),
            ),
            input=operation,
        )
        self._queue.append(entry)
        running = self._running
        if (
            running is not None
            and self._child is not None
            and running.view.operation in operation.plan.supersedes
        ):
            reason = f"{operation.plan.operation} ({entry.view.workflow_id})"
            # Fire and forget: the operation acts on it only while it waits in partial.
            workflow.logger.info("%s supersedes %s", reason, running.view.workflow_id)
            signal = asyncio.create_task(self._supersede(self._child, reason))
            self._signals.add(signal)
            signal.add_done_callback(self._signals.discard)
        return entry

    @staticmethod
    async def _supersede(child: workflow.ChildWorkflowHandle[Any, Any], reason: str) -> None:
        """Signal the running operation that a later one overrides it; an operation that has
        just ended has nothing left to supersede (the signal finds no workflow)."""
        try:
            await child.signal(OperationWorkflow.supersede, reason)
        except ApplicationError as error:
            workflow.logger.info("supersede not delivered: %s", error)

    async def _run_operation(self, entry: _Entry) -> OperationResult:
        """Run the operation as a child workflow; its result, even when it failed or was
        cancelled (the callers waiting are owed an answer either way)."""
        operation = entry.input
        view = entry.view
        try:
            self._child = await workflow.start_child_workflow(
                OperationWorkflow.run,
                operation,
                id=view.workflow_id,
                # The operation must finish (and undo what it did) even if this workflow is
                # terminated; cancelling this workflow still cancels it (see below).
                parent_close_policy=ParentClosePolicy.ABANDON,
                search_attributes=operation_attributes(
                    view.operation, str(view.correlation_id), str(self._node.node_id)
                ),
                memo={"operation": view.operation, "correlation_id": str(view.correlation_id)},
            )
            return await self._child
        except WorkflowAlreadyStartedError:
            return self._unfinished(
                entry,
                f"a workflow {view.workflow_id} started outside this node's queue is still "
                "running; send the request again when it has ended",
            )
        except ChildWorkflowError as error:
            cause = error.cause
            failed = result_in_failure(cause)
            if failed is not None:
                return failed
            if isinstance(cause, CancelledError):
                return self._unfinished(
                    entry, "cancelled; whatever took effect was undone (see its workflow)"
                )
            return self._unfinished(entry, f"the operation ended without a result: {cause}")

    def _unfinished(self, entry: _Entry, reason: str) -> OperationResult:
        return OperationResult(
            operation=entry.view.operation,
            workflow_id=entry.view.workflow_id,
            status=OperationStatus.FAILED,
            backends=[],
            correlation_id=entry.view.correlation_id,
            duration_ms=0.0,
            failed_backends=[],
            reason=reason,
        )
