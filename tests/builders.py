"""Requests as the tests build them: valid by default, changed field by field."""

from __future__ import annotations

import json
import uuid
from typing import Any

from pydantic import BaseModel

from contracts.registry import CompensationInput, DeregisterNodeRequest, RegisterNodeRequest


def register_request(node_id: uuid.UUID | None = None, **changes: Any) -> RegisterNodeRequest:
    fields: dict[str, Any] = {
        "node_id": node_id or uuid.uuid4(),
        "node_type": "effect",
        "node_version": "1.2.3",
        "service_name": "billing",
        "address": "10.0.0.7",
        "port": 8080,
        "tags": ("blue", "eu-west-1"),
        "endpoints": {"health": "http://10.0.0.7:8080/health"},
        "metadata": {"team": "payments"},
        "correlation_id": uuid.uuid4(),
        **changes,
    }
    return RegisterNodeRequest.model_validate(fields)


def deregister_request(node_id: uuid.UUID) -> DeregisterNodeRequest:
    return DeregisterNodeRequest(node_id=node_id, node_type="effect", correlation_id=uuid.uuid4())


def compensation(request: BaseModel, forward_result: BaseModel) -> CompensationInput:
    """What the saga hands the compensation, after a JSON round trip like Temporal's."""
    return CompensationInput(
        request=request.model_dump(mode="json"),
        forward_result=json.loads(forward_result.model_dump_json()),
        correlation_id=getattr(request, "correlation_id", None),
    )
