"""Every `onex` command ends cleanly: nothing of the Temporal SDK outlives it, and the process
exits with the documented code every time, not only most of the time."""

from __future__ import annotations

import gc
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from temporalio.client import Client
from temporalio.runtime import Runtime
from temporalio.testing import WorkflowEnvironment
from typer.testing import CliRunner

from workers.cli import app
from workers.cli.exit_codes import ExitCode

BIN = Path(sys.executable).parent
RUNS = 200
# Enough runs at once to keep the test short on two cores; the crash does not need load.
CONCURRENT = 4


def _temporal_env(temporal_env: WorkflowEnvironment, cli_env: dict[str, str]) -> dict[str, str]:
    host, port = temporal_env.client.service_client.config.target_host.rsplit(":", 1)
    return {**cli_env, "ONEX_TEMPORAL__HOST": host, "ONEX_TEMPORAL__PORT": port}


def _sdk_objects() -> dict[int, str]:
    """The Temporal clients and runtimes alive in this process, by id."""
    return {
        id(obj): type(obj).__name__ for obj in gc.get_objects() if isinstance(obj, Client | Runtime)
    }


def test_a_command_leaves_no_temporal_client_or_runtime_alive(
    temporal_env: WorkflowEnvironment, cli_env: dict[str, str]
) -> None:
    """`onex status` of an unknown workflow exits 5, and when it returns, the client and the
    runtime it created are gone (not merely unreferenced): none is left for the interpreter
    to finalize while its Rust threads still run."""
    env = _temporal_env(temporal_env, cli_env)
    before = _sdk_objects()
    result = CliRunner().invoke(app, ["status", "onex-register-node-nobody"], env=env)
    assert result.exit_code == ExitCode.NOT_FOUND, result.output

    def left() -> dict[int, str]:
        gc.collect()
        return {key: name for key, name in _sdk_objects().items() if key not in before}

    # The SDK's own threads may hold the last reference for a moment after the command
    # returns (on a loaded machine); what must never happen is a reference that stays.
    deadline = time.monotonic() + 10
    while left() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not left(), (
        f"the command left {sorted(left().values())} alive: something still references the "
        "client (a traceback, a returned handle); run the work through workers.cli.common.run "
        "and return plain data from it"
    )


def _onex_status(env: dict[str, str], run: int) -> tuple[int, int, str]:
    done = subprocess.run(
        [str(BIN / "onex"), "status", f"onex-register-node-nobody-{run}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    return run, done.returncode, done.stderr


@pytest.mark.timeout(600)
def test_onex_status_exits_5_every_time(
    temporal_env: WorkflowEnvironment, cli_env: dict[str, str]
) -> None:
    """The console script `onex status <unknown id>` against a real Temporal server, 200 times
    (a few at once): every run exits 5, not found, with its one-line message. A client still
    alive at interpreter exit made about one run in ten abort (SIGABRT) or crash after
    printing the right answer."""
    env = {**os.environ, **_temporal_env(temporal_env, cli_env)}
    with ThreadPoolExecutor(CONCURRENT) as pool:
        outcomes = list(pool.map(lambda run: _onex_status(env, run), range(RUNS)))
    bad = [
        (run, code, stderr)
        for run, code, stderr in outcomes
        if code != ExitCode.NOT_FOUND or "no operation with workflow id" not in stderr
    ]
    details = "\n".join(
        f"run {run}: exit {code}: {stderr.strip()[-400:]}" for run, code, stderr in bad
    )
    assert not bad, (
        f"{len(bad)} of {RUNS} runs did not exit 5 with the not-found message "
        f"(exit codes {sorted({code for _, code, _ in bad})}); -6 or -11 (SIGABRT, SIGSEGV: 134 "
        "or 139 in a shell) means the Temporal SDK was still alive when the interpreter "
        f"finalized: see workers.cli.common.run\n{details}"
    )
