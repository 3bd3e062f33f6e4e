"""refresh_once: a refused credential is refreshed once and the call tried once more."""

from __future__ import annotations

import pytest

from activities.resilience.refresh import refresh_once


class Refused(Exception):
    """Stands for a backend refusing a credential (InvalidPasswordError, ACLPermissionDenied)."""


class Calls:
    def __init__(self, *outcomes: Exception | str) -> None:
        self.outcomes = list(outcomes)
        self.attempts = 0
        self.refreshes = 0

    async def attempt(self) -> str:
        self.attempts += 1
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, Exception):
            raise outcome
        return outcome

    async def refresh(self) -> None:
        self.refreshes += 1


async def test_a_refusal_is_refreshed_and_tried_once_more() -> None:
    """Refused, then fine: one refresh, two attempts, the second attempt's result."""
    calls = Calls(Refused(), "ok")
    result = await refresh_once(
        calls.attempt, refused=Refused, refresh=calls.refresh, event="refused"
    )
    assert (result, calls.attempts, calls.refreshes) == ("ok", 2, 1)


async def test_a_second_refusal_propagates_without_a_second_refresh() -> None:
    """Refused twice: the second refusal propagates; there is no third attempt."""
    calls = Calls(Refused("first"), Refused("second"))
    with pytest.raises(Refused, match="second"):
        await refresh_once(calls.attempt, refused=Refused, refresh=calls.refresh, event="refused")
    assert (calls.attempts, calls.refreshes) == (2, 1), "refresh once and retry once, no more"


async def test_without_a_refresh_or_for_other_errors_nothing_is_retried() -> None:
    """No refresh (no secret store, an injected client), or an error that is not a refusal:
    one attempt, and its exception propagates."""
    calls = Calls(Refused("no store"))
    with pytest.raises(Refused, match="no store"):
        await refresh_once(calls.attempt, refused=Refused, refresh=None, event="refused")
    other = Calls(TimeoutError())
    with pytest.raises(TimeoutError):
        await refresh_once(other.attempt, refused=Refused, refresh=other.refresh, event="refused")
    assert (calls.attempts, other.attempts, other.refreshes) == (1, 1, 0)
