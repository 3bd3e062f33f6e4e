"""The search attributes operations keep current, so that the Temporal UI can find them.

All four are Keyword attributes; the embedded stack, the compose stack and the test servers
register exactly these.
"""

from __future__ import annotations

from temporalio.common import SearchAttributeKey

CORRELATION_ID = SearchAttributeKey.for_keyword("CorrelationId")
NODE_ID = SearchAttributeKey.for_keyword("NodeId")
ONEX_OPERATION = SearchAttributeKey.for_keyword("OnexOperation")
ONEX_STATUS = SearchAttributeKey.for_keyword("OnexStatus")

SEARCH_ATTRIBUTES: tuple[str, ...] = tuple(
    key.name for key in (CORRELATION_ID, NODE_ID, ONEX_OPERATION, ONEX_STATUS)
)
