"""Load handler plugins: read their contracts, then import and check the classes they name.

Reading (discovery, size, YAML, credentials, schema, duplicates) is
:mod:`workers.contract_files`; this module adds what only a worker needs (SPEC §3.1), each
refusal a :class:`HandlerLoadError` with a stable code:

* the class path must sit under an allowlisted namespace, checked **before** anything is
  imported (013); ``foo.`` matches ``foo.x`` and never ``foobar.x``;
* the class must exist (010/011/012) and have every member of the handler protocol plus one
  coroutine method per declared operation (006/014);
* any other exception while checking one class refuses that handler only (018).

Messages name a handler by its name, never by an absolute path, and never carry an import
traceback.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from contracts.errors import HandlerLoadError
from contracts.handler_contract import HandlerContract
from workers.contract_files import LoaderCode, loader_error, read_handlers

PROTOCOL_MEMBERS = ("handler_type", "initialize", "shutdown", "execute", "describe")
ASYNC_MEMBERS = ("initialize", "shutdown", "execute")


@dataclass(frozen=True)
class LoadedHandler:
    contract: HandlerContract
    handler_class: type[Any]
    source: str


@dataclass
class LoadReport:
    loaded: list[LoadedHandler] = field(default_factory=list)
    refused: list[HandlerLoadError] = field(default_factory=list)
    # Every contract that parsed, including those whose class was then refused.
    read: dict[str, HandlerContract] = field(default_factory=dict)

    @property
    def contracts(self) -> dict[str, HandlerContract]:
        return {handler.contract.handler_name: handler.contract for handler in self.loaded}


# -- classes -----------------------------------------------------------------------------------


def namespace_allowed(module_path: str, allowed: Sequence[str] | None) -> bool:
    """Boundary-aware prefix match: ``foo.`` and ``foo`` allow ``foo.x``, never ``foobar.x``.

    ``None`` allows everything (development only); an empty list allows nothing.
    """
    if allowed is None:
        return True
    for namespace in allowed:
        prefix = namespace if namespace.endswith(".") else namespace + "."
        if module_path.startswith(prefix) or module_path == namespace.rstrip("."):
            return True
    return False


def load_handler_class(contract: HandlerContract, allowed: Sequence[str] | None) -> type[Any]:
    """Import the contract's class, after checking its namespace; verify the protocol."""
    name = contract.handler_name
    module_path = contract.module_path
    if not namespace_allowed(module_path, allowed):
        raise loader_error(
            LoaderCode.NAMESPACE_NOT_ALLOWED,
            name,
            f"handler {name!r}: module {module_path!r} is outside the allowed namespaces "
            f"({', '.join(allowed or []) or 'none'}); add its package to "
            "ONEX_WORKER__ALLOWED_NAMESPACES if you trust it",
        )
    try:
        module = importlib.import_module(module_path)
    except ModuleNotFoundError as exc:
        if exc.name and (module_path == exc.name or module_path.startswith(exc.name + ".")):
            raise loader_error(
                LoaderCode.MODULE_NOT_FOUND,
                name,
                f"handler {name!r}: module {module_path!r} is not installed",
            ) from None
        raise loader_error(
            LoaderCode.IMPORT_FAILED,
            name,
            f"handler {name!r}: importing {module_path!r} failed: it needs module "
            f"{exc.name!r}, which is not installed",
        ) from None
    except Exception as exc:
        raise loader_error(
            LoaderCode.IMPORT_FAILED,
            name,
            f"handler {name!r}: importing {module_path!r} raised {type(exc).__name__}",
        ) from None
    handler_class = getattr(module, contract.class_name, None)
    if handler_class is None:
        raise loader_error(
            LoaderCode.CLASS_NOT_FOUND,
            name,
            f"handler {name!r}: {module_path!r} has no class {contract.class_name!r}",
        )
    _check_protocol(contract, handler_class)
    return handler_class  # type: ignore[no-any-return]


def _check_protocol(contract: HandlerContract, handler_class: Any) -> None:
    name = contract.handler_name
    if not isinstance(handler_class, type):
        raise loader_error(
            LoaderCode.PROTOCOL_NOT_IMPLEMENTED,
            name,
            f"handler {name!r}: {contract.handler_class!r} is not a class",
        )
    missing = [member for member in PROTOCOL_MEMBERS if not hasattr(handler_class, member)]
    not_async = [
        member
        for member in ASYNC_MEMBERS
        if member not in missing and not inspect.iscoroutinefunction(getattr(handler_class, member))
    ]
    if missing or not_async:
        details = []
        if missing:
            details.append(f"missing {', '.join(missing)}")
        if not_async:
            details.append(f"not async: {', '.join(not_async)}")
        raise loader_error(
            LoaderCode.PROTOCOL_NOT_IMPLEMENTED,
            name,
            f"handler {name!r}: {contract.class_name} does not implement the handler protocol "
            f"({'; '.join(details)}); subclass activities.base.HandlerBase",
        )
    absent = [
        operation
        for operation in contract.operations
        if not inspect.iscoroutinefunction(getattr(handler_class, operation, None))
    ]
    if absent:
        raise loader_error(
            LoaderCode.OPERATION_NOT_IMPLEMENTED,
            name,
            f"handler {name!r}: {contract.class_name} has no async method for operation(s) "
            f"{', '.join(absent)} declared in its contract",
        )


# -- all together ------------------------------------------------------------------------------


def load_handlers(
    paths: Sequence[Path | str], *, allowed_namespaces: Sequence[str] | None
) -> LoadReport:
    """Every handler under ``paths``: those that loaded, and a coded refusal for each other."""
    read = read_handlers(paths)
    report = LoadReport(refused=list(read.refused), read=dict(read.contracts))
    for name, contract in read.contracts.items():
        try:
            handler_class = load_handler_class(contract, allowed_namespaces)
        except HandlerLoadError as refused:
            report.refused.append(refused)
            continue
        except Exception as exc:  # a hostile class (a raising metaclass __getattr__, say)
            # costs its own handler, never the others
            report.refused.append(
                loader_error(
                    LoaderCode.UNEXPECTED_ERROR,
                    name,
                    f"handler {name!r}: checking {contract.class_name} raised {type(exc).__name__}",
                )
            )
            continue
        report.loaded.append(LoadedHandler(contract, handler_class, read.sources[name]))
    return report
