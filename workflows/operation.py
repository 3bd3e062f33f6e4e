"""The operation workflow: runs a plan compiled from an operation contract (SPEC §3.2 to §4.4).

Steps run as the activities ``<handler>.<operation>``, in parallel or in sequence, each with its
handler's retry policy and timeouts. The outcome aggregates to success, partial or failed; a
step whose backend is disabled is reported as skipped, with the reason, and never as a success.

* ``all_or_nothing``: any failure compensates the succeeded steps at once.
* ``all_or_partial``: the workflow stays open in ``partial`` for the retry window. The Update
  ``retry_failed(backend)`` re-runs only the failed steps (or one of them); succeeded steps are
  never repeated. When the window expires, the succeeded steps are compensated.
* Cancellation waits for steps in flight and for a running retry, compensates everything on
  the stack (shielded), then the workflow ends cancelled. A cancel is latched once the
  workflow is idle (so replay sees it after the results of the same workflow task, as the
  first run did) and acted on at durable points only: after the steps and while waiting for a
  retry. One that arrives once the outcome is settled reports the outcome.
* Every compensation is fenced (the activities compare against what this run wrote): one that
  finds newer work by another run changes nothing and reports ``superseded``, and the step is
  shown superseded with the reason, never as a failure. A step that finally failed in a way
  that may have reached its backend (a retryable error, a timeout) pushes an *ambiguous*
  compensation, which undoes only what the run's recorded pre-image shows it wrote; an
  operation whose steps all failed runs those before it ends. A refusal pushes nothing.
* A compensation that fails after its budget (bounded by time, not attempts) pauses the
  operation in ``compensation_paused``: it stays open, lists what is stuck and why, and waits
  for an operator's ``resume_compensation`` or ``abandon(reason)`` Update.

Events (started, the outcome, completed or failed) are queued in the outbox through a local
activity (an activity the worker runs inside the workflow task, so an event costs no server round
trip: docs/decisions.md), with ids from ``workflow.uuid4()`` so that a replay produces the same
events and a repeated write inserts nothing. Event writes are bounded by time (24 h); one that
still fails is listed in ``undelivered_events``, never dropped silently.

Replay safety: users upgrade workers while operations run, so every behaviour change below is
guarded by ``workflow.patched`` with the reason beside it, and every committed golden history
(tests/histories) keeps replaying. The search
attributes ``OnexOperation``, ``OnexStatus`` and ``NodeId`` stay current, and the memo holds the
per-backend summary the Temporal UI shows.
"""

from __future__ import annotations

import asyncio
import dataclasses
from datetime import timedelta
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError, ApplicationError, RetryState
from temporalio.exceptions import TimeoutError as ActivityTimeoutError

with workflow.unsafe.imports_passed_through():
    from contracts.errors import CompensationFailedError
    from contracts.events import new_envelope
    from contracts.operation_contract import PlanStep
    from contracts.operations_io import (
        BackendResult,
        OperationInput,
        OperationResult,
        OperationStatus,
        StepStatus,
        event_payload,
    )
    from contracts.registry import CompensationInput, UndoAction
    from contracts.resilience import RESULT_ATTEMPT_KEY
    from contracts.search_attributes import CORRELATION_ID, NODE_ID, ONEX_OPERATION, ONEX_STATUS
    from contracts.topics import TopicName
    from workflows.saga import Compensation, Saga, Undone


# Patch ids: each names one behaviour change. Never rename or reuse one; remove a patch only
# when no workflow that started before it can still be running (see docs/operations.md).
# A cancel seen while the started event was being queued used to run both steps, then undo them.
PATCH_CANCEL_BEFORE_STEPS = "onex-cancel-before-steps-writes-nothing"
# A cancel during the last events of a successful operation used to report an undo that never ran.
PATCH_CANCEL_AFTER_SUCCESS = "onex-cancel-after-success-reports-success"
# A cancel during a retry_failed Update used to compensate before the retried step had ended,
# so that step's compensation was never pushed and its effect stayed behind.
PATCH_CANCEL_WAITS_FOR_RETRY = "onex-cancel-waits-for-running-retry"
# Event writes used to give up after the event policy's attempts and drop the event.
PATCH_PATIENT_EVENTS = "onex-events-bounded-by-time"
# A failed compensation used to end the workflow; it now pauses for an operator.
PATCH_COMPENSATION_PAUSE = "onex-compensation-pauses-for-operator"
# A compensation's result used to be ignored: an undo that found newer work by another run and
# changed nothing was reported compensated. It is now reported superseded, with the reason.
PATCH_SUPERSEDED_UNDO = "onex-undo-superseded-by-newer-work"
# A step that finally failed after its write may have landed (a retryable error, a timeout) was
# never undone, leaving e.g. an orphaned Consul service: it now pushes a fenced, ambiguous
# compensation, and an operation whose steps all failed runs those before it ends.
PATCH_AMBIGUOUS_UNDO = "onex-ambiguous-failures-are-undone"
# Each event write used to be an activity of its own: a server round trip apiece (started, the
# outcome, completed), three of the four sequential round trips of a register_node. They are
# now local activities, run by this worker inside the workflow task that emits them (recorded
# as markers, so the command sequence differs: hence the patch). Same ids, same patience.
PATCH_LOCAL_EVENTS = "onex-events-queued-in-the-workflow-task"
# A cancel interrupted the workflow wherever it was waiting, and what came next depended on
# when it arrived relative to a result in the same workflow task. Replay does not always keep
# that order: it can resolve an event write (a local activity) before a cancel that arrived
# while a lost worker ran it, and it can hand a worker that kept the run cached a step's result
# and a cancel one after the other where a fresh replay gets them together. Either way the
# history stopped replaying (found by the chaos runner). Now a cancel is latched once the
# workflow is idle and acted on at durable points only: after the steps, while waiting for a
# retry, and not at all once the outcome is settled (before the last events).
PATCH_CANCEL_AT_DURABLE_POINTS = "onex-cancel-acted-on-at-durable-points"

PATIENT_BUDGET = timedelta(hours=24)
"""How long an event write or a compensation keeps trying before it asks for an operator."""
PATIENT_MAX_INTERVAL = timedelta(minutes=5)
"""The longest wait between two attempts of a patient activity."""

WORKFLOW_STARTED = TopicName.REGISTRY_WORKFLOW_STARTED
WORKFLOW_COMPLETED = TopicName.REGISTRY_WORKFLOW_COMPLETED
WORKFLOW_FAILED = TopicName.REGISTRY_WORKFLOW_FAILED


@workflow.defn
class OperationWorkflow:
    """Runs one orchestrated operation from its compiled plan."""

    def __init__(self) -> None:
        self._input: OperationInput | None = None
        self._results: dict[str, BackendResult] = {}
        self._status = OperationStatus.RUNNING
        self._saga = Saga()
        self._retrying = False
        self._compensating = False
        # A cancellation request seen while a step, event or compensation was finishing: the
        # activity is allowed to end (so its outcome is known and can be undone), then the
        # workflow compensates and ends cancelled.
        self._cancel_requested = False
        self._failed_compensations: list[str] = []
        self._reason: str | None = None
        self._undelivered_events: list[str] = []
        self._emitted: set[str] = set()
        # Operator decisions while paused: resume re-runs the stuck compensations, abandon ends.
        self._resume_requested = False
        self._abandon_reason: str | None = None
        self._compensation_rounds = 0
        # Set by the node workflow when a later operation overrides this one (a deregister of
        # the node): a retry window still open closes now and compensates.
        self._superseded_by: str | None = None
        # PATCH_CANCEL_AT_DURABLE_POINTS: a cancel is latched (into _cancel_requested) rather
        # than delivered where the operation waits.
        self._durable = False

    @workflow.run
    async def run(self, operation: OperationInput) -> OperationResult:
        self._input = operation
        self._results = {
            step.backend: BackendResult(backend=step.backend) for step in operation.plan.steps
        }
        self._publish_attributes(initial=True)
        # Asked before the first await, where every run (and its replay) asks it.
        self._durable = workflow.patched(PATCH_CANCEL_AT_DURABLE_POINTS)
        if not self._durable:
            return await self._operate(operation)
        # The operation runs in a task that a cancel never interrupts: the request is latched
        # (see _latch_cancel) and acted on where the operation looks for it.
        body = asyncio.create_task(self._operate(operation))
        while True:
            try:
                return await asyncio.shield(body)
            except asyncio.CancelledError:
                if body.done():
                    return body.result()  # its own outcome, a cancelled end included
                await self._latch_cancel()

    async def _latch_cancel(self) -> None:
        """Record a cancel request once the workflow is idle, never in the middle of a step.

        A cancel that arrives in the same workflow task as a step's result can reach the
        workflow with that result (on replay) or after it (when a worker that kept the run in
        its cache picks the task up): latched once every task has run to its next wait, it is
        seen after the result either way, so both take the same path.
        """
        while True:
            try:
                await workflow.wait_condition(lambda: True)
                break
            except asyncio.CancelledError:
                continue  # a second request while latching the first
        self._cancel_requested = True

    async def _operate(self, operation: OperationInput) -> OperationResult:
        try:
            await self._emit(WORKFLOW_STARTED)
            if (
                not self._durable
                and self._cancel_requested
                and workflow.patched(PATCH_CANCEL_BEFORE_STEPS)
            ):
                raise asyncio.CancelledError("cancelled before any step started")
            await self._run_steps([step.backend for step in operation.plan.steps])
            self._aggregate()
            if self._status is OperationStatus.PARTIAL:
                if operation.plan.aggregation == "all_or_nothing":
                    await self._compensate()
                else:
                    await self._await_retries(operation.plan.retry_window_seconds)
            elif (
                self._status is OperationStatus.FAILED
                and self._saga.stack  # only ambiguous entries: nothing succeeded
                and workflow.patched(PATCH_AMBIGUOUS_UNDO)
            ):
                await self._compensate()
        except asyncio.CancelledError:
            workflow.logger.info("cancelled: compensating the steps that succeeded")
            self._cancel_requested = True
            if workflow.patched(PATCH_CANCEL_WAITS_FOR_RETRY):
                # The retried step must end (and push its compensation) before the stack drains.
                await workflow.wait_condition(lambda: not self._retrying)
            await self._compensate()
        # The outcome is settled: a cancel that arrives during the last events changes nothing.
        cancelled = self._cancel_requested
        await self._finish()
        if cancelled if self._durable else self._cancel_requested:
            if self._status is OperationStatus.SUCCESS and workflow.patched(
                PATCH_CANCEL_AFTER_SUCCESS
            ):
                return self.status()  # the cancel came after the work was done: nothing undone
            raise asyncio.CancelledError("the operation was cancelled; succeeded steps were undone")
        if self._status is OperationStatus.COMPENSATION_FAILED:
            raise ApplicationError(
                f"compensation failed for {', '.join(self._failed_compensations)}: "
                "the backends may hold half-done work; see the workflow's result details",
                self.status().model_dump(mode="json"),
                type=CompensationFailedError.__name__,
                non_retryable=True,
            )
        return self.status()

    @workflow.query
    def status(self) -> OperationResult:
        """The operation as it stands: overall status and one result per backend."""
        operation = self._require_input()
        started = workflow.info().start_time
        return OperationResult(
            operation=operation.plan.operation,
            workflow_id=workflow.info().workflow_id,
            status=self._status,
            backends=list(self._results.values()),
            correlation_id=operation.correlation_id,
            duration_ms=round((workflow.now() - started).total_seconds() * 1000, 3),
            failed_backends=self._failed_backends(),
            failed_compensations=list(self._failed_compensations),
            reason=self._reason,
            undelivered_events=list(self._undelivered_events),
        )

    @workflow.update
    async def retry_failed(self, backend: str | None = None) -> OperationResult:
        """Re-run the failed steps (or only ``backend``); succeeded steps are never repeated."""
        self._retrying = True
        try:
            targets = [backend] if backend else self._failed_backends()
            # In a sequence, the steps that never ran after a failure follow the retried one.
            targets += [name for name in self._pending_backends() if name not in targets]
            await self._run_steps(targets)
            self._aggregate()
            self._publish_attributes()
        finally:
            self._retrying = False
        return self.status()

    @retry_failed.validator
    def _validate_retry(self, backend: str | None = None) -> None:
        if self._compensating or self._cancel_requested:
            raise ValueError("nothing to retry: the operation is being compensated")
        if self._superseded_by is not None:
            raise ValueError(f"nothing to retry: superseded by {self._superseded_by}")
        if self._require_input().plan.aggregation == "all_or_nothing":
            raise ValueError("nothing to retry: this operation is all or nothing")
        if self._status is not OperationStatus.PARTIAL or self._retrying:
            raise ValueError(
                f"nothing to retry: the operation is {self._status.value}"
                + (" and a retry is already running" if self._retrying else "")
            )
        if backend is None:
            return
        if backend not in self._results:
            raise ValueError(
                f"unknown backend {backend!r}; this operation's backends are: "
                f"{', '.join(self._results)}"
            )
        if backend not in self._failed_backends():
            raise ValueError(
                f"backend {backend!r} did not fail ({self._results[backend].status.value}); "
                f"failed backends: {', '.join(self._failed_backends()) or 'none'}"
            )

    @workflow.signal
    def supersede(self, reason: str) -> None:
        """A later operation overrides this one: stop waiting for a retry and compensate.

        Sent by the node workflow. It matters only while the operation waits in ``partial``;
        an operation still running its steps ends as it would, and the later one runs after.
        """
        self._superseded_by = reason

    @workflow.update
    async def resume_compensation(self) -> OperationResult:
        """Re-run the stuck compensations of a paused operation (after the cause is fixed)."""
        round_before = self._compensation_rounds
        self._resume_requested = True
        await workflow.wait_condition(lambda: self._compensation_rounds > round_before)
        return self.status()

    @resume_compensation.validator
    def _validate_resume(self) -> None:
        self._require_paused("resume")

    @workflow.update
    async def abandon(self, reason: str) -> OperationResult:
        """Give up on the stuck compensations: the operation ends compensation_failed."""
        self._abandon_reason = reason
        await workflow.wait_condition(
            lambda: self._status is not OperationStatus.COMPENSATION_PAUSED
        )
        return self.status()

    @abandon.validator
    def _validate_abandon(self, reason: str) -> None:
        self._require_paused("abandon")
        if not reason.strip():
            raise ValueError("abandon needs a reason: say why the stuck work may stay behind")

    def _require_paused(self, action: str) -> None:
        if self._status is not OperationStatus.COMPENSATION_PAUSED:
            raise ValueError(f"nothing to {action}: the operation is {self._status.value}")
        if self._resume_requested or self._abandon_reason is not None:
            raise ValueError(f"nothing to {action}: an operator decision is being carried out")

    # -- steps -------------------------------------------------------------------------------

    async def _run_steps(self, backends: list[str]) -> None:
        plan = self._require_input().plan
        steps = [plan.step(backend) for backend in backends]
        if plan.execution_mode == "parallel":
            await asyncio.gather(*(self._run_step(step) for step in steps))
        else:
            for step in steps:
                await self._run_step(step)
                if self._cancel_requested:
                    break
                if self._results[step.backend].status is StepStatus.FAILED:
                    break  # later steps depend on earlier ones in a sequence
        if self._cancel_requested:
            raise asyncio.CancelledError("cancelled while steps were running")

    async def _run_step(self, step: PlanStep) -> None:
        operation = self._require_input()
        started = workflow.now()
        outcome = self._results[step.backend]
        try:
            result: dict[str, Any] = await self._activity(
                step.activity, operation.request, result_type=dict, **step.policy.activity_options()
            )
        except ActivityError as error:
            cause = error.cause
            details = _details(cause)
            outcome = outcome.model_copy(
                update={
                    "status": StepStatus.FAILED,
                    "success": False,
                    "error_type": cause.type if isinstance(cause, ApplicationError) else None,
                    "error_code": details.get("code"),
                    "error": details.get("message") or str(cause or error),
                    "attempts": outcome.attempts + _attempts_of(error),
                }
            )
            self._push_ambiguous(step, error)
        else:
            # Temporal's attempt number, as the boundary reported it; results recorded before
            # it did (and skipped steps, which do not pass through it) took one attempt.
            # Reading a result changes no command: replay-safe without a patch.
            attempts = outcome.attempts + int(result.pop(RESULT_ATTEMPT_KEY, None) or 1)
            if result.get("skipped"):
                outcome = outcome.model_copy(
                    update={
                        "status": StepStatus.SKIPPED,
                        "skip_reason": str(result.get("reason") or "backend disabled"),
                        "attempts": attempts,
                    }
                )
            else:
                outcome = outcome.model_copy(
                    update={
                        "status": StepStatus.SUCCEEDED,
                        "success": True,
                        "error": None,
                        "error_code": None,
                        "error_type": None,
                        "result": result,
                        "attempts": attempts,
                    }
                )
                # Replaces the ambiguous entry of an earlier failure of this step (a retry).
                # Replay-safe unpatched: without such an entry (every older history) there is
                # nothing to discard, and discarding schedules nothing.
                self._push_compensation(step, result)
        elapsed = (workflow.now() - started).total_seconds() * 1000
        self._results[step.backend] = outcome.model_copy(
            update={"duration_ms": round(outcome.duration_ms + elapsed, 3)}
        )

    def _push_ambiguous(self, step: PlanStep, error: ActivityError) -> None:
        """A step that finally failed but may have written pushes its compensation without a
        forward result: the (fenced, idempotent) activity undoes only what this run's recorded
        pre-image shows. A retry of the step replaces the entry rather than doubling it."""
        if not (step.compensation_activity and step.compensation_policy):
            return  # checked before the patch, as it always was: no marker for such a step
        if not _may_have_landed(error) or not workflow.patched(PATCH_AMBIGUOUS_UNDO):
            return
        self._push_compensation(step, {}, ambiguous=True)

    def _push_compensation(
        self, step: PlanStep, forward_result: dict[str, Any], *, ambiguous: bool = False
    ) -> None:
        """Push ``step``'s compensation (if it has one), replacing one pushed before for it."""
        if not (step.compensation_activity and step.compensation_policy):
            return
        operation = self._require_input()
        self._saga.discard(step.backend)
        self._saga.push(
            Compensation(
                backend=step.backend,
                activity=step.compensation_activity,
                argument=CompensationInput(
                    request=operation.request,
                    forward_result=forward_result,
                    correlation_id=operation.correlation_id,
                    ambiguous=ambiguous,
                    forward_activity=step.activity if ambiguous else None,
                ),
                policy=step.compensation_policy,
                ambiguous=ambiguous,
            )
        )

    async def _activity(
        self, activity: str, argument: Any, *, local: bool = False, **options: Any
    ) -> Any:
        """Run an activity (``local``: in this worker) to its end even if the workflow is
        cancelled meanwhile.

        A cancelled workflow must know whether a step it started took effect, so that it can
        undo it: the activity is not cancelled, the request is remembered, and the workflow
        acts on it once the activity has ended.
        """
        handle = (
            workflow.start_local_activity(activity, argument, **options)
            if local
            else workflow.start_activity(activity, argument, **options)
        )
        while True:
            try:
                return await asyncio.shield(handle)
            except asyncio.CancelledError:
                self._cancel_requested = True
                if handle.done():
                    return handle.result()

    def _failed_backends(self) -> list[str]:
        return self._backends_in(StepStatus.FAILED)

    def _pending_backends(self) -> list[str]:
        return self._backends_in(StepStatus.PENDING)

    def _backends_in(self, status: StepStatus) -> list[str]:
        return [name for name, result in self._results.items() if result.status is status]

    def _aggregate(self) -> None:
        """success: every step succeeded or was skipped; partial: some took effect; failed."""
        statuses = [result.status for result in self._results.values()]
        done = {StepStatus.SUCCEEDED, StepStatus.SKIPPED}
        if all(status in done for status in statuses):
            self._status = OperationStatus.SUCCESS
        elif StepStatus.SUCCEEDED in statuses:
            self._status = OperationStatus.PARTIAL
        else:
            self._status = OperationStatus.FAILED

    async def _await_retries(self, window_seconds: float) -> None:
        """Stay open in ``partial`` until retries succeed or the window expires (compensate)."""
        self._publish_attributes()
        # No patch needed for the supersede condition: histories without the signal never
        # see it set, so they wait exactly as before.
        try:
            await workflow.wait_condition(
                lambda: (
                    (
                        (
                            self._status is not OperationStatus.PARTIAL
                            or self._superseded_by is not None
                        )
                        and not self._retrying
                    )
                    or (self._durable and self._cancel_requested)
                ),
                timeout=timedelta(seconds=window_seconds),
            )
        except TimeoutError:
            # A retry still running when the window closes is allowed to finish first.
            await workflow.wait_condition(lambda: not self._retrying)
            if self._status is OperationStatus.PARTIAL:
                workflow.logger.info("retry window expired: compensating")
                await self._compensate()
            return
        if self._durable and self._cancel_requested:
            raise asyncio.CancelledError("cancelled while the operation waited for a retry")
        if self._status is OperationStatus.PARTIAL:  # superseded while waiting
            workflow.logger.info("superseded (%s): compensating", self._superseded_by)
            self._reason = f"superseded by {self._superseded_by}"
            await self._compensate()

    async def _compensate(self) -> None:
        self._compensating = True
        pausing = workflow.patched(PATCH_COMPENSATION_PAUSE)
        reading = workflow.patched(PATCH_SUPERSEDED_UNDO)
        any_compensated = False
        while True:
            compensated, failed = await self._saga.compensate(
                self._activity, _patient_compensation if pausing else None
            )
            self._compensation_rounds += 1
            for undone in compensated:
                settled = self._settle(undone) if reading else self._mark_compensated(undone)
                any_compensated = any_compensated or settled
            for entry in failed:
                self._results[entry.backend] = self._results[entry.backend].model_copy(
                    update={"status": StepStatus.COMPENSATION_FAILED}
                )
            self._failed_compensations = [entry.backend for entry in failed]
            if not failed or not pausing or not await self._pause():
                break
            for entry in reversed(failed):  # the same order as before: newest on top
                self._saga.push(entry)
        if self._failed_compensations:
            self._status = OperationStatus.COMPENSATION_FAILED
        elif any_compensated:
            self._status = OperationStatus.COMPENSATED
        else:
            self._status = OperationStatus.FAILED

    def _mark_compensated(self, undone: Undone) -> bool:
        backend = undone.entry.backend
        self._results[backend] = self._results[backend].model_copy(
            update={"status": StepStatus.COMPENSATED, "success": False}
        )
        return True

    def _settle(self, undone: Undone) -> bool:
        """Record what a compensation reported; True when the step's write is settled.

        ``superseded``: newer work by another run was left alone: the step is superseded, with
        the reason, and stays so. An ambiguous undo that changed nothing: the write never
        landed, so the step stays failed. Anything else: compensated.
        """
        backend = undone.entry.backend
        if undone.action == UndoAction.SUPERSEDED:
            self._results[backend] = self._results[backend].model_copy(
                update={
                    "status": StepStatus.SUPERSEDED,
                    "success": False,
                    "superseded_reason": undone.reason or "a newer operation changed it since",
                }
            )
            return True
        if undone.entry.ambiguous and undone.action == UndoAction.UNCHANGED:
            return False
        return self._mark_compensated(undone)

    async def _pause(self) -> bool:
        """Wait for an operator; True to resume the stuck compensations, False if abandoned.

        The failure event goes out now: downstream systems learn of the half-done work while
        it waits. A cancel while paused changes nothing: only an operator can decide.
        """
        stuck = ", ".join(self._failed_compensations)
        self._status = OperationStatus.COMPENSATION_PAUSED
        self._reason = (
            f"compensation of {stuck} failed after its budget: fix the cause, then "
            "`onex compensate <workflow-id> --resume`, or `--abandon --reason ...`"
        )
        self._publish_attributes()
        plan = self._require_input().plan
        if plan.on_failure_event and plan.on_failure_event not in self._emitted:
            await self._emit(plan.on_failure_event)
        while True:
            try:
                await workflow.wait_condition(
                    lambda: self._resume_requested or self._abandon_reason is not None
                )
                break
            except asyncio.CancelledError:
                self._cancel_requested = True
        if self._abandon_reason is not None:
            self._reason = f"abandoned by an operator: {self._abandon_reason}"
            return False
        self._resume_requested = False
        self._reason = None
        return True

    # -- reporting ---------------------------------------------------------------------------

    async def _finish(self) -> None:
        await workflow.wait_condition(workflow.all_handlers_finished)
        plan = self._require_input().plan
        succeeded = self._status is OperationStatus.SUCCESS
        outcome_event = plan.on_success_event if succeeded else plan.on_failure_event
        if outcome_event and outcome_event not in self._emitted:
            await self._emit(outcome_event)
        await self._emit(WORKFLOW_COMPLETED if succeeded else WORKFLOW_FAILED)
        self._publish_attributes()

    async def _emit(self, topic: str) -> None:
        """Queue an event in the outbox, patiently; one that still fails is listed, not fatal."""
        operation = self._require_input()
        plan = operation.plan
        if plan.event_activity is None or plan.event_policy is None:
            return
        envelope = new_envelope(
            topic,
            event_payload(
                topic, request=operation.request, result=self.status(), now=workflow.now()
            ),
            correlation_id=operation.correlation_id,
            event_id=workflow.uuid4(),
            timestamp=workflow.now(),
        )
        options = plan.event_policy.activity_options()
        patient = workflow.patched(PATCH_PATIENT_EVENTS)
        if patient:
            options = _patient(options)
        # Histories written before the patch scheduled each event as a (remote) activity.
        local = workflow.patched(PATCH_LOCAL_EVENTS)
        if local:
            options = _local(options)
        self._emitted.add(topic)
        try:
            await self._activity(plan.event_activity, envelope, local=local, **options)
        except ActivityError as error:
            workflow.logger.warning("event %s could not be queued: %s", topic, error)
            if patient:
                self._undelivered_events.append(topic)

    def _publish_attributes(self, *, initial: bool = False) -> None:
        """Keep the search attributes and the memo's per-backend summary current.

        The client helpers set the identifying attributes at start; a workflow started by
        other means gets them here, once.
        """
        operation = self._require_input()
        if initial:
            present = workflow.info().typed_search_attributes
            wanted = [
                ONEX_STATUS.value_set(self._status.value),
                ONEX_OPERATION.value_set(operation.plan.operation),
                CORRELATION_ID.value_set(str(operation.correlation_id)),
            ]
            node_id = operation.request.get("node_id")
            if node_id:
                wanted.append(NODE_ID.value_set(str(node_id)))
            missing = [update for update in wanted if present.get(update.key) is None]
            if missing:
                workflow.upsert_search_attributes(missing)
            return
        workflow.upsert_search_attributes([ONEX_STATUS.value_set(self._status.value)])
        workflow.upsert_memo(
            {"backends": {name: result.status.value for name, result in self._results.items()}}
        )

    def _require_input(self) -> OperationInput:
        if self._input is None:
            raise ApplicationError("the workflow has no input yet", non_retryable=True)
        return self._input


def _patient(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` bounded by time instead of attempts, with backoff capped at a few minutes.

    A short database restart must neither drop an event nor fail an undo for good. The cap is
    the patient one, not the forward step's (30 s for most transports): the boundary computes
    each delay from the retry policy the activity runs with, so a long outage is waited out in
    a few tries instead of one every 30 s. Options are not part of what replay compares
    (command and activity types and ids are): changing them needs no patch.
    """
    retry = options["retry_policy"]
    return {
        **options,
        "retry_policy": dataclasses.replace(
            retry, maximum_attempts=0, maximum_interval=PATIENT_MAX_INTERVAL
        ),
        "schedule_to_close_timeout": PATIENT_BUDGET,
    }


LOCAL_RETRY_THRESHOLD = timedelta(seconds=30)
"""A local activity's backoff up to this is waited in the worker; longer, on a durable timer."""


def _local(options: dict[str, Any]) -> dict[str, Any]:
    """``options`` for a local activity: the same retry policy and budget, no heartbeat.

    A local activity runs in the workflow task's worker, so it has no heartbeat timeout (the
    event write is one short insert). Its attempts are at least once like a remote activity's:
    a worker lost mid-write runs it again from the same history, with the same event id, and
    the outbox inserts an id once. A backoff longer than the threshold is waited on a timer
    the server keeps, so a long database outage survives a worker restart.
    """
    local = {key: value for key, value in options.items() if key != "heartbeat_timeout"}
    local["local_retry_threshold"] = LOCAL_RETRY_THRESHOLD
    return local


def _patient_compensation(entry: Compensation) -> dict[str, Any]:
    return _patient(entry.policy.activity_options())


def result_in_failure(cause: BaseException | None) -> OperationResult | None:
    """The result a failed compensation ends the workflow with (in its failure's details).

    For callers of a failed operation workflow: the client helpers and the node workflow.
    """
    if isinstance(cause, ApplicationError) and cause.type == CompensationFailedError.__name__:
        return OperationResult.model_validate(cause.details[0])
    return None


def _may_have_landed(error: ActivityError) -> bool:
    """Whether a step that finally failed may have written: it timed out, or its last attempt
    failed with an error worth retrying (the write may have been applied before the reply was
    lost). A refusal (non-retryable) never wrote."""
    cause = error.cause
    if isinstance(cause, ActivityTimeoutError):
        return True
    return (
        isinstance(cause, ApplicationError)
        and not cause.non_retryable
        and error.retry_state is not RetryState.NON_RETRYABLE_FAILURE
    )


def _details(cause: BaseException | None) -> dict[str, Any]:
    """The sanitized ErrorDetails the activity boundary attached, if any."""
    if isinstance(cause, ApplicationError) and cause.details:
        first = cause.details[0]
        if isinstance(first, dict):
            return first
    return {}


def _attempts_of(error: ActivityError) -> int:
    """How many attempts a failed step took: Temporal's number of its last attempt.

    The boundary puts it in the failure's details; a step whose budget ran out while it waited
    to retry fails with a timeout whose cause is the last attempt's failure; a lost attempt (a
    heartbeat timeout) carries the attempt number of its last heartbeat. Failures recorded
    before any of these: one attempt, as reported then.
    """
    link: BaseException | None = error.cause
    while link is not None:
        attempt = _details(link).get("attempt")
        if isinstance(attempt, int) and attempt > 0:
            return attempt
        if isinstance(link, ActivityTimeoutError) and link.last_heartbeat_details:
            beat = link.last_heartbeat_details[0]
            if isinstance(beat, int) and beat > 0:
                return beat
        link = link.__cause__
    return 1
