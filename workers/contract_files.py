"""Finding and reading contract files, without importing anything they name.

The client compiles its plans from what this module reads; the worker's plugin loader
(:mod:`workers.loader`) reads through it too, then imports and checks the classes. So a contract
is parsed and validated by one piece of code, and a process that only starts operations never
imports a backend library. The reading rules (SPEC §3.1), each refusal a
:class:`~contracts.errors.HandlerLoadError` with a stable code:

* discovery from files, directories (recursive) and glob patterns; paths deduplicated by their
  resolved form and sorted, so the order never depends on the file system;
* a directory holding both ``handler_contract.yaml`` and ``contract.yaml`` is ambiguous and
  loads neither (040); one bad contract never stops the others;
* at most 10 MiB + 1 byte is read, so a file that grows or lies about its size is still refused
  (005); YAML is parsed by a safe loader only (so ``!!python/object`` tags are refused: 002)
  that also refuses anchors and aliases and bounds the nesting depth and the node count (017):
  a few hundred bytes of nested aliases otherwise expand to a billion nodes; then the document
  is validated against the schema (003/004);
* a value that looks like a credential is refused (016): contracts are code, not secrets;
* a handler or operation name declared twice is refused the second time (015);
* any other exception while reading one contract is a refusal of that contract (018), never a
  crash of the loader.

Messages name a contract by its name or by its path relative to the directory it was found
under, never by an absolute path.
"""

from __future__ import annotations

import glob
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Generic, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from contracts.errors import ErrorContext, HandlerLoadError, Transport
from contracts.handler_contract import HandlerContract
from contracts.operation_contract import OperationContract

MAX_CONTRACT_BYTES = 10 * 1024 * 1024
# Far beyond any real contract (they nest four or five levels and hold a few hundred nodes), far
# below what makes a recursive walk or pydantic slow.
MAX_YAML_DEPTH = 64
MAX_YAML_NODES = 100_000
HANDLER_FILE_NAMES = ("handler_contract.yaml", "contract.yaml")

ModelT = TypeVar("ModelT", bound=BaseModel)


class LoaderCode(StrEnum):
    FILE_NOT_FOUND = "HANDLER_LOADER_001"
    INVALID_YAML = "HANDLER_LOADER_002"
    SCHEMA_INVALID = "HANDLER_LOADER_003"
    MISSING_FIELDS = "HANDLER_LOADER_004"
    FILE_TOO_LARGE = "HANDLER_LOADER_005"
    PROTOCOL_NOT_IMPLEMENTED = "HANDLER_LOADER_006"
    NOT_A_FILE = "HANDLER_LOADER_007"
    READ_FAILED = "HANDLER_LOADER_008"
    STAT_FAILED = "HANDLER_LOADER_009"
    MODULE_NOT_FOUND = "HANDLER_LOADER_010"
    CLASS_NOT_FOUND = "HANDLER_LOADER_011"
    IMPORT_FAILED = "HANDLER_LOADER_012"
    NAMESPACE_NOT_ALLOWED = "HANDLER_LOADER_013"
    OPERATION_NOT_IMPLEMENTED = "HANDLER_LOADER_014"
    DUPLICATE_HANDLER = "HANDLER_LOADER_015"
    SECRET_IN_CONTRACT = "HANDLER_LOADER_016"  # noqa: S105 - a code, not a password
    YAML_TOO_COMPLEX = "HANDLER_LOADER_017"
    UNEXPECTED_ERROR = "HANDLER_LOADER_018"
    DIRECTORY_NOT_FOUND = "HANDLER_LOADER_020"
    PERMISSION_DENIED = "HANDLER_LOADER_021"
    NOT_A_DIRECTORY = "HANDLER_LOADER_022"
    EMPTY_PATTERNS = "HANDLER_LOADER_030"
    INVALID_GLOB = "HANDLER_LOADER_031"
    AMBIGUOUS_CONTRACT = "HANDLER_LOADER_040"


def loader_error(code: LoaderCode, target: str, message: str) -> HandlerLoadError:
    return HandlerLoadError(
        f"{code.value}: {message}",
        context=ErrorContext(transport=Transport.RUNTIME, operation="load_contract", target=target),
        loader_code=code.value,
    )


@dataclass(frozen=True)
class ContractFile:
    """A discovered contract: where it is, and how to name it in messages."""

    path: Path
    display: str


@dataclass
class ReadReport(Generic[ModelT]):
    """The contracts that parsed and validated, by name, and a coded refusal for each other."""

    contracts: dict[str, ModelT] = field(default_factory=dict)
    # How messages name each contract's file, by contract name.
    sources: dict[str, str] = field(default_factory=dict)
    refused: list[HandlerLoadError] = field(default_factory=list)


# -- discovery ---------------------------------------------------------------------------------


def discover(
    paths: Sequence[Path | str], *, handlers: bool = True
) -> tuple[list[ContractFile], list[HandlerLoadError]]:
    """Contract files under ``paths`` (files, directories, globs), sorted and deduplicated.

    In a directory tree, a handler contract is a ``handler_contract.yaml`` (or ``contract.yaml``)
    file, one per directory; with ``handlers=False``, every ``*.yaml`` file is an operation
    contract.
    """
    if not paths:
        return [], [loader_error(LoaderCode.EMPTY_PATTERNS, "contracts", "no paths were given")]
    found: dict[Path, ContractFile] = {}
    errors: list[HandlerLoadError] = []
    for raw in paths:
        text = str(raw)
        if glob.has_magic(text):
            try:
                matches = sorted(glob.glob(text, recursive=True))
            except (re.error, ValueError):
                errors.append(loader_error(LoaderCode.INVALID_GLOB, text, "invalid glob pattern"))
                continue
            base = Path(text.split("*", 1)[0].split("?", 1)[0].split("[", 1)[0])
            base = base if base.is_dir() else base.parent
            for match in matches:
                _add_file(Path(match), base, found, errors)
            continue
        path = Path(text)
        if not path.exists():
            code = LoaderCode.FILE_NOT_FOUND if path.suffix else LoaderCode.DIRECTORY_NOT_FOUND
            errors.append(loader_error(code, path.name, f"{path.name} does not exist"))
        elif path.is_dir():
            _add_directory(path, found, errors, handlers=handlers)
        else:
            _add_file(path, path.parent, found, errors)
    ordered = sorted(found.values(), key=lambda contract: str(contract.path))
    return ordered, errors


def _add_directory(
    root: Path,
    found: dict[Path, ContractFile],
    errors: list[HandlerLoadError],
    *,
    handlers: bool,
) -> None:
    try:
        directories = sorted({root, *(p for p in root.rglob("*") if p.is_dir())})
    except PermissionError:
        errors.append(loader_error(LoaderCode.PERMISSION_DENIED, root.name, "cannot list it"))
        return
    for directory in directories:
        if not handlers:
            for yaml_file in sorted(directory.glob("*.yaml")):
                if yaml_file.name not in HANDLER_FILE_NAMES:
                    _add_file(yaml_file, root, found, errors)
            continue
        present = [directory / name for name in HANDLER_FILE_NAMES if (directory / name).is_file()]
        display_dir = _relative(directory, root)
        if len(present) > 1:
            errors.append(
                loader_error(
                    LoaderCode.AMBIGUOUS_CONTRACT,
                    display_dir,
                    f"{display_dir} holds both {' and '.join(p.name for p in present)}; keep "
                    "exactly one contract file per directory (neither was loaded)",
                )
            )
            continue
        for contract in present:
            _add_file(contract, root, found, errors)


def _add_file(
    path: Path,
    base: Path,
    found: dict[Path, ContractFile],
    errors: list[HandlerLoadError],
) -> None:
    display = _relative(path, base)
    if not path.is_file():
        code = LoaderCode.NOT_A_FILE if path.exists() else LoaderCode.FILE_NOT_FOUND
        errors.append(loader_error(code, display, f"{display} is not a regular file"))
        return
    resolved = path.resolve()
    found.setdefault(resolved, ContractFile(path=resolved, display=display))


def _relative(path: Path, base: Path) -> str:
    try:
        relative = path.resolve().relative_to(base.resolve())
    except ValueError:
        return path.name
    return str(relative) if str(relative) != "." else base.name


# -- reading -----------------------------------------------------------------------------------

_CREDENTIAL_VALUE = re.compile(
    r"[a-z][a-z0-9+.\-]*://[^\s/@]+:[^\s/@]*@"  # userinfo in a URL
    r"|-----begin"
    r"|bearer\s+\S{8,}"
    r"|eyj[\w-]{8,}\.[\w-]{8,}"  # a JWT
    r"|(?:password|passwd|secret|token|api[_-]?key)\s*[=:]\s*\S+",
    re.IGNORECASE,
)


class _TooComplex(yaml.YAMLError):
    """A document the bounded loader refuses to build; ``problem`` says why, for the message."""

    def __init__(self, problem: str, mark: Any) -> None:
        super().__init__(problem)
        self.problem = problem
        self.problem_mark = mark


class _BoundedSafeLoader(yaml.SafeLoader):
    """``SafeLoader`` without anchors or aliases, and with a bounded depth and node count.

    Contracts have no use for anchors; refusing them outright is simpler to reason about than
    counting expansions. The bounds keep a deeply nested flow sequence from exhausting the
    recursion limit in the composer or in the credential scan.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0
        self._nodes = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            refused = "anchors and aliases (&name, *name) are not accepted"
            raise _TooComplex(refused, event.start_mark)
        self._nodes += 1
        if self._nodes > MAX_YAML_NODES:
            raise _TooComplex(f"more than {MAX_YAML_NODES} YAML nodes", event.start_mark)
        self._depth += 1
        try:
            if self._depth > MAX_YAML_DEPTH:
                raise _TooComplex(f"nested deeper than {MAX_YAML_DEPTH} levels", event.start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _read_bounded(source: ContractFile) -> bytes:
    display = source.display
    try:
        with source.path.open("rb") as handle:
            # One byte past the limit tells "exactly at the limit" from "over it" without trusting
            # stat, which a growing file or a special file gets wrong.
            data = handle.read(MAX_CONTRACT_BYTES + 1)
    except FileNotFoundError:
        raise loader_error(LoaderCode.FILE_NOT_FOUND, display, f"{display} disappeared") from None
    except PermissionError:
        raise loader_error(
            LoaderCode.PERMISSION_DENIED, display, f"cannot read {display}"
        ) from None
    except OSError:
        raise loader_error(LoaderCode.READ_FAILED, display, f"cannot read {display}") from None
    if len(data) > MAX_CONTRACT_BYTES:
        raise loader_error(
            LoaderCode.FILE_TOO_LARGE,
            display,
            f"{display} is larger than {MAX_CONTRACT_BYTES} bytes, the limit for a contract",
        )
    return data


def read_contract(source: ContractFile, model: type[ModelT]) -> ModelT:
    """Read, parse and validate one contract file, or raise a coded HandlerLoadError."""
    display = source.display
    try:
        text = _read_bounded(source).decode("utf-8")
    except UnicodeDecodeError:
        raise loader_error(
            LoaderCode.READ_FAILED, display, f"cannot read {display} as UTF-8 text"
        ) from None
    try:
        data = yaml.load(text, Loader=_BoundedSafeLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        where = ""
        mark = getattr(exc, "problem_mark", None)
        if mark is not None:
            where = f" at line {mark.line + 1}, column {mark.column + 1}"
        problem = getattr(exc, "problem", None) or "not valid YAML"
        if isinstance(exc, _TooComplex):
            raise loader_error(
                LoaderCode.YAML_TOO_COMPLEX,
                display,
                f"{display}: {problem}{where}; write the values out in plain YAML",
            ) from None
        raise loader_error(
            LoaderCode.INVALID_YAML,
            display,
            f"{display}: {problem}{where} (only plain YAML is accepted: no !!python tags)",
        ) from None
    if not isinstance(data, dict):
        raise loader_error(
            LoaderCode.SCHEMA_INVALID, display, f"{display} must be a mapping of fields"
        )
    finding = _credential_in(data)
    if finding:
        raise loader_error(
            LoaderCode.SECRET_IN_CONTRACT,
            display,
            f"{display}: the value of {finding} looks like a credential; contracts are committed "
            "code: reference a secret by its logical name and resolve it in the worker",
        )
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        missing = [e for e in exc.errors() if e["type"] == "missing"]
        code = LoaderCode.MISSING_FIELDS if missing else LoaderCode.SCHEMA_INVALID
        raise loader_error(code, display, f"{display}: {_describe(exc)}") from None


def read_contract_or_refusal(
    source: ContractFile, model: type[ModelT]
) -> ModelT | HandlerLoadError:
    """:func:`read_contract`, with any exception turned into a coded refusal of this contract.

    A bug or an exotic input in one contract must cost that contract, not every other one.
    """
    try:
        return read_contract(source, model)
    except HandlerLoadError as refused:
        return refused
    except Exception as exc:  # the point: nothing escapes per contract
        return loader_error(
            LoaderCode.UNEXPECTED_ERROR,
            source.display,
            f"{source.display}: reading it raised {type(exc).__name__}; "
            "check that it is a plain YAML mapping",
        )


def _credential_in(data: Any, path: str = "") -> str | None:
    if isinstance(data, dict):
        for key, value in data.items():
            found = _credential_in(value, f"{path}.{key}" if path else str(key))
            if found:
                return found
    elif isinstance(data, list):
        for index, value in enumerate(data):
            found = _credential_in(value, f"{path}[{index}]")
            if found:
                return found
    elif isinstance(data, str) and _CREDENTIAL_VALUE.search(data):
        return path or "the document"
    return None


def _describe(error: ValidationError) -> str:
    parts = []
    for problem in error.errors(include_url=False, include_input=False):
        location = ".".join(str(part) for part in problem["loc"]) or "contract"
        parts.append(f"{location}: {problem['msg']}")
    return "; ".join(parts)


# -- all together ------------------------------------------------------------------------------


def read_handlers(paths: Sequence[Path | str]) -> ReadReport[HandlerContract]:
    """Every handler contract under ``paths``, by handler name; no class is imported."""
    return _read_all(paths, HandlerContract, lambda c: c.handler_name, "handler", handlers=True)


def read_operations(paths: Sequence[Path | str]) -> ReadReport[OperationContract]:
    """Every operation contract (``*.yaml``) under ``paths``, by operation name."""
    return _read_all(paths, OperationContract, lambda c: c.operation, "operation", handlers=False)


def _read_all(
    paths: Sequence[Path | str],
    model: type[ModelT],
    name_of: Callable[[ModelT], str],
    kind: str,
    *,
    handlers: bool,
) -> ReadReport[ModelT]:
    files, errors = discover(paths, handlers=handlers)
    report: ReadReport[ModelT] = ReadReport(refused=list(errors))
    for source in files:
        contract = read_contract_or_refusal(source, model)
        if isinstance(contract, HandlerLoadError):
            report.refused.append(contract)
            continue
        name = name_of(contract)
        if name in report.contracts:
            report.refused.append(
                loader_error(
                    LoaderCode.DUPLICATE_HANDLER,
                    name,
                    f"{kind} {name!r} is declared twice ({report.sources[name]} and "
                    f"{source.display}); names are unique",
                )
            )
            continue
        report.contracts[name] = contract
        report.sources[name] = source.display
    return report
