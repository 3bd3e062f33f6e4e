"""Temporal interceptors that carry the correlation id (SPEC §4.6).

One class serves both sides: pass it to ``Client.connect(interceptors=[...])`` and the worker
picks it up from the client (or pass it to ``Worker(interceptors=[...])``).

* Client: every workflow start carries the id in the ``onex-correlation-id`` header (from the
  header if already set, else a workflow argument's ``correlation_id``, else the current
  context, else a new one) and, unless disabled, in the ``CorrelationId`` search attribute.
* Workflow: the header is copied to every activity, local activity, child workflow and
  continue-as-new the workflow starts. This side is deterministic: it only moves payloads.
* Activity: the id, workflow id, activity type and attempt are bound into the log context
  for the duration of the activity.
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping, Sequence
from typing import Any, NoReturn

import structlog
from temporalio import activity, client, converter, workflow
from temporalio.api.common.v1 import Payload
from temporalio.common import SearchAttributePair, TypedSearchAttributes
from temporalio.worker import (
    ActivityInboundInterceptor,
    ContinueAsNewInput,
    ExecuteActivityInput,
    ExecuteWorkflowInput,
    Interceptor,
    StartActivityInput,
    StartChildWorkflowInput,
    StartLocalActivityInput,
    WorkflowInboundInterceptor,
    WorkflowInterceptorClassInput,
    WorkflowOutboundInterceptor,
)

from activities.resilience.correlation import (
    correlation_scope,
    current_correlation_id,
    ensure_correlation_id,
)
from contracts.search_attributes import CORRELATION_ID

CORRELATION_HEADER = "onex-correlation-id"
CORRELATION_ID_ATTRIBUTE = CORRELATION_ID  # the name tests and users know it by

_payloads = converter.PayloadConverter.default


def _with_header(headers: Mapping[str, Payload], payload: Payload | None) -> Mapping[str, Payload]:
    if payload is None or CORRELATION_HEADER in headers:
        return headers
    return {**headers, CORRELATION_HEADER: payload}


def _decode(headers: Mapping[str, Payload]) -> uuid.UUID | None:
    payload = headers.get(CORRELATION_HEADER)
    if payload is None:
        return None
    try:
        return uuid.UUID(_payloads.from_payload(payload, str))
    except (ValueError, TypeError):
        return None


def _from_arguments(args: Sequence[Any]) -> uuid.UUID | None:
    for arg in args:
        found = getattr(arg, "correlation_id", None)
        if found is not None:
            return ensure_correlation_id(found)
    return None


class CorrelationInterceptor(client.Interceptor, Interceptor):
    """Carries the correlation id from the client through workflows to activities and logs."""

    def __init__(self, *, set_search_attribute: bool = True) -> None:
        self.set_search_attribute = set_search_attribute

    def intercept_client(self, next: client.OutboundInterceptor) -> client.OutboundInterceptor:
        return _ClientOutbound(next, set_search_attribute=self.set_search_attribute)

    def intercept_activity(self, next: ActivityInboundInterceptor) -> ActivityInboundInterceptor:
        return _ActivityInbound(next)

    def workflow_interceptor_class(
        self, input: WorkflowInterceptorClassInput
    ) -> type[WorkflowInboundInterceptor] | None:
        return _WorkflowInbound


class _ClientOutbound(client.OutboundInterceptor):
    def __init__(self, next: client.OutboundInterceptor, *, set_search_attribute: bool) -> None:
        super().__init__(next)
        self._set_search_attribute = set_search_attribute

    async def start_workflow(
        self, input: client.StartWorkflowInput
    ) -> client.WorkflowHandle[Any, Any]:
        correlation_id = (
            _decode(input.headers)
            or _from_arguments(input.args)
            or current_correlation_id()
            or ensure_correlation_id()
        )
        input.headers = _with_header(input.headers, _payloads.to_payload(str(correlation_id)))
        if self._set_search_attribute:
            input.search_attributes = _with_correlation_attribute(
                input.search_attributes, correlation_id
            )
        return await super().start_workflow(input)


def _with_correlation_attribute(
    attributes: Any, correlation_id: uuid.UUID
) -> TypedSearchAttributes:
    existing = attributes if isinstance(attributes, TypedSearchAttributes) else None
    if existing is None and attributes:
        # The untyped form is deprecated by the SDK; refuse to guess how to merge it.
        raise TypeError("pass search attributes as TypedSearchAttributes")
    pairs = list(existing.search_attributes) if existing else []
    if not any(pair.key.name == CORRELATION_ID_ATTRIBUTE.name for pair in pairs):
        pairs.append(SearchAttributePair(CORRELATION_ID_ATTRIBUTE, str(correlation_id)))
    return TypedSearchAttributes(pairs)


class _WorkflowInbound(WorkflowInboundInterceptor):
    def init(self, outbound: WorkflowOutboundInterceptor) -> None:
        self._outbound = _WorkflowOutbound(outbound, self)
        self.header: Payload | None = None
        super().init(self._outbound)

    async def execute_workflow(self, input: ExecuteWorkflowInput) -> Any:
        self.header = input.headers.get(CORRELATION_HEADER)
        return await super().execute_workflow(input)


class _WorkflowOutbound(WorkflowOutboundInterceptor):
    def __init__(self, next: WorkflowOutboundInterceptor, inbound: _WorkflowInbound) -> None:
        super().__init__(next)
        self._inbound = inbound

    def start_activity(self, input: StartActivityInput) -> workflow.ActivityHandle[Any]:
        input.headers = _with_header(input.headers, self._inbound.header)
        return super().start_activity(input)

    def start_local_activity(self, input: StartLocalActivityInput) -> workflow.ActivityHandle[Any]:
        input.headers = _with_header(input.headers, self._inbound.header)
        return super().start_local_activity(input)

    async def start_child_workflow(
        self, input: StartChildWorkflowInput
    ) -> workflow.ChildWorkflowHandle[Any, Any]:
        input.headers = _with_header(input.headers, self._inbound.header)
        return await super().start_child_workflow(input)

    def continue_as_new(self, input: ContinueAsNewInput) -> NoReturn:
        input.headers = _with_header(input.headers, self._inbound.header)
        super().continue_as_new(input)


class _ActivityInbound(ActivityInboundInterceptor):
    async def execute_activity(self, input: ExecuteActivityInput) -> Any:
        info = activity.info()
        correlation_id = _decode(input.headers) or _from_arguments(input.args)
        log_context = {
            "workflow_id": info.workflow_id,
            "activity_type": info.activity_type,
            "attempt": info.attempt,
        }
        if correlation_id is None:
            with structlog.contextvars.bound_contextvars(**log_context):
                return await super().execute_activity(input)
        with correlation_scope(correlation_id, **log_context):
            return await super().execute_activity(input)
