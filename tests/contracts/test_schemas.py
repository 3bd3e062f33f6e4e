"""The committed JSON Schemas match the contract models."""

from __future__ import annotations

from contracts.schemas import stale_schemas


def test_committed_schemas_are_current() -> None:
    """contracts/schema/*.json are generated from the pydantic models and must not drift."""
    stale = stale_schemas()
    assert stale == [], (
        f"Out-of-date contract schemas: {stale}\n\n"
        "HOW TO FIX: run `.venv/bin/onex contracts schema --write` and commit the result."
    )
