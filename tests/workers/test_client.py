"""The client helpers: plans compiled from the contracts alone, once, and a typed API that
starts operations on a real Temporal server (the backends are scripted)."""

from __future__ import annotations

import asyncio
import inspect
import subprocess
import sys
import typing
import uuid
from pathlib import Path

import pytest
from temporalio.testing import WorkflowEnvironment

from contracts.operation_contract import PlanError, compile_plan
from contracts.operations_io import OperationResult, OperationStatus
from contracts.registry import DeregisterNodeRequest
from contracts.search_attributes import CORRELATION_ID, NODE_ID, ONEX_OPERATION
from tests.support import wait_until
from tests.workflows.scenarios import Backends, request, worker
from workers import client as client_module
from workers.client import (
    OperationFinished,
    OperationNotFound,
    Operations,
    deregister_node,
    get_status,
    register_node,
    result_of,
    retry_failed,
    start_operation,
    start_register_node,
)
from workers.settings import OnexSettings, WorkerSettings
from workers.validate import validate_contracts

ROOT = Path(__file__).resolve().parents[2]
BACKEND_LIBRARIES = ("asyncpg", "aiokafka", "consul", "hvac")

HANDLER = """\
handler_name: ghost
handler_class: nowhere_installed.ghost:GhostHandler
handler_type: effect
transport: http
operations:
  haunt: {idempotent: true, compensation: unhaunt}
  unhaunt: {idempotent: true}
  enqueue_event: {idempotent: true}
"""

OPERATION = """\
operation: haunt_node
version: 1
input_model: contracts.registry:RegisterNodeRequest
workflow_id: onex-haunt-{node_id}
steps:
  - {backend: ghost, handler: ghost, operation: haunt}
events: {via: ghost.enqueue_event}
"""


def _contracts(root: Path, operation: str = OPERATION) -> tuple[Path, Path]:
    handlers, operations = root / "handlers", root / "operations"
    (handlers / "ghost").mkdir(parents=True)
    (handlers / "ghost" / "handler_contract.yaml").write_text(HANDLER)
    operations.mkdir()
    (operations / "haunt_node.yaml").write_text(operation)
    return handlers, operations


def test_compiling_the_plans_imports_no_backend_library() -> None:
    """In a fresh interpreter, importing the client helpers and compiling the configured plans
    leaves asyncpg, aiokafka, consul and hvac unimported: a process that only starts
    operations does not pay for (or need) the worker's libraries."""
    code = (
        "import sys\n"
        "from workers.client import Operations\n"
        "from workers.settings import OnexSettings\n"
        "plans = Operations.load(OnexSettings()).plans\n"
        "assert sorted(plans) == ['deregister_node', 'register_node'], sorted(plans)\n"
        f"print(','.join(m for m in {BACKEND_LIBRARIES!r} if m in sys.modules))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stderr
    imported = done.stdout.strip()
    assert imported == "", (
        f"the client imported {imported}: something on its path imports a handler module "
        "(workers.loader, activities.<backend>); read contracts through workers.contract_files"
    )


def test_the_plans_are_the_ones_the_worker_checks_compile() -> None:
    """The contract-only reading gives the same plans as the worker's full validation (which
    imports and checks every handler class), so the light path drops checks, not meaning."""
    settings = OnexSettings()
    report = validate_contracts(settings)
    assert report.ok, report.problems
    expected = {
        name: compile_plan(contract, report.handlers)
        for name, contract in report.operations.items()
    }
    assert dict(Operations.load(settings).plans) == expected


def test_plans_compile_without_importing_the_handler_classes(tmp_path: Path) -> None:
    """A handler whose class is not installed still yields a plan: the client checks the
    schema only, and never imports the module the contract names (the worker does)."""
    handlers, operations = _contracts(tmp_path)
    compiled = Operations.compile(handler_paths=[handlers], operation_paths=[operations])
    plan = compiled.plans["haunt_node"]
    assert [(s.activity, s.compensation_activity) for s in plan.steps] == [
        ("ghost.haunt", "ghost.unhaunt")
    ]
    assert "nowhere_installed" not in sys.modules, "compiling imported the handler's module"


def test_every_contract_problem_is_reported_at_once(tmp_path: Path) -> None:
    """An unreadable contract, a step naming an unknown operation and a supersede of an
    operation no contract defines are all in the one PlanError, the first with its loader
    code."""
    broken = OPERATION.replace("haunt}", "possess}") + "supersedes: [exorcise_node]\n"
    handlers, operations = _contracts(tmp_path, broken)
    (operations / "broken.yaml").write_text("operation: [")
    with pytest.raises(PlanError) as raised:
        Operations.compile(handler_paths=[handlers], operation_paths=[operations])
    message = str(raised.value)
    assert "HANDLER_LOADER_002" in message, message
    assert "has no operation 'possess'" in message, message
    assert "supersedes exorcise_node, which no operation contract defines" in message, message


def test_the_configured_plans_are_compiled_once_and_failures_are_not_kept(
    tmp_path: Path,
) -> None:
    """Operations.load returns the same object for the same configured paths (the helpers
    never re-read the YAML per call), another object for other paths, and a failed compile
    is tried again once the contracts are fixed."""
    builtin = OnexSettings()
    assert Operations.load(builtin) is Operations.load(builtin)

    handlers, operations = _contracts(tmp_path, "operation: [")
    elsewhere = OnexSettings(
        worker=WorkerSettings(contract_paths=[handlers], operation_paths=[operations])
    )
    with pytest.raises(PlanError):
        Operations.load(elsewhere)
    (operations / "haunt_node.yaml").write_text(OPERATION)
    fixed = Operations.load(elsewhere)
    assert sorted(fixed.plans) == ["haunt_node"], "a failed compile must not be cached"
    assert fixed is not Operations.load(builtin)


def _mentions_any(hint: object) -> bool:
    return hint is typing.Any or any(_mentions_any(arg) for arg in typing.get_args(hint))


def test_public_signatures_have_no_any() -> None:
    """Every public helper's parameters and return type are real types, so a caller's mypy
    checks what it passes and what it gets back (no ``Any`` leaks out)."""
    helpers = [
        value
        for name, value in vars(client_module).items()
        if inspect.iscoroutinefunction(value) and not name.startswith("_")
    ]
    assert {h.__name__ for h in helpers} >= {"register_node", "start_register_node"}
    leaking = {
        helper.__name__: name
        for helper in helpers
        for name, hint in typing.get_type_hints(helper).items()
        if _mentions_any(hint)
    }
    assert leaking == {}, f"annotate these with real types instead of Any: {leaking}"


def _settings(task_queue: str) -> OnexSettings:
    return OnexSettings(worker=WorkerSettings(task_queue=task_queue))


async def test_start_attaches_to_a_running_operation_and_tags_it(
    temporal_env: WorkflowEnvironment, task_queue: str
) -> None:
    """Without a correlation id, the client mints one; the operation workflow carries the
    search attributes from its start; a second start of the same request attaches to the
    running operation, and the handle's result is the typed OperationResult."""
    client, settings = temporal_env.client, _settings(task_queue)
    node = request(node_id=uuid.uuid4(), correlation_id=None)
    release = asyncio.Event()

    async def held(call: int) -> None:
        await release.wait()

    backends = Backends()
    backends.script("consul.register_service", held)
    async with worker(client, task_queue, backends):
        first = await start_register_node(client, node, settings=settings)
        second = await start_register_node(client, node, settings=settings)
        assert second.id == first.id

        async def started() -> bool:
            return bool(backends.calls["consul.register_service"])

        await wait_until(started, within=30, what="the operation to start its steps")
        attributes = (await client.get_workflow_handle(first.id).describe()).typed_search_attributes
        release.set()
        result = await result_of(second)
    assert attributes.get(ONEX_OPERATION) == "register_node"
    assert attributes.get(NODE_ID) == str(node.node_id)
    minted = attributes.get(CORRELATION_ID)
    assert minted is not None, "the client must mint a correlation id when the request has none"
    assert isinstance(result, OperationResult)
    assert result.status is OperationStatus.SUCCESS, result
    assert str(result.correlation_id) == minted
    assert len(backends.calls["consul.register_service"]) == 1, "attached, not run twice"


async def test_the_waiting_helpers_return_results_and_refuse_what_cannot_be_done(
    temporal_env: WorkflowEnvironment, task_queue: str
) -> None:
    """register_node, deregister_node and run through start_operation end with their
    results; a finished operation cannot be retried (OperationFinished says how it ended)
    and an unknown workflow id is OperationNotFound."""
    client, settings = temporal_env.client, _settings(task_queue)
    node = request(node_id=uuid.uuid4())
    async with worker(client, task_queue, Backends()):
        registered = await register_node(client, node, settings=settings)
        removed = await deregister_node(
            client,
            DeregisterNodeRequest(node_id=node.node_id, node_type=node.node_type),
            settings=settings,
        )
        again = await result_of(
            await start_operation(client, "register_node", node, settings=settings)
        )
        with pytest.raises(OperationFinished) as finished:
            await retry_failed(client, registered.workflow_id)
        with pytest.raises(OperationNotFound):
            await get_status(client, f"onex-no-such-{uuid.uuid4()}")
    assert (registered.operation, registered.status) == ("register_node", OperationStatus.SUCCESS)
    assert (removed.operation, removed.status) == ("deregister_node", OperationStatus.SUCCESS)
    assert again.status is OperationStatus.SUCCESS
    assert finished.value.status is OperationStatus.SUCCESS
