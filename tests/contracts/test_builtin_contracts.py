"""The contracts the project ships pass every check, and `onex contracts validate` reports."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from contracts.operation_contract import compile_plan
from workers.cli import app
from workers.cli.exit_codes import ExitCode
from workers.settings import OnexSettings
from workers.validate import validate_contracts

runner = CliRunner()


def test_the_shipped_contracts_are_valid_and_compile() -> None:
    """Every built-in handler loads under the default allowlist; both operations compile with
    each step's activity named <handler>.<operation> and a compensation where one is declared."""
    report = validate_contracts(OnexSettings())
    assert report.problems == [], [p.message for p in report.problems]
    assert sorted(report.handlers) == ["consul", "kafka", "postgres"]
    plan = compile_plan(report.operations["register_node"], report.handlers)
    assert [(s.activity, s.compensation_activity) for s in plan.steps] == [
        ("consul.register_service", "consul.undo_register_service"),
        ("postgres.upsert_node", "postgres.restore_node"),
    ]
    assert plan.event_activity == "postgres.enqueue_event"
    for step in plan.steps:
        assert step.compensation_policy is not None
        assert step.compensation_policy.retry.max_attempts > step.policy.retry.max_attempts


def test_validate_lists_every_problem_and_exits_2(tmp_path: Path) -> None:
    """A broken operation and a handler with a credential: both reported, exit 2."""
    (tmp_path / "ops").mkdir()
    (tmp_path / "ops" / "broken.yaml").write_text(
        "operation: broken\nversion: 1\ninput_model: contracts.registry:RegisterNodeRequest\n"
        "workflow_id: x-{node_id}\nsteps:\n  - {backend: a, handler: nope, operation: x}\n"
        "events: {on_success: onex.not.a.topic.v1}\n"
    )
    (tmp_path / "h").mkdir()
    (tmp_path / "h" / "handler_contract.yaml").write_text(
        "handler_name: leaky\nhandler_class: activities.postgres:PostgresHandler\n"
        "handler_type: effect\ntransport: database\n"
        "description: uses postgresql://admin:pw123@db/x\n"
        "operations:\n  get_node: {idempotent: true}\n"
    )
    result = runner.invoke(app, ["contracts", "validate", str(tmp_path), "--json"])
    assert result.exit_code == ExitCode.BAD_INPUT
    report = json.loads(result.stdout)
    codes = sorted(problem["code"] for problem in report["problems"])
    assert codes == ["HANDLER_LOADER_003", "HANDLER_LOADER_016"]
    assert "pw123" not in result.stdout


def test_validate_of_the_shipped_contracts_exits_0() -> None:
    """With no paths, the configured contract directories are checked."""
    result = runner.invoke(app, ["contracts", "validate"])
    assert result.exit_code == 0, result.output
    assert "3 handler contract(s), 2 operation contract(s), 0 problem(s)" in result.output
