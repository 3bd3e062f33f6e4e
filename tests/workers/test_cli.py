"""The `onex` command line teaches its use and exits with the documented codes."""

from __future__ import annotations

import json

import pytest
import typer
from temporalio.testing import WorkflowEnvironment
from typer.testing import CliRunner

from contracts.errors import (
    CompensationFailedError,
    HandlerLoadError,
    InfraConnectionError,
    SecretResolutionError,
)
from contracts.operation_contract import PlanError
from contracts.operations_io import OperationStatus
from tests.fakes import planted
from tests.support import free_port
from workers.cli import app
from workers.cli.common import run
from workers.cli.exit_codes import STATUS_EXIT, ExitCode, exit_code_for
from workers.client import OperationFinished, OperationNotFound
from workers.demo import DemoEventsMissing
from workers.devstack import PortInUseError, StackError
from workers.host import WorkerStartError
from workers.settings import SettingsError

runner = CliRunner()

COMMANDS = [
    [],
    ["dev"],
    ["dev", "up"],
    ["dev", "down"],
    ["dev", "status"],
    ["dev", "logs"],
    ["demo"],
    ["worker"],
    ["codec-server"],
    ["register-node"],
    ["deregister-node"],
    ["retry"],
    ["compensate"],
    ["status"],
    ["replay"],
    ["contracts"],
    ["contracts", "validate"],
    ["contracts", "schema"],
    ["db", "migrate"],
    ["kafka", "create-topics"],
    ["ingress"],
    ["nodes"],
    ["nodes", "list"],
    ["nodes", "get"],
    ["schedules"],
    ["schedules", "apply"],
    ["simulate-nodes"],
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "onex")
def test_every_help_teaches_with_an_example(command: list[str]) -> None:
    """`--help` of the program and of each subcommand shows an example invocation."""
    result = runner.invoke(app, [*command, "--help"])
    assert result.exit_code == 0, result.output
    assert "onex " in result.output
    assert "Example" in result.output or "Start here" in result.output, result.output


def test_a_bad_setting_exits_2_naming_the_variable(cli_env: dict[str, str]) -> None:
    """An invalid environment value is bad input: exit 2 and the variable's name."""
    result = runner.invoke(app, ["dev", "status"], env={**cli_env, "ONEX_POSTGRES__PORT": "x"})
    assert result.exit_code == ExitCode.BAD_INPUT
    assert "ONEX_POSTGRES__PORT" in result.output


def test_status_of_a_stack_never_started(cli_env: dict[str, str]) -> None:
    """Status works before any `up`: every service stopped, exit 6, valid JSON."""
    result = runner.invoke(app, ["dev", "status", "--json"], env=cli_env)
    assert result.exit_code == ExitCode.UNAVAILABLE
    services = json.loads(result.stdout)
    assert [s["name"] for s in services] == ["temporal", "postgres", "kafka", "valkey"]
    assert {s["state"] for s in services} == {"stopped"}


def test_logs_of_a_stack_never_started(cli_env: dict[str, str]) -> None:
    """Logs says there is no log yet instead of failing."""
    result = runner.invoke(app, ["dev", "logs", "kafka"], env=cli_env)
    assert result.exit_code == ExitCode.OK
    assert "no log yet" in result.output


def test_down_of_a_stack_never_started(cli_env: dict[str, str]) -> None:
    """Down with nothing running is a no-op that says so."""
    result = runner.invoke(app, ["dev", "down"], env=cli_env)
    assert result.exit_code == ExitCode.OK
    assert "nothing was running" in result.output


def test_register_node_refuses_bad_input_before_contacting_anything(
    cli_env: dict[str, str],
) -> None:
    """A malformed request is refused with exit 2 and every problem, without a server."""
    result = runner.invoke(
        app,
        [
            "register-node",
            "--node-type",
            "gadget",
            "--service-name",
            "Bad Name",
            "--address",
            "x",
            "--port",
            "0",
            "--health-url",
            "not-a-url",
            "--meta",
            "novalue",
        ],
        env={**cli_env, "ONEX_TEMPORAL__PORT": "1"},
    )
    assert result.exit_code == ExitCode.BAD_INPUT
    assert "--meta takes key=value" in result.output


def test_status_of_an_unknown_workflow_is_not_found_or_unavailable(
    cli_env: dict[str, str],
) -> None:
    """Without a reachable Temporal, the command says which address it tried (exit 6)."""
    result = runner.invoke(
        app, ["status", "onex-register-node-x"], env={**cli_env, "ONEX_TEMPORAL__PORT": "1"}
    )
    assert result.exit_code == ExitCode.UNAVAILABLE
    assert "127.0.0.1:1" in result.output


def test_worker_with_vault_away_exits_6_without_a_traceback(
    temporal_env: WorkflowEnvironment, cli_env: dict[str, str]
) -> None:
    """A worker whose secret store is unreachable says so and exits 6: no traceback, no
    token, no Vault path."""
    host, port = temporal_env.client.service_client.config.target_host.rsplit(":", 1)
    env = {
        **cli_env,
        "ONEX_TEMPORAL__HOST": host,
        "ONEX_TEMPORAL__PORT": port,
        "ONEX_VAULT__ADDRESS": f"http://127.0.0.1:{free_port()}",
        "ONEX_VAULT__TOKEN": "hvs.worker-token-51a8",
        "ONEX_SECRETS__SOURCES": '{"database.postgres.password": "vault:team/db#password"}',
    }
    result = runner.invoke(app, ["worker"], env=env)
    assert result.exit_code == ExitCode.UNAVAILABLE, result.output
    assert "cannot start the worker" in result.output
    assert "Traceback" not in result.output
    assert "worker-token" not in result.output
    assert "team/db" not in result.output


ERRORS_AND_CODES = [
    (SettingsError("ONEX_POSTGRES__PORT: not a number"), ExitCode.BAD_INPUT),
    (PlanError("step names no handler"), ExitCode.BAD_INPUT),
    (HandlerLoadError("refused", loader_code="HANDLER_LOADER_001"), ExitCode.BAD_INPUT),
    (OperationNotFound("onex-register-node-x"), ExitCode.NOT_FOUND),
    (OperationFinished("onex-register-node-x", OperationStatus.SUCCESS), ExitCode.BAD_INPUT),
    (CompensationFailedError("undo failed"), ExitCode.FAILED),
    (InfraConnectionError("refused"), ExitCode.UNAVAILABLE),
    (DemoEventsMissing("not on Kafka"), ExitCode.UNAVAILABLE),
    (SecretResolutionError("no such secret"), ExitCode.UNAVAILABLE),
    (StackError("kafka did not start"), ExitCode.UNAVAILABLE),
    (PortInUseError("port taken"), ExitCode.UNAVAILABLE),
    (WorkerStartError("postgres handler"), ExitCode.UNAVAILABLE),
    (KeyboardInterrupt(), ExitCode.INTERRUPTED),
    (ZeroDivisionError("a bug"), ExitCode.UNEXPECTED),
]


@pytest.mark.parametrize(
    ("error", "code"), ERRORS_AND_CODES, ids=lambda value: type(value).__name__
)
def test_exit_codes_follow_the_error_tree(error: BaseException, code: ExitCode) -> None:
    """A command that raises exits with the code of the most specific class mapped."""
    assert exit_code_for(error) is code, (
        f"{type(error).__name__} should exit {code.name}: fix EXIT_CODES in "
        "workers/cli/exit_codes.py (or the class's place in the error tree)"
    )


def test_a_failure_exits_with_its_code_and_one_line_not_a_traceback() -> None:
    """`run` turns what the work raised into its code and a one-line message; a bug says it
    is one, without a traceback."""

    def missing() -> None:
        raise OperationNotFound("no operation x")

    with pytest.raises(typer.Exit) as not_found:
        run(missing)
    assert not_found.value.exit_code == ExitCode.NOT_FOUND

    def bug() -> None:
        raise ZeroDivisionError("division by zero")

    app_with_a_bug = typer.Typer(pretty_exceptions_enable=False)
    app_with_a_bug.command()(lambda: run(bug))
    result = runner.invoke(app_with_a_bug, [])
    assert result.exit_code == ExitCode.UNEXPECTED
    assert "unexpected ZeroDivisionError: division by zero" in result.output
    assert "a bug" in result.output
    assert "Traceback" not in result.output


def test_a_bootstrap_address_with_userinfo_stops_create_topics_before_it_connects(
    cli_env: dict[str, str],
) -> None:
    """`onex kafka create-topics` with a password in ONEX_KAFKA__BOOTSTRAP_SERVERS (no
    scheme) exits 2 naming the variable; nothing connected, so no client library logged the
    address, and the password appears nowhere in the output."""
    env = {
        **cli_env,
        "ONEX_KAFKA__BOOTSTRAP_SERVERS": f"onex:{planted.SASL_PASSWORD}@127.0.0.1:{free_port()}",
    }
    result = runner.invoke(app, ["kafka", "create-topics"], env=env)
    assert result.exit_code == ExitCode.BAD_INPUT, result.output
    assert "ONEX_KAFKA__BOOTSTRAP_SERVERS" in result.output
    assert planted.SASL_PASSWORD not in result.output
    assert "Unable connect to" not in result.output


def test_a_failing_command_shows_the_library_line_that_explains_it(
    cli_env: dict[str, str],
) -> None:
    """`onex kafka create-topics` with no broker exits 6; the client library's own line
    (held back while the command ran) is shown before the error, sanitized, without a
    traceback."""
    env = {**cli_env, "ONEX_KAFKA__BOOTSTRAP_SERVERS": f"127.0.0.1:{free_port()}"}
    result = runner.invoke(app, ["kafka", "create-topics"], env=env)
    assert result.exit_code == ExitCode.UNAVAILABLE, result.output
    assert "Unable connect to" in result.output, (
        "aiokafka's connection error explains the failure: show_library_logs() in fail() "
        f"should print it; got: {result.output}"
    )
    assert result.output.index("Unable connect to") < result.output.index("error: cannot create")
    assert "Traceback" not in result.output


@pytest.mark.parametrize("status", list(OperationStatus), ids=lambda s: s.value)
def test_every_operation_status_has_an_exit_code(status: OperationStatus) -> None:
    """A status the table does not know would end a command in a KeyError."""
    assert status in STATUS_EXIT


def test_a_mistyped_meta_pair_is_refused_without_echoing_it(cli_env: dict[str, str]) -> None:
    """`--meta password:<value>` (a colon for `=`) is refused by position, never echoed."""
    secret = "Zq8vN3kP2mX7wR4t"
    result = runner.invoke(
        app,
        [
            "register-node",
            "--node-type",
            "effect",
            "--service-name",
            "billing",
            "--address",
            "10.0.0.7",
            "--port",
            "8080",
            "--health-url",
            "http://10.0.0.7:8080/health",
            "--meta",
            f"password:{secret}",
        ],
        env={**cli_env, "ONEX_TEMPORAL__PORT": "1"},
    )
    assert result.exit_code == ExitCode.BAD_INPUT
    assert "argument 1 has no '='" in result.output
    assert secret not in result.output
