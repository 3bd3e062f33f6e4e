"""Golden histories replay with the current code; a non-deterministic change fails replay."""

from __future__ import annotations

from datetime import timedelta

from temporalio import workflow

from tests.workflows.scenarios import HISTORIES
from workers.replay import load_histories, replay_files, replayer

EXPECTED = {
    "deregister_success.json",
    "liveness_sweep_lost.json",
    "node_deregister_supersedes_partial_register.json",
    "node_queued_operation.json",
    "register_all_or_nothing_compensated.json",
    "register_ambiguous_failure_undone.json",
    "register_cancelled_compensated.json",
    "register_cancelled_during_retry.json",
    "register_compensation_failed.json",
    "register_compensation_paused_abandoned.json",
    "register_compensation_paused_resumed.json",
    "register_consul_skipped.json",
    "register_partial_retry_success.json",
    "register_partial_window_expired_compensated.json",
    "register_success.json",
    # Recorded after PATCH_LOCAL_EVENTS: the events as local activities (markers).
    "register_success_local_events.json",
    "register_superseded_undo.json",
    # Recorded after PATCH_CANCEL_AT_DURABLE_POINTS: a worker lost while it queued an event,
    # a cancel meanwhile (the shape the chaos runner found with seed 5).
    "register_cancelled_worker_lost_during_started_event.json",
    "register_success_worker_lost_during_completed_event.json",
    # Written by the chaos runner (seed 23392) with the first version of that patch: a cancel
    # in the workflow task that brought a step's failure, taken by a worker that had the run
    # cached; it did not replay until the cancel was latched once the workflow is idle.
    "register_partial_cancel_with_the_failed_step_chaos_23392.json",
}


def test_every_path_has_a_golden_history() -> None:
    """Each significant path of the operation, node and liveness workflows has a committed
    history."""
    present = {path.name for path in HISTORIES.glob("*.json")}
    assert present >= EXPECTED, (
        f"Missing golden histories: {sorted(EXPECTED - present)}\n\n"
        "HOW TO FIX: run `make record-histories` and commit tests/histories/."
    )


async def test_golden_histories_replay_with_the_current_code() -> None:
    """Replaying every committed history succeeds: the workflow code is still deterministic
    for executions recorded with earlier code."""
    outcomes = await replay_files(HISTORIES)
    failures = {outcome.name: outcome.error for outcome in outcomes if not outcome.ok}
    assert len(outcomes) >= len(EXPECTED)
    assert failures == {}, (
        f"Non-deterministic change: these histories no longer replay: {failures}\n\n"
        "HOW TO FIX: guard the change with workflow.patched(...) so running workflows keep "
        "their old path, or, if the change is intended and no old workflow runs, re-record "
        "with `make record-histories`."
    )


@workflow.defn(name="OperationWorkflow", sandboxed=False)
class ReorderedOperationWorkflow:
    """A deliberately non-deterministic variant: it sleeps before doing anything."""

    @workflow.run
    async def run(self, operation: object) -> None:
        await workflow.sleep(timedelta(seconds=1))


async def test_a_non_deterministic_variant_fails_replay() -> None:
    """The replay check can fail: a variant that schedules different commands is caught."""
    (history,) = [h for h in load_histories(HISTORIES) if h.workflow_id == "register_success.json"]
    result = await replayer([ReorderedOperationWorkflow]).replay_workflow(
        history, raise_on_replay_failure=False
    )
    assert result.replay_failure is not None
    assert "nondetermin" in type(result.replay_failure).__name__.lower() or (
        "nondetermin" in str(result.replay_failure).lower()
    )


def test_replay_cli_reports_each_history() -> None:
    """`onex replay <dir>` replays each file and exits 0 when all replay."""
    from typer.testing import CliRunner

    from workers.cli import app

    result = CliRunner().invoke(app, ["replay", str(HISTORIES)])
    assert result.exit_code == 0, result.output
    assert f"{len(EXPECTED)} replayed, 0 failed" in result.output
