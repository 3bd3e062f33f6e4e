"""What every ``onex`` command exits with, decided in this one place.

A command either finishes (0, or the code its operation's status calls for: :data:`STATUS_EXIT`)
or raises; what it raised decides the code through :data:`EXIT_CODES`, by the most specific
class in the exception's MRO. The project's classes come from the one error tree
(:mod:`contracts.errors`); the few library exceptions a command lets through are listed after
them. Anything else is a bug: exit 1, and the message says so.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import IntEnum

from pydantic import ValidationError
from temporalio.client import WorkflowFailureError, WorkflowUpdateFailedError
from temporalio.service import RPCError

from activities.resilience.fleet import BreakerNotFound
from activities.resilience.sanitize import sanitize_exception
from contracts.errors import (
    CompensationFailedError,
    ConfigurationError,
    HandlerLoadError,
    InfraError,
    InfraPermanentError,
    InfraTransientError,
)
from contracts.operations_io import OperationStatus
from workers.client import NodeNotFound, OperationFinished, OperationNotFound


class ExitCode(IntEnum):
    OK = 0
    UNEXPECTED = 1  # a bug: what Python exits with for an uncaught exception
    BAD_INPUT = 2
    PARTIAL = 3
    FAILED = 4
    NOT_FOUND = 5
    UNAVAILABLE = 6
    INTERRUPTED = 130  # Ctrl-C: the shell's convention (128 + SIGINT)


EXIT_CODES: Mapping[type[BaseException], ExitCode] = {
    # The error tree: a transient failure is a service that is down or unreachable.
    InfraTransientError: ExitCode.UNAVAILABLE,
    # A dependency that refuses for good (credentials, a secret it does not have) cannot be used
    # as configured; so with the embedded stack (StackError) and a handler that cannot start
    # (WorkerStartError): a service could not be started or reached.
    InfraPermanentError: ExitCode.UNAVAILABLE,
    ConfigurationError: ExitCode.BAD_INPUT,  # SettingsError, PlanError, an invalid request
    HandlerLoadError: ExitCode.BAD_INPUT,  # a refused handler contract or plugin
    OperationNotFound: ExitCode.NOT_FOUND,
    NodeNotFound: ExitCode.NOT_FOUND,
    BreakerNotFound: ExitCode.NOT_FOUND,  # the message names the known breakers
    OperationFinished: ExitCode.BAD_INPUT,  # nothing left to retry
    CompensationFailedError: ExitCode.FAILED,
    # Library exceptions the commands let through.
    ValidationError: ExitCode.BAD_INPUT,  # a request the contract models refuse
    WorkflowFailureError: ExitCode.FAILED,
    WorkflowUpdateFailedError: ExitCode.BAD_INPUT,  # the workflow refused the update
    RPCError: ExitCode.UNAVAILABLE,
    KeyboardInterrupt: ExitCode.INTERRUPTED,
}

STATUS_EXIT: Mapping[OperationStatus, ExitCode] = {
    OperationStatus.SUCCESS: ExitCode.OK,
    OperationStatus.RUNNING: ExitCode.OK,
    OperationStatus.QUEUED: ExitCode.OK,  # accepted: it runs after the ones before it
    OperationStatus.PARTIAL: ExitCode.PARTIAL,
    # Like partial, it waits for an operator: `onex compensate --resume | --abandon`.
    OperationStatus.COMPENSATION_PAUSED: ExitCode.PARTIAL,
    OperationStatus.FAILED: ExitCode.FAILED,
    OperationStatus.COMPENSATED: ExitCode.FAILED,
    OperationStatus.COMPENSATION_FAILED: ExitCode.FAILED,
}


def exit_code_for(error: BaseException) -> ExitCode:
    """The documented code for ``error``: that of the most specific class listed."""
    for cls in type(error).__mro__:
        if cls in EXIT_CODES:
            return EXIT_CODES[cls]
    return ExitCode.UNEXPECTED


def describe(error: BaseException) -> str:
    """What to tell the user about ``error``, safe to show."""
    if isinstance(error, InfraError):
        return str(error)  # the tree's messages are written to be shown
    if isinstance(error, ValidationError):
        return "invalid request: " + "; ".join(
            f"{'.'.join(str(part) for part in problem['loc'])}: {problem['msg']}"
            for problem in error.errors(include_url=False, include_input=False)
        )
    if isinstance(error, WorkflowFailureError):
        return f"the operation failed: {sanitize_exception(error.cause)}"
    if isinstance(error, WorkflowUpdateFailedError):
        return f"refused: {sanitize_exception(error.cause)}"
    if isinstance(error, KeyboardInterrupt):
        return "interrupted"
    if exit_code_for(error) is ExitCode.UNEXPECTED:
        return (
            f"unexpected {sanitize_exception(error)} (a bug: run with "
            "ONEX_WORKER__LOG_LEVEL=debug for the traceback, and report it)"
        )
    return sanitize_exception(error)
