"""`onex compensate` settles a paused operation: against a real Temporal server and the
scripted backends, through the same command line an operator types."""

from __future__ import annotations

import pytest
from temporalio.client import WorkflowFailureError
from temporalio.testing import WorkflowEnvironment
from typer.testing import CliRunner

from contracts.operations_io import OperationStatus
from tests.workflows import scenarios
from tests.workflows.scenarios import Backends, onex, plan, refused, start, worker
from tests.workflows.test_operation import paused
from workers.cli import app
from workers.cli.exit_codes import ExitCode
from workers.client import result_of

runner = CliRunner()


def paused_backends(*, undo_fails_once: bool) -> Backends:
    """PostgreSQL refuses the step; Consul's undo is denied (once, or for good)."""
    backends = Backends()
    backends.script("postgres.upsert_node", refused)
    backends.script(
        "consul.undo_register_service",
        (lambda n: scenarios.denied(n) if n == 1 else None)
        if undo_fails_once
        else scenarios.denied,
    )
    return backends


async def test_status_of_a_paused_operation_exits_3_and_says_how_to_settle_it(
    temporal_env: WorkflowEnvironment, task_queue: str, cli_env: dict[str, str]
) -> None:
    backends = paused_backends(undo_fails_once=True)
    async with worker(temporal_env.client, task_queue, backends):
        handle = await start(temporal_env.client, task_queue, plan(aggregation="all_or_nothing"))
        await paused(handle)
        shown = await onex(temporal_env, cli_env, "status", handle.id)
        assert shown.exit_code == ExitCode.PARTIAL, shown.output
        assert "compensation_paused" in shown.output
        assert f"onex compensate {handle.id} --resume" in shown.output
        assert "reason:" in shown.output

        resumed = await onex(temporal_env, cli_env, "compensate", handle.id, "--resume", "--json")
        assert resumed.exit_code == ExitCode.FAILED, resumed.output  # compensated: exit 4
        assert '"status": "compensated"' in resumed.output
        result = await handle.result()
    assert result.status is OperationStatus.COMPENSATED
    assert len(backends.calls["consul.undo_register_service"]) == 2


async def test_compensate_abandon_needs_a_reason_and_ends_compensation_failed(
    temporal_env: WorkflowEnvironment, task_queue: str, cli_env: dict[str, str]
) -> None:
    backends = paused_backends(undo_fails_once=False)
    async with worker(temporal_env.client, task_queue, backends):
        handle = await start(temporal_env.client, task_queue, plan(aggregation="all_or_nothing"))
        await paused(handle)
        no_reason = await onex(temporal_env, cli_env, "compensate", handle.id, "--abandon")
        assert no_reason.exit_code == ExitCode.BAD_INPUT
        assert "--reason" in no_reason.output
        abandoned = await onex(
            temporal_env,
            cli_env,
            "compensate",
            handle.id,
            "--abandon",
            "--reason",
            "service removed by hand (OPS-12)",
        )
        assert abandoned.exit_code == ExitCode.FAILED, abandoned.output
        assert "compensation_failed" in abandoned.output
        with pytest.raises(WorkflowFailureError):
            await handle.result()
        again = await onex(temporal_env, cli_env, "compensate", handle.id, "--resume")
    assert again.exit_code == ExitCode.BAD_INPUT, again.output  # finished: nothing to resume
    assert "compensation_failed" in again.output
    final = await result_of(handle)
    assert final.reason == "abandoned by an operator: service removed by hand (OPS-12)"
    assert backends.calls["consul.undo_register_service"], "the undo was tried"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "exactly one of --resume or --abandon"),
        (["--resume", "--abandon", "--reason", "x"], "exactly one of --resume or --abandon"),
        (["--resume", "--reason", "x"], "--reason goes with --abandon"),
        (["--abandon", "--reason", "  "], "--abandon needs --reason"),
    ],
)
def test_compensate_refuses_a_contradictory_request_before_contacting_anything(
    cli_env: dict[str, str], args: list[str], message: str
) -> None:
    result = runner.invoke(
        app,
        ["compensate", "onex-register-node-x", *args],
        env={**cli_env, "ONEX_TEMPORAL__PORT": "1"},
    )
    assert result.exit_code == ExitCode.BAD_INPUT
    assert message in result.output
