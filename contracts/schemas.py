"""JSON Schemas of the YAML contracts, for editors (``contracts/schema/*.schema.json``).

The files are generated from the pydantic models and committed; a test fails when they are out
of date. Regenerate them with ``onex contracts schema --write``.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel

from contracts.handler_contract import HandlerContract
from contracts.operation_contract import OperationContract

SCHEMA_DIR = Path(__file__).resolve().parent / "schema"
SCHEMAS: dict[str, type[BaseModel]] = {
    "handler_contract.schema.json": HandlerContract,
    "operation_contract.schema.json": OperationContract,
}


def render(model: type[BaseModel]) -> str:
    schema = model.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return json.dumps(schema, indent=2, sort_keys=True) + "\n"


def stale_schemas() -> list[str]:
    """The schema files whose content differs from what the models generate."""
    stale = []
    for name, model in SCHEMAS.items():
        path = SCHEMA_DIR / name
        if not path.exists() or path.read_text() != render(model):
            stale.append(name)
    return stale


def write_schemas() -> list[Path]:
    SCHEMA_DIR.mkdir(exist_ok=True)
    written = []
    for name, model in SCHEMAS.items():
        path = SCHEMA_DIR / name
        path.write_text(render(model))
        written.append(path)
    return written
