"""The worker host: activities from contracts, disabled and refused handlers, graceful drain."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from temporalio.client import Client
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from tests.sample_workflows import RunActivity, RunActivityWorkflow
from tests.support import wait_until
from workers.host import WorkerHost, WorkerStartError
from workers.settings import OnexSettings, WorkerSettings

REPO = Path(__file__).resolve().parents[2]
NAMESPACES = ["activities.", "tests.plugins."]


def write_contract(root: Path, name: str, handler_class: str, operation: str) -> None:
    directory = root / name
    directory.mkdir(parents=True)
    (directory / "handler_contract.yaml").write_text(
        f"handler_name: {name}\n"
        f"handler_class: {handler_class}\n"
        "handler_type: effect\n"
        "transport: http\n"
        f"operations:\n  {operation}: {{idempotent: true}}\n"
    )


@pytest.fixture
def contracts_dir(tmp_path: Path) -> Path:
    root = tmp_path / "contracts"
    write_contract(root, "echo", "tests.plugins.echo:EchoHandler", "echo")
    write_contract(root, "sleepy", "tests.plugins.slow:SlowHandler", "wait_then_echo")
    write_contract(root, "catalog", "tests.plugins.slow:DisabledHandler", "register_service")
    write_contract(root, "outsider", "elsewhere.plugins:Handler", "anything")
    return root


def settings_for(contracts_dir: Path, task_queue: str) -> OnexSettings:
    return OnexSettings(
        worker=WorkerSettings(
            task_queue=task_queue,
            contract_paths=[contracts_dir],
            allowed_namespaces=NAMESPACES,
            graceful_shutdown_timeout=10,
        )
    )


async def test_host_serves_handlers_and_reports_disabled_and_refused(
    temporal_env: WorkflowEnvironment, contracts_dir: Path, task_queue: str
) -> None:
    """Each operation is an activity named <handler>.<operation>; a disabled handler's step is
    reported as skipped with its reason; a refused contract is listed, the rest still serve."""
    host = WorkerHost(
        settings_for(contracts_dir, task_queue),
        temporal_env.client,
        workflows=[RunActivityWorkflow],
    )
    report = await host.start()
    assert report.activities == ["catalog.register_service", "echo.echo", "sleepy.wait_then_echo"]
    assert [h["handler"] for h in report.loaded] == ["echo", "sleepy"]
    assert report.disabled == [
        {"handler": "catalog", "reason": "no Consul address is configured (ONEX_CONSUL__ADDRESS)"}
    ]
    assert [r["code"] for r in report.refused] == ["HANDLER_LOADER_013"]

    stop = asyncio.Event()
    serving = asyncio.create_task(host.run(stop))
    try:
        echoed = await temporal_env.client.execute_workflow(
            RunActivityWorkflow.run,
            RunActivity(activity="echo.echo", argument={"text": "hi"}),
            id=f"host-{uuid.uuid4()}",
            task_queue=task_queue,
        )
        skipped = await temporal_env.client.execute_workflow(
            RunActivityWorkflow.run,
            RunActivity(
                activity="catalog.register_service",
                argument={"text": "x", "seconds": 0, "started_marker": "/nonexistent"},
            ),
            id=f"host-{uuid.uuid4()}",
            task_queue=task_queue,
        )
    finally:
        stop.set()
        await serving
    assert echoed == {"text": "HI"}
    assert skipped == {
        "skipped": True,
        "reason": "no Consul address is configured (ONEX_CONSUL__ADDRESS)",
    }


async def test_nothing_to_serve_is_an_error(
    temporal_env: WorkflowEnvironment, tmp_path: Path, task_queue: str
) -> None:
    """A worker with no handler and no workflow refuses to start, saying why."""
    (tmp_path / "empty").mkdir()
    host = WorkerHost(settings_for(tmp_path / "empty", task_queue), temporal_env.client)
    with pytest.raises(WorkerStartError, match="nothing to do"):
        await host.start()


def _worker_env(env: WorkflowEnvironment, contracts_dir: Path, task_queue: str) -> dict[str, str]:
    host, port = env.client.service_client.config.target_host.rsplit(":", 1)
    return {
        **os.environ,
        "PYTHONPATH": str(REPO),
        "ONEX_TEMPORAL__HOST": host,
        "ONEX_TEMPORAL__PORT": port,
        "ONEX_WORKER__TASK_QUEUE": task_queue,
        "ONEX_WORKER__CONTRACT_PATHS": json.dumps([str(contracts_dir)]),
        "ONEX_WORKER__ALLOWED_NAMESPACES": json.dumps(NAMESPACES),
        "ONEX_WORKER__GRACEFUL_SHUTDOWN_TIMEOUT": "20",
    }


async def test_onex_worker_drains_an_in_flight_activity_on_sigterm(
    temporal_env: WorkflowEnvironment, contracts_dir: Path, task_queue: str, tmp_path: Path
) -> None:
    """`onex worker` as a subprocess prints its handler report, serves, and on SIGTERM while
    an activity runs exits 0 within the drain timeout, the activity completed: the workflow
    finishes on its first attempt."""
    output = tmp_path / "worker.out"
    with output.open("w") as sink:
        process = subprocess.Popen(
            [str(Path(sys.executable).parent / "onex"), "worker"],
            env=_worker_env(temporal_env, contracts_dir, task_queue),
            stdout=sink,
            stderr=subprocess.STDOUT,
            cwd=REPO,
        )
    try:

        async def serving() -> bool:
            assert process.poll() is None, output.read_text()
            return "serving 3 activities" in output.read_text()

        await wait_until(serving, within=60, what="the worker to report that it is serving")
        report = output.read_text()
        assert "loaded   echo" in report
        assert "disabled catalog" in report
        assert "refused  outsider" in report

        marker = tmp_path / "started"
        client: Client = temporal_env.client
        # The subprocess serves the activities; this process runs the workflow.
        async with Worker(client, task_queue=task_queue, workflows=[RunActivityWorkflow]):
            handle = await client.start_workflow(
                RunActivityWorkflow.run,
                RunActivity(
                    activity="sleepy.wait_then_echo",
                    argument={"text": "drained", "seconds": 3, "started_marker": str(marker)},
                ),
                id=f"drain-{uuid.uuid4()}",
                task_queue=task_queue,
            )

            async def activity_running() -> bool:
                return marker.exists()

            await wait_until(activity_running, within=30, what="the slow activity to start")
            process.send_signal(signal.SIGTERM)

            async def exited() -> bool:
                return process.poll() is not None

            await wait_until(exited, within=25, what="the worker to exit after draining")
            assert process.returncode == 0, output.read_text()
            assert await handle.result() == {"text": "DRAINED"}
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    history = await handle.fetch_history()
    started = [
        e.activity_task_started_event_attributes.attempt
        for e in history.events
        if e.HasField("activity_task_started_event_attributes")
    ]
    assert started == [1], "the activity must have completed on its first attempt"
