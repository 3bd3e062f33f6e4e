"""``onex contracts validate``: every check the worker makes, without starting anything.

Handler contracts go through the loader (schema, size, secrets, namespace, import, protocol);
operation contracts are validated and compiled against the handler contracts, so a step naming
an unknown handler, operation or compensation, or an event outside the catalog, is reported.
Every problem is listed, not just the first. The client reads the same contracts through
:mod:`workers.contract_files` and skips the import checks (it never loads a handler class).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from contracts.handler_contract import HandlerContract
from contracts.operation_contract import OperationContract, plan_problems, supersedes_problems
from workers.contract_files import read_operations
from workers.loader import load_handlers
from workers.settings import OnexSettings


@dataclass(frozen=True)
class Problem:
    code: str
    subject: str
    message: str


@dataclass(frozen=True)
class ValidationReport:
    handlers: dict[str, HandlerContract]
    operations: dict[str, OperationContract]
    problems: list[Problem]

    @property
    def ok(self) -> bool:
        return not self.problems


def validate_contracts(settings: OnexSettings, paths: Sequence[Path] = ()) -> ValidationReport:
    """Check the contracts under ``paths`` (default: the configured contract directories).

    Operation steps resolve against the handler contracts found under ``paths`` and, failing
    that, the configured ones.
    """
    handler_paths = list(paths) or list(settings.worker.contract_paths)
    operation_paths = list(paths) or list(settings.worker.operation_paths)
    allowed = settings.worker.allowed_namespaces
    report = load_handlers(handler_paths, allowed_namespaces=allowed)
    problems = [
        Problem(error.loader_code, error.context.target, error.message) for error in report.refused
    ]
    handlers = report.read
    if paths:  # steps may refer to the built-in handlers
        configured = load_handlers(settings.worker.contract_paths, allowed_namespaces=allowed)
        handlers = {**configured.read, **handlers}
    read = read_operations(operation_paths)
    operations = read.contracts
    problems += [Problem(e.loader_code, e.context.target, e.message) for e in read.refused]
    for operation in operations.values():
        problems += [
            Problem("OPERATION_STEP", operation.operation, message)
            for message in plan_problems(operation, handlers)
        ]
        problems += [
            Problem("OPERATION_SUPERSEDES", operation.operation, message)
            for message in supersedes_problems(operation, operations)
        ]
    return ValidationReport(report.contracts, operations, problems)
