"""``onex register-node | deregister-node | retry | status``: thin wrappers over the
client helpers in :mod:`workers.client`, which Python users call directly."""

from __future__ import annotations

import json
import uuid
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, NoReturn, TypeVar

import typer
from rich.table import Table
from temporalio.client import Client, WorkflowUpdateFailedError
from temporalio.service import RPCError

from contracts.errors import ConfigurationError, InfraUnavailableError
from contracts.node import NodeState, node_workflow_id
from contracts.operations_io import OperationResult, OperationStatus
from contracts.registry import DeregisterNodeRequest, RegisterNodeRequest
from workers.cli.common import (
    JsonOption,
    console,
    fail,
    run,
    run_async,
    settings_or_exit,
    temporal_client,
)
from workers.cli.exit_codes import STATUS_EXIT, ExitCode
from workers.client import (
    OperationNotFound,
    Operations,
    abandon_compensation,
    deregister_node,
    get_node_state,
    get_status,
    register_node,
    resume_compensation,
    retry_failed,
    start_deregister_node,
    start_register_node,
)
from workers.settings import OnexSettings

R = TypeVar("R")


def with_client(settings: OnexSettings, action: Callable[[Client], Awaitable[R]]) -> R:
    """``action(client)`` with a client of its own, or exit as :func:`run` does.

    ``action`` returns plain data: the client is gone when this returns.
    """

    async def body() -> R:
        async with temporal_client(settings) as client:
            return await action(client)

    return run_async(body)


def result_table(result: OperationResult) -> Table:
    table = Table(title=f"{result.operation}: {result.status.value}")
    for column in ("backend", "status", "attempts", "ms", "detail"):
        table.add_column(column)
    for backend in result.backends:
        detail = backend.error or backend.skip_reason or ""
        if backend.error_type:
            detail = f"{backend.error_type}: {detail}"
        if backend.superseded_reason:  # the undo left newer work alone: say whose
            detail = "; ".join(
                filter(None, (detail, f"undo superseded: {backend.superseded_reason}"))
            )
        table.add_row(
            backend.backend,
            backend.status.value,
            str(backend.attempts),
            f"{backend.duration_ms:.0f}",
            detail,
        )
    return table


def report(result: OperationResult, *, as_json: bool) -> NoReturn:
    """Print the result and exit with the code its status calls for."""
    if as_json:
        typer.echo(result.model_dump_json(indent=2))
    else:
        console.print(result_table(result))
        console.print(f"workflow id:    {result.workflow_id}", markup=False, highlight=False)
        console.print(f"correlation id: {result.correlation_id}", markup=False, highlight=False)
        for line in _report_notes(result):
            console.print(line, markup=False, highlight=False)
    raise typer.Exit(STATUS_EXIT[result.status])


def _report_notes(result: OperationResult) -> list[str]:
    """What the operator should know (and may do) beyond the table."""
    notes = []
    if result.reason:
        notes.append(f"reason:         {result.reason}")
    if result.undelivered_events:
        notes.append(
            "undelivered events (not queued in the outbox): " + ", ".join(result.undelivered_events)
        )
    if result.status is OperationStatus.PARTIAL:
        notes.append(f"retry with: onex retry {result.workflow_id}")
    if result.status is OperationStatus.COMPENSATION_PAUSED:
        notes.append(
            f"fix the backend, then: onex compensate {result.workflow_id} --resume\n"
            f"or, once undone by hand: onex compensate {result.workflow_id} --abandon "
            '--reason "..."'
        )
    return notes


def _parse_metadata(pairs: list[str]) -> dict[str, str]:
    metadata = {}
    for number, pair in enumerate(pairs, start=1):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            # Never echo the pair: a mistyped `password:<value>` would print the value.
            fail(ExitCode.BAD_INPUT, f"--meta takes key=value (argument {number} has no '=')")
        metadata[key] = value
    return metadata


def _request_or_exit(model: type[R], data: dict[str, Any]) -> R:
    return run(lambda: model.model_validate(data))  # type: ignore[attr-defined, no-any-return]


def _load_operations(settings: OnexSettings) -> Operations:
    try:
        return Operations.load(settings)
    except ValueError as exc:  # the contracts are invalid: they must change first
        raise ConfigurationError(str(exc)) from exc


def _start(
    settings: OnexSettings,
    starter: Callable[..., Awaitable[Any]],
    request: Any,
    *,
    as_json: bool,
) -> None:
    operations = run(lambda: _load_operations(settings))

    async def start(client: Client) -> OperationResult | dict[str, str | None]:
        outcome = await starter(client, request, settings=settings, operations=operations)
        if isinstance(outcome, OperationResult):
            return outcome
        # A handle: only its ids leave the event loop (the handle holds the client).
        return {
            "workflow_id": outcome.id,
            "node_workflow_id": outcome.node_workflow_id,
            "status": "accepted",
        }

    outcome = with_client(settings, start)
    if isinstance(outcome, OperationResult):
        report(outcome, as_json=as_json)
    if as_json:
        typer.echo(json.dumps(outcome))
        return
    typer.echo(f"accepted {outcome['workflow_id']}")
    if outcome["node_workflow_id"]:
        typer.echo(f"the node's queue: onex status {outcome['node_workflow_id']}")


def register_node_command(
    node_type: Annotated[str, typer.Option(help="effect, compute, reducer or orchestrator")],
    service_name: Annotated[str, typer.Option(help="Lower-case service name, e.g. billing")],
    address: Annotated[str, typer.Option(help="Host or IP the node serves on")],
    port: Annotated[int, typer.Option(help="Port the node serves on")],
    health_url: Annotated[str, typer.Option(help="HTTP health endpoint Consul will poll")],
    node_id: Annotated[
        str | None, typer.Option(help="The node's UUID (a new one when omitted)")
    ] = None,
    node_version: Annotated[str, typer.Option("--version", help="Semantic version")] = "0.1.0",
    tag: Annotated[list[str] | None, typer.Option(help="A tag (repeatable)")] = None,
    meta: Annotated[list[str] | None, typer.Option(help="key=value metadata (repeatable)")] = None,
    correlation_id: Annotated[str | None, typer.Option(help="Reuse a correlation id")] = None,
    wait: Annotated[bool, typer.Option(help="Wait for the outcome")] = True,
    as_json: JsonOption = False,
) -> None:
    """Register a node in Consul and PostgreSQL at once (workflow onex-register-node-<id>).

    A registration still running for the same node is attached to, not duplicated. Exit 0
    success, 3 partial (retry with `onex retry`), 4 failed or compensated, 2 bad input.

    Example: onex register-node --node-type effect --service-name billing --address 10.0.0.7
    --port 8080 --health-url http://10.0.0.7:8080/health --tag blue
    """
    settings = settings_or_exit()
    request = _request_or_exit(
        RegisterNodeRequest,
        {
            "node_id": node_id or str(uuid.uuid4()),
            "node_type": node_type,
            "node_version": node_version,
            "service_name": service_name,
            "address": address,
            "port": port,
            "tags": tag or [],
            "endpoints": {"health": health_url},
            "metadata": _parse_metadata(meta or []),
            "correlation_id": correlation_id,
        },
    )
    starter = register_node if wait else start_register_node
    _start(settings, starter, request, as_json=as_json)


def deregister_node_command(
    node_id: Annotated[str, typer.Option(help="The node's UUID")],
    node_type: Annotated[str, typer.Option(help="effect, compute, reducer or orchestrator")],
    reason: Annotated[str, typer.Option(help="Why, for the deregistered event")] = "requested",
    correlation_id: Annotated[str | None, typer.Option(help="Reuse a correlation id")] = None,
    wait: Annotated[bool, typer.Option(help="Wait for the outcome")] = True,
    as_json: JsonOption = False,
) -> None:
    """Remove a node from Consul and deactivate it in PostgreSQL (all or nothing).

    Example: onex deregister-node --node-id 3f1c2d9e-8b7a-4c1e-9f0a-2b3c4d5e6f70 --node-type effect
    """
    settings = settings_or_exit()
    request = _request_or_exit(
        DeregisterNodeRequest,
        {
            "node_id": node_id,
            "node_type": node_type,
            "reason": reason,
            "correlation_id": correlation_id,
        },
    )
    starter = deregister_node if wait else start_deregister_node
    _start(settings, starter, request, as_json=as_json)


def _send_update(
    workflow_id: str,
    verb: str,
    send: Callable[[Client], Awaitable[OperationResult]],
    *,
    as_json: bool,
) -> NoReturn:
    """Send one Update to an operation and report the result it answers with."""
    settings = settings_or_exit()

    async def update(client: Client) -> OperationResult:
        try:
            return await send(client)
        except OperationNotFound:
            raise OperationNotFound(f"no operation with workflow id {workflow_id!r}") from None
        except WorkflowUpdateFailedError as refused:
            raise ConfigurationError(f"{verb} refused: {refused.cause}") from None
        except RPCError as error:
            raise InfraUnavailableError(f"cannot {verb} {workflow_id}: {error.message}") from None

    report(with_client(settings, update), as_json=as_json)


def retry_command(
    workflow_id: Annotated[str, typer.Argument(help="The partial operation's workflow id")],
    backend: Annotated[
        str | None, typer.Option(help="Retry only this failed backend (default: all failed)")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Re-run the failed backends of a partial operation; succeeded ones are never repeated.

    Refused (exit 2) when the operation is not partial, or the backend is unknown or did not
    fail. Exit 5 when there is no such workflow.

    Example: onex retry onex-register-node-3f1c2d9e-8b7a-4c1e-9f0a-2b3c4d5e6f70 --backend consul
    """
    _send_update(
        workflow_id,
        "retry",
        lambda client: retry_failed(client, workflow_id, backend),
        as_json=as_json,
    )


def compensate_command(
    workflow_id: Annotated[
        str, typer.Argument(help="The workflow id of an operation in compensation_paused")
    ],
    resume: Annotated[
        bool, typer.Option("--resume", help="Run the stuck compensations again")
    ] = False,
    abandon: Annotated[
        bool,
        typer.Option("--abandon", help="Give up on them: the operation ends compensation_failed"),
    ] = False,
    reason: Annotated[
        str | None, typer.Option(help="Why you abandon (required with --abandon; kept in history)")
    ] = None,
    as_json: JsonOption = False,
) -> None:
    """Settle an operation whose undo is paused (status compensation_paused, exit 3).

    A compensation that kept failing pauses the operation instead of ending it, so that
    nothing is left half undone without someone knowing. Fix the backend, then --resume; or,
    after undoing by hand, --abandon with a --reason. Refused (exit 2) when the operation is
    not paused; exit 5 when there is no such workflow.

    Example: onex compensate onex-register-node-3f1c2d9e-8b7a-4c1e-9f0a-2b3c4d5e6f70 --resume
    """
    if resume == abandon:
        fail(ExitCode.BAD_INPUT, "give exactly one of --resume or --abandon")
    if resume and reason is not None:
        fail(ExitCode.BAD_INPUT, "--reason goes with --abandon, not --resume")
    if resume:
        _send_update(
            workflow_id,
            "resume",
            lambda client: resume_compensation(client, workflow_id),
            as_json=as_json,
        )
    if not (reason and reason.strip()):
        fail(ExitCode.BAD_INPUT, '--abandon needs --reason "...": say what was done by hand')
    abandoning = reason
    _send_update(
        workflow_id,
        "abandon",
        lambda client: abandon_compensation(client, workflow_id, abandoning),
        as_json=as_json,
    )


def status_command(
    workflow_id: Annotated[
        str, typer.Argument(help="An operation's workflow id, or a node's (onex-node-<node-id>)")
    ],
    as_json: JsonOption = False,
) -> None:
    """Show an operation's status and per-backend outcome (queued, running or finished), or
    what a node's workflow runs and has waiting.

    Exit codes follow the status: 0 success, running or queued, 3 partial or compensation
    paused, 4 failed or compensated, 5 not found.

    Example: onex status onex-register-node-3f1c2d9e-8b7a-4c1e-9f0a-2b3c4d5e6f70 --json

    Example: onex status onex-node-3f1c2d9e-8b7a-4c1e-9f0a-2b3c4d5e6f70
    """
    settings = settings_or_exit()

    async def status(client: Client) -> OperationResult | NodeState:
        try:
            if workflow_id.startswith(node_workflow_id("")):
                return await get_node_state(client, workflow_id)
            return await get_status(client, workflow_id)
        except OperationNotFound:
            raise OperationNotFound(f"no operation with workflow id {workflow_id!r}") from None
        except RPCError as error:  # e.g. no worker is polling to answer the query
            raise InfraUnavailableError(
                f"cannot read the status of {workflow_id}: {error.message} (is a worker running?)"
            ) from None

    outcome = with_client(settings, status)
    if isinstance(outcome, OperationResult):
        report(outcome, as_json=as_json)
    report_node(outcome, as_json=as_json)


def report_node(state: NodeState, *, as_json: bool) -> None:
    """Print a node workflow's running operation and queue (exit 0)."""
    if as_json:
        typer.echo(state.model_dump_json(indent=2))
        return
    table = Table(title=f"{state.workflow_id}: {len(state.queued)} waiting")
    for column in ("#", "operation", "workflow id", "state", "accepted at"):
        table.add_column(column)
    entries = [("running", state.running)] if state.running else []
    entries += [("queued", entry) for entry in state.queued]
    for label, entry in entries:
        table.add_row(
            str(entry.sequence),
            entry.operation,
            entry.workflow_id,
            label,
            entry.accepted_at.isoformat(timespec="seconds"),
        )
    console.print(table)
    line = f"accepted {state.accepted}, finished {state.completed}"
    if state.last:
        line += f"; last: {state.last['workflow_id']} {state.last['status']}"
    console.print(line, markup=False, highlight=False)
