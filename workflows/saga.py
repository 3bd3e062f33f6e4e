"""The compensation stack of a saga (SPEC §4.4).

Every forward step that succeeded pushes its compensation; so does a step that failed in a way
that may have reached its backend (an *ambiguous* entry, see ``CompensationInput.ambiguous``),
replaced if that step is retried. :meth:`Saga.compensate` runs them in reverse order, each as an
activity with its own (more patient) retry policy, through a runner that lets it finish even if
the workflow is cancelled; a failed compensation is recorded and the others still run.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from temporalio import workflow
from temporalio.exceptions import ActivityError

with workflow.unsafe.imports_passed_through():
    from contracts.resilience import ResiliencePolicy


@dataclass(frozen=True)
class Compensation:
    backend: str
    activity: str
    argument: Any
    policy: ResiliencePolicy
    # Pushed for a failed step whose write may have landed: an undo that changed nothing
    # leaves the step failed (its write never landed), not compensated.
    ambiguous: bool = False


@dataclass(frozen=True)
class Undone:
    """A compensation that ran: its entry and what the activity returned."""

    entry: Compensation
    result: Any

    @property
    def action(self) -> str | None:
        """The compensation's ``action`` (restored, deleted, unchanged, superseded...)."""
        return self.result.get("action") if isinstance(self.result, dict) else None

    @property
    def reason(self) -> str | None:
        return self.result.get("reason") if isinstance(self.result, dict) else None


@dataclass
class Saga:
    stack: list[Compensation] = field(default_factory=list)

    def push(self, compensation: Compensation) -> None:
        self.stack.append(compensation)

    def discard(self, backend: str) -> None:
        """Forget a step's compensation (it was compensated already, or it is replaced)."""
        self.stack = [entry for entry in self.stack if entry.backend != backend]

    async def compensate(
        self,
        run_activity: Callable[..., Awaitable[Any]],
        options: Callable[[Compensation], dict[str, Any]] | None = None,
    ) -> tuple[list[Undone], list[Compensation]]:
        """Run every pushed compensation, newest first; return (those that ran, those failed).

        ``run_activity(name, argument, **options)`` runs one activity to its end even if the
        workflow is cancelled meanwhile: a cancelled workflow must still undo what it did.
        ``options`` gives an entry's activity options (its policy's, by default). The failed
        entries are returned, not dropped, so that an operator can resume them.
        """
        compensated: list[Undone] = []
        failed: list[Compensation] = []
        while self.stack:
            entry = self.stack.pop()
            try:
                result = await run_activity(
                    entry.activity,
                    entry.argument,
                    **(options(entry) if options else entry.policy.activity_options()),
                )
            except ActivityError as error:
                workflow.logger.warning(
                    "compensation %s of %s failed: %s", entry.activity, entry.backend, error
                )
                failed.append(entry)
            else:
                compensated.append(Undone(entry, result))
        return compensated, failed
