"""Workflow code is deterministic: it never reaches a library that does I/O."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = {"asyncpg", "aiokafka", "hvac", "consul", "structlog", "requests", "aiohttp",
             "psutil", "socket", "subprocess", "os", "random", "time"}  # fmt: skip
PROJECT = {"workflows", "contracts", "activities", "workers"}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def _module_file(name: str) -> Path | None:
    base = ROOT.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.exists():
            return candidate
    return None


def test_workflow_modules_reach_no_io_library() -> None:
    """Everything workflows import, transitively within the project, stays clear of I/O
    libraries, the clock, randomness and the environment."""
    pending = [p for p in (ROOT / "workflows").glob("*.py")]
    seen: set[Path] = set()
    offenders: dict[str, list[str]] = {}
    while pending:
        path = pending.pop()
        if path in seen:
            continue
        seen.add(path)
        for name in _imports(path):
            top = name.split(".")[0]
            if top in FORBIDDEN:
                offenders.setdefault(str(path.relative_to(ROOT)), []).append(name)
            if top in PROJECT:
                target = _module_file(name)
                if target is not None:
                    pending.append(target)
    reached = sorted(str(p.relative_to(ROOT)) for p in seen)
    assert not any(p.startswith(("activities/", "workers/")) for p in reached), (
        f"Workflows reach worker or activity code: {reached}\n\n"
        "HOW TO FIX: workflows may import contracts and the Temporal SDK only; move shared "
        "data into contracts/."
    )
    assert offenders == {}, (
        f"Modules reached from workflows import I/O libraries: {offenders}\n\n"
        "HOW TO FIX: keep I/O in activities/; workflows get data through activity results."
    )
