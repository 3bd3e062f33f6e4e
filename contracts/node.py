"""The per-node workflow's data: what it is started with, what it holds, what it shows.

One ``NodeWorkflow`` (id ``onex-node-<node_id>``) runs every operation that changes a node, one
at a time, in the order they arrived. Clients send each operation with update-with-start; an
identical request (same :func:`fingerprint`) attaches to the open one instead of running twice.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import datetime

from pydantic import BaseModel, ConfigDict, Field

from contracts.operations_io import OperationInput

NODE_WORKFLOW_ID = "onex-node-{node_id}"
"""The per-node workflow's id: ``onex status onex-node-<node_id>`` shows its queue."""

MAX_QUEUED = 6
"""Operations a node may have waiting behind the running one; more are refused."""

MAX_CALLERS = 8
"""Callers a node workflow keeps waiting at once (new, queued and attached requests alike).

Each waiting caller holds an in-flight Update, and Temporal caps those per workflow (10 by
default, ``limit.workflowExecution.maxInFlightUpdates``); the margin is for Updates the server
has admitted but the workflow has not seen yet. Beyond the cap the server itself refuses, which
the client reports as :class:`~workers.client.NodeBusy`.
"""


def node_workflow_id(node_id: uuid.UUID | str) -> str:
    return NODE_WORKFLOW_ID.format(node_id=node_id)


def fingerprint(operation: OperationInput) -> str:
    """The content of a request, without what differs between two sends of the same one.

    The correlation id is left out: a client that retries a start (or a redelivered message)
    mints a new one, and the request it carries is still the same request.
    """
    content = {
        "operation": operation.plan.operation,
        "request": {k: v for k, v in operation.request.items() if k != "correlation_id"},
    }
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()


class NodeOperation(BaseModel):
    """One operation the node workflow has accepted: running or waiting its turn."""

    model_config = ConfigDict(frozen=True)

    sequence: int = Field(description="Its place among every operation the node has accepted")
    workflow_id: str = Field(description="The operation's own workflow id (a child workflow)")
    operation: str
    fingerprint: str
    correlation_id: uuid.UUID
    accepted_at: datetime


class Submission(BaseModel):
    """What a client sends the node workflow's ``submit`` Update: the operation and its id."""

    model_config = ConfigDict(frozen=True)

    workflow_id: str = Field(description="The operation's workflow id, from its contract")
    operation: OperationInput


class NodeInput(BaseModel):
    """What the node workflow starts (or continues as new) with."""

    node_id: uuid.UUID
    # Carried over by continue-as-new (which happens only when nothing runs or waits).
    accepted: int = 0
    completed: int = 0
    last: dict[str, str] | None = None
    continue_after: int = Field(
        default=200,
        ge=1,
        description="Operations per run before it continues as new (sooner if Temporal says so)",
    )


class NodeState(BaseModel):
    """The node workflow's query answer, and what ``onex status onex-node-<id>`` prints."""

    node_id: uuid.UUID
    workflow_id: str
    running: NodeOperation | None
    queued: list[NodeOperation]
    accepted: int
    completed: int
    last: dict[str, str] | None = Field(
        default=None, description="The last finished operation: workflow id and final status"
    )
