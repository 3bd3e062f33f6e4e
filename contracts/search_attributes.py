"""The search attributes operations keep current, so that the Temporal UI can find them.

All four are Keyword attributes; the embedded stack, the compose stack and the test servers
register exactly these.
"""

from __future__ import annotations

from temporalio.common import SearchAttributeKey, SearchAttributePair, TypedSearchAttributes

from contracts.operations_io import OperationStatus

CORRELATION_ID = SearchAttributeKey.for_keyword("CorrelationId")
NODE_ID = SearchAttributeKey.for_keyword("NodeId")
ONEX_OPERATION = SearchAttributeKey.for_keyword("OnexOperation")
ONEX_STATUS = SearchAttributeKey.for_keyword("OnexStatus")

SEARCH_ATTRIBUTES: tuple[str, ...] = tuple(
    key.name for key in (CORRELATION_ID, NODE_ID, ONEX_OPERATION, ONEX_STATUS)
)


def operation_attributes(
    operation: str, correlation_id: str, node_id: str | None = None
) -> TypedSearchAttributes:
    """What an operation workflow is started with, so that it is found from its first event."""
    pairs = [
        SearchAttributePair(CORRELATION_ID, correlation_id),
        SearchAttributePair(ONEX_OPERATION, operation),
        SearchAttributePair(ONEX_STATUS, OperationStatus.RUNNING.value),
    ]
    if node_id is not None:
        pairs.append(SearchAttributePair(NODE_ID, node_id))
    return TypedSearchAttributes(pairs)
