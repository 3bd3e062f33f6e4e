"""The one error tree: grouping bases, the derived non-retryable list, everything under the root."""

from __future__ import annotations

import inspect

import pytest

import contracts.errors as errors
from activities.resilience.breaker import CircuitOpenError
from contracts.errors import (
    NON_RETRYABLE_ERROR_TYPES,
    InfraError,
    InfraPermanentError,
    InfraTransientError,
)
from contracts.operation_contract import PlanError
from workers.client import OperationFinished, OperationNotFound
from workers.demo import DemoEventsMissing
from workers.devstack import BinaryNotFoundError, PortInUseError, ServiceStartError, StackError
from workers.host import WorkerStartError
from workers.settings import SettingsError


def _module_error_classes() -> list[type[InfraError]]:
    return [
        value
        for value in vars(errors).values()
        if inspect.isclass(value)
        and issubclass(value, InfraError)
        and value.__module__ == errors.__name__
    ]


def test_every_class_of_the_tree_is_transient_or_permanent() -> None:
    """Below the root, a class is either retried or never retried: nothing in between."""
    for cls in _module_error_classes():
        if cls in (InfraError, InfraTransientError, InfraPermanentError):
            continue
        assert issubclass(cls, InfraTransientError) != issubclass(cls, InfraPermanentError), (
            f"{cls.__name__} must derive from exactly one of InfraTransientError and "
            "InfraPermanentError: pick the one that says whether a retry can help"
        )
        assert cls.retryable is issubclass(cls, InfraTransientError), cls.__name__


def test_the_non_retryable_types_are_derived_from_the_classes() -> None:
    """The list Temporal gets is exactly the permanent classes of the tree, by name."""
    permanent = {cls.__name__ for cls in _module_error_classes() if not cls.retryable}
    assert set(NON_RETRYABLE_ERROR_TYPES) == permanent - {"InfraError"}
    assert "CompensationFailedError" in NON_RETRYABLE_ERROR_TYPES
    assert "InfraConnectionError" not in NON_RETRYABLE_ERROR_TYPES


def test_the_derivation_ignores_classes_defined_elsewhere() -> None:
    """Importing a module that subclasses the tree never changes what retry policies carry."""
    before = NON_RETRYABLE_ERROR_TYPES
    assert list(errors._permanent_types(InfraError))
    assert "SettingsError" not in before, "only contracts.errors classes are wire types"
    assert tuple(sorted({c.__name__ for c in errors._permanent_types(InfraError)})) == before


@pytest.mark.parametrize(
    ("cls", "base"),
    [
        (CircuitOpenError, InfraTransientError),
        (DemoEventsMissing, InfraTransientError),
        (SettingsError, InfraPermanentError),
        (PlanError, InfraPermanentError),
        (OperationNotFound, InfraPermanentError),
        (OperationFinished, InfraPermanentError),
        (WorkerStartError, InfraPermanentError),
        (StackError, InfraPermanentError),
        (BinaryNotFoundError, StackError),
        (PortInUseError, StackError),
        (ServiceStartError, StackError),
    ],
)
def test_every_project_exception_lives_under_the_root(cls: type[Exception], base: type) -> None:
    """Client, CLI, loader and dev-stack errors are caught by ``except InfraError`` too."""
    assert issubclass(cls, base)
    assert issubclass(cls, InfraError)
    assert cls.__name__ in (errors.__doc__ or ""), f"draw {cls.__name__} in the tree's docstring"


def test_an_error_without_a_context_reads_as_its_message() -> None:
    """Process-level errors (settings, stack, client) need no backend context to be shown."""
    error = StackError("port 7233 is in use")
    assert str(error) == "port 7233 is in use"
    assert error.context.transport.value == "runtime"
