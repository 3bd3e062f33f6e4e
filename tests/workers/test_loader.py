"""The contract loader: one test per refusal code, ordering, isolation, and hostile input."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from workers.contract_files import MAX_CONTRACT_BYTES, LoaderCode, discover, read_operations
from workers.loader import load_handlers, namespace_allowed

TEST_NAMESPACES = ["activities.", "tests.plugins."]


def contract(
    name: str = "echo",
    handler_class: str = "tests.plugins.echo:EchoHandler",
    operations: tuple[str, ...] = ("echo: {idempotent: true}",),
    extra: str = "",
) -> str:
    lines = [
        f"handler_name: {name}",
        f"handler_class: {handler_class}",
        "handler_type: effect",
        "transport: http",
        "operations:",
        *(f"  {operation}" for operation in operations),
    ]
    return "\n".join(lines) + "\n" + extra


def write(directory: Path, text: str, file_name: str = "handler_contract.yaml") -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / file_name
    path.write_text(text)
    return path


def codes(report_errors: list) -> list[str]:  # type: ignore[type-arg]
    return [error.loader_code for error in report_errors]


def refused_code(tmp_path: Path, text: str, namespaces: list[str] | None = None) -> str:
    write(tmp_path / "h", text)
    report = load_handlers([tmp_path], allowed_namespaces=namespaces or TEST_NAMESPACES)
    assert not report.loaded, "the contract should have been refused"
    assert len(report.refused) == 1, [e.message for e in report.refused]
    return report.refused[0].loader_code


def test_a_good_contract_loads(tmp_path: Path) -> None:
    """A valid contract under an allowed namespace yields its class and resolved policy."""
    write(tmp_path / "echo", contract())
    report = load_handlers([tmp_path], allowed_namespaces=TEST_NAMESPACES)
    assert report.refused == []
    (loaded,) = report.loaded
    assert loaded.handler_class.__name__ == "EchoHandler"
    assert loaded.contract.activity_name("echo") == "echo.echo"
    assert loaded.source == "echo/handler_contract.yaml", "named relative to its root"


def test_001_file_not_found(tmp_path: Path) -> None:
    """A named contract file that does not exist."""
    report = load_handlers([tmp_path / "missing.yaml"], allowed_namespaces=TEST_NAMESPACES)
    assert codes(report.refused) == [LoaderCode.FILE_NOT_FOUND]


def test_002_invalid_yaml_and_python_tags(tmp_path: Path) -> None:
    """Broken YAML, and a !!python/object tag that safe_load refuses (nothing is executed)."""
    assert refused_code(tmp_path / "a", "handler_name: [unclosed") == LoaderCode.INVALID_YAML
    hostile = "!!python/object/apply:os.system ['echo pwned']\n"
    assert refused_code(tmp_path / "b", hostile) == LoaderCode.INVALID_YAML


def test_003_schema_invalid(tmp_path: Path) -> None:
    """A value of the wrong form, with the field and the reason in the message."""
    write(tmp_path / "h", contract(name="Bad-Name"))
    (error,) = load_handlers([tmp_path], allowed_namespaces=TEST_NAMESPACES).refused
    assert error.loader_code == LoaderCode.SCHEMA_INVALID
    assert "handler_name" in error.message


def test_004_missing_fields(tmp_path: Path) -> None:
    """A contract without its required fields names them."""
    write(tmp_path / "h", "handler_name: echo\n")
    (error,) = load_handlers([tmp_path], allowed_namespaces=TEST_NAMESPACES).refused
    assert error.loader_code == LoaderCode.MISSING_FIELDS
    assert "handler_class" in error.message


def test_005_too_large_is_refused_reading_at_most_the_limit_plus_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file over 10 MiB is refused after reading at most 10 MiB + 1 byte, whatever stat says."""
    path = write(tmp_path / "h", "")
    with path.open("wb") as handle:
        handle.truncate(64 * MAX_CONTRACT_BYTES)  # sparse: nothing is written
    asked: list[int] = []
    original = Path.open

    def spy(self: Path, *args: object, **kwargs: object) -> object:
        handle = original(self, *args, **kwargs)  # type: ignore[call-overload]
        read = handle.read

        def bounded_read(size: int = -1) -> bytes:
            asked.append(size)
            return read(size)  # type: ignore[no-any-return]

        handle.read = bounded_read
        return handle

    monkeypatch.setattr(Path, "open", spy)
    report = load_handlers([tmp_path], allowed_namespaces=TEST_NAMESPACES)
    assert codes(report.refused) == [LoaderCode.FILE_TOO_LARGE]
    assert asked, "the loader never read the file through Path.open"
    assert all(0 <= size <= MAX_CONTRACT_BYTES + 1 for size in asked), (
        f"the loader asked for {asked} bytes; read at most the limit + 1, never the whole file"
    )


def test_005_exactly_the_limit_is_not_too_large(tmp_path: Path) -> None:
    """A file of exactly 10 MiB passes the size rule (it fails later, for its content)."""
    path = write(tmp_path / "h", "")
    path.write_bytes(b"#" * MAX_CONTRACT_BYTES)
    report = load_handlers([tmp_path], allowed_namespaces=TEST_NAMESPACES)
    assert codes(report.refused) == [LoaderCode.SCHEMA_INVALID], "the limit itself is allowed"


def billion_laughs(levels: int = 9) -> str:
    """Nested aliases: a few hundred bytes that expand to 9**levels nodes."""
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
    for level in range(1, levels):
        lines.append(f"a{level}: &a{level} [{', '.join([f'*a{level - 1}'] * 9)}]")
    return "\n".join(lines) + "\n"


HOSTILE_YAML = {
    "billion_laughs": contract(extra=billion_laughs()),
    "self_alias": contract(extra="description: &c [*c]\n"),
    "plain_anchor": contract(extra="description: &d hello\nother: *d\n"),
    "deep_flow": contract(extra="description: " + "[" * 5000 + "]" * 5000 + "\n"),
    "deep_block": contract(
        extra="description:\n" + "".join(f"{'  ' * i}- \n" for i in range(1, 200))
    ),
}


@pytest.mark.timeout(10)
@pytest.mark.parametrize("case", sorted(HOSTILE_YAML))
def test_017_anchors_aliases_and_depth_are_refused_next_to_good_contracts(
    tmp_path: Path, case: str
) -> None:
    """Aliases (even self-referencing ones), anchors and very deep nesting are refused with 017,
    quickly, and the good contract beside them still loads."""
    write(tmp_path / "hostile", HOSTILE_YAML[case])
    write(tmp_path / "good", contract(name="good"))
    report = load_handlers([tmp_path], allowed_namespaces=TEST_NAMESPACES)
    assert codes(report.refused) == [LoaderCode.YAML_TOO_COMPLEX], [
        e.message for e in report.refused
    ]
    assert [h.contract.handler_name for h in report.loaded] == ["good"], (
        "one hostile contract must not stop the others from loading"
    )


def test_018_any_exception_reading_one_contract_is_a_coded_refusal(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An unexpected exception while reading one contract refuses it (018); the rest load."""
    import workers.contract_files as contract_files

    write(tmp_path / "bad", contract(name="bad"))
    write(tmp_path / "good", contract(name="good"))
    original = contract_files._credential_in

    def explode(data: object, path: str = "") -> str | None:
        if isinstance(data, dict) and data.get("handler_name") == "bad":
            raise RecursionError("maximum recursion depth exceeded")
        return original(data, path)

    monkeypatch.setattr(contract_files, "_credential_in", explode)
    report = load_handlers([tmp_path], allowed_namespaces=TEST_NAMESPACES)
    assert codes(report.refused) == [LoaderCode.UNEXPECTED_ERROR]
    assert "RecursionError" in report.refused[0].message
    assert [h.contract.handler_name for h in report.loaded] == ["good"]


def test_018_a_class_that_raises_on_inspection_is_a_coded_refusal(tmp_path: Path) -> None:
    """A handler class whose attribute lookup raises is refused (018), not a loader crash."""
    write(tmp_path / "h", contract(handler_class="tests.plugins.echo:HostileClass"))
    write(tmp_path / "good", contract(name="good"))
    report = load_handlers([tmp_path], allowed_namespaces=TEST_NAMESPACES)
    assert codes(report.refused) == [LoaderCode.UNEXPECTED_ERROR], [
        e.message for e in report.refused
    ]
    assert [h.contract.handler_name for h in report.loaded] == ["good"]


@pytest.mark.timeout(20)
def test_contracts_validate_refuses_hostile_yaml_and_lists_the_good_contract(
    tmp_path: Path,
) -> None:
    """`onex contracts validate` on hostile contracts exits 2 with one 017 per contract, and
    still reports the good contract beside them as loadable."""
    import json

    from typer.testing import CliRunner

    from workers.cli import app

    for case, text in HOSTILE_YAML.items():
        write(tmp_path / case, text)
    write(tmp_path / "good", contract(name="good"))
    env = {"ONEX_WORKER__ALLOWED_NAMESPACES": '["activities.", "tests.plugins."]'}
    result = CliRunner().invoke(app, ["contracts", "validate", str(tmp_path), "--json"], env=env)
    assert result.exit_code == 2, result.output
    report = json.loads(result.stdout)
    assert "good" in report["handlers"], "the good contract is reported as loadable"
    hostile = [p for p in report["problems"] if p["code"] == LoaderCode.YAML_TOO_COMPLEX]
    assert len(hostile) == len(HOSTILE_YAML), report["problems"]


def test_006_not_a_class_or_not_the_protocol(tmp_path: Path) -> None:
    """A module attribute that is not a class, a class without the lifecycle, or a
    synchronous lifecycle method are all refused."""
    for target, directory in [
        ("tests.plugins.echo:NOT_A_CLASS", "a"),
        ("tests.plugins.echo:NotAHandler", "b"),
        ("tests.plugins.echo:SyncLifecycle", "c"),
    ]:
        code = refused_code(tmp_path / directory, contract(handler_class=target))
        assert code == LoaderCode.PROTOCOL_NOT_IMPLEMENTED, target


def test_007_not_a_file(tmp_path: Path) -> None:
    """A glob matching a directory named like a contract refuses it as not a file."""
    (tmp_path / "odd" / "handler_contract.yaml").mkdir(parents=True)
    files, errors = discover([str(tmp_path / "odd" / "*.yaml")])
    assert files == []
    assert codes(errors) == [LoaderCode.NOT_A_FILE]


def test_008_unreadable_bytes(tmp_path: Path) -> None:
    """A file that is not UTF-8 text."""
    write(tmp_path / "h", "")
    (tmp_path / "h" / "handler_contract.yaml").write_bytes(b"\xff\xfe\x00bad")
    report = load_handlers([tmp_path], allowed_namespaces=TEST_NAMESPACES)
    assert codes(report.refused) == [LoaderCode.READ_FAILED]


def test_010_011_012_import_failures(tmp_path: Path) -> None:
    """A missing module, a missing class, a module whose own import fails or raises."""
    cases = {
        "tests.plugins.absent:EchoHandler": LoaderCode.MODULE_NOT_FOUND,
        "tests.plugins.echo:Missing": LoaderCode.CLASS_NOT_FOUND,
        "tests.plugins.broken_import:X": LoaderCode.IMPORT_FAILED,
        "tests.plugins.exploding_import:X": LoaderCode.IMPORT_FAILED,
    }
    for index, (target, expected) in enumerate(cases.items()):
        code = refused_code(tmp_path / str(index), contract(handler_class=target))
        assert code == expected, target


def test_013_namespace_is_checked_before_import(tmp_path: Path) -> None:
    """A plugin outside the allowlist is refused without importing it; allowlisting it in the
    settings lets it load."""
    sys.modules.pop("tests.plugins.exploding_import", None)
    target = contract(handler_class="tests.plugins.exploding_import:X")
    assert refused_code(tmp_path / "a", target, ["activities."]) == LoaderCode.NAMESPACE_NOT_ALLOWED
    assert "tests.plugins.exploding_import" not in sys.modules
    write(tmp_path / "b" / "h", contract())
    allowed = load_handlers([tmp_path / "b"], allowed_namespaces=["activities.", "tests.plugins"])
    assert len(allowed.loaded) == 1


@pytest.mark.parametrize(
    ("module", "allowed", "expected"),
    [
        ("foo.x", ["foo."], True),
        ("foobar.x", ["foo."], False),
        ("foo", ["foo."], True),
        ("foo.x", ["foo"], True),
        ("foobar", ["foo"], False),
        ("anything", None, True),
        ("activities.postgres", [], False),
    ],
)
def test_namespace_matching_is_boundary_aware(
    module: str, allowed: list[str] | None, expected: bool
) -> None:
    """`foo.` matches foo.x but never foobar.x; None allows all, [] allows nothing."""
    assert namespace_allowed(module, allowed) is expected


def test_014_declared_operation_without_a_method(tmp_path: Path) -> None:
    """Every operation of the contract needs an async method of that name."""
    text = contract(operations=("echo: {idempotent: true}", "shout: {idempotent: true}"))
    assert refused_code(tmp_path, text) == LoaderCode.OPERATION_NOT_IMPLEMENTED


def test_015_duplicate_handler_names(tmp_path: Path) -> None:
    """Two contracts with one name: the first (in sorted order) loads, the second is refused."""
    write(tmp_path / "a", contract())
    write(tmp_path / "b", contract())
    report = load_handlers([tmp_path], allowed_namespaces=TEST_NAMESPACES)
    assert [h.source for h in report.loaded] == ["a/handler_contract.yaml"]
    assert codes(report.refused) == [LoaderCode.DUPLICATE_HANDLER]


def test_016_secret_looking_values(tmp_path: Path) -> None:
    """A credential in a contract is refused, and the message does not repeat it."""
    text = contract(extra="description: connect to postgresql://admin:hunter2@db/registry\n")
    write(tmp_path / "h", text)
    (error,) = load_handlers([tmp_path], allowed_namespaces=TEST_NAMESPACES).refused
    assert error.loader_code == LoaderCode.SECRET_IN_CONTRACT
    assert "hunter2" not in error.message


def test_020_missing_directory_and_030_no_paths(tmp_path: Path) -> None:
    """A contract directory that does not exist; no paths at all."""
    report = load_handlers([tmp_path / "nowhere"], allowed_namespaces=TEST_NAMESPACES)
    assert codes(report.refused) == [LoaderCode.DIRECTORY_NOT_FOUND]
    assert codes(load_handlers([], allowed_namespaces=TEST_NAMESPACES).refused) == [
        LoaderCode.EMPTY_PATTERNS
    ]


def test_040_ambiguous_directory_loads_neither(tmp_path: Path) -> None:
    """Both file names in one directory: neither loads, and the other handlers still do."""
    write(tmp_path / "twice", contract(name="one"))
    write(tmp_path / "twice", contract(name="two"), "contract.yaml")
    write(tmp_path / "fine", contract(name="fine"))
    report = load_handlers([tmp_path], allowed_namespaces=TEST_NAMESPACES)
    assert codes(report.refused) == [LoaderCode.AMBIGUOUS_CONTRACT]
    assert [h.contract.handler_name for h in report.loaded] == ["fine"]


def test_discovery_is_deterministic_and_deduplicated(tmp_path: Path) -> None:
    """Files, directories and globs naming the same files give one sorted list."""
    for name in ("zeta", "alpha", "mid"):
        write(tmp_path / name, contract(name=name))
    files, errors = discover(
        [tmp_path, str(tmp_path / "*" / "handler_contract.yaml"), tmp_path / "mid"]
    )
    assert errors == []
    assert [f.path.parent.name for f in files] == ["alpha", "mid", "zeta"]


def test_messages_never_show_absolute_paths(tmp_path: Path) -> None:
    """Every refusal names files relative to the directory searched."""
    write(tmp_path / "bad", "handler_name: [")
    write(tmp_path / "worse", contract(handler_class="nowhere.module:X"))
    report = load_handlers([tmp_path], allowed_namespaces=TEST_NAMESPACES)
    assert len(report.refused) == 2
    for error in report.refused:
        assert str(tmp_path) not in error.message


def test_operation_contracts_load_and_refuse_like_handlers(tmp_path: Path) -> None:
    """Operation contracts go through the same reading rules; the built-ins are valid."""
    write(tmp_path, "operation: [", "broken.yaml")
    broken = read_operations([tmp_path])
    assert broken.contracts == {}
    assert codes(broken.refused) == [LoaderCode.INVALID_YAML]
    builtin = read_operations([Path("contracts/operations")])
    assert builtin.refused == []
    assert sorted(builtin.contracts) == ["deregister_node", "register_node"]


@pytest.fixture
def import_guard() -> Iterator[list[str]]:
    """Records every module imported while active that is outside the allowlist."""
    seen: list[str] = []
    # Libraries lazily import their own submodules; a new top-level package, or anything
    # under tests outside the plugins, can only come from a contract.
    known_packages = {name.split(".")[0] for name in sys.modules} - {"tests"}

    class Guard:
        @staticmethod
        def find_spec(name: str, path: object = None, target: object = None) -> None:
            allowed = namespace_allowed(name, ["activities.", "tests.plugins."])
            if not allowed and name.split(".")[0] not in known_packages and name != "tests":
                seen.append(name)

    guard = Guard()
    sys.meta_path.insert(0, guard)
    try:
        yield seen
    finally:
        sys.meta_path.remove(guard)


YAML_FIELDS = st.fixed_dictionaries(
    {},
    optional={
        "handler_name": st.text(max_size=20),
        "handler_class": st.sampled_from(
            ["evil.module:X", "tests.evil:X", "tests.plugins.echo:EchoHandler", "a:b", ""]
        )
        | st.text(max_size=30),
        "handler_type": st.sampled_from(["effect", "compute", ""]),
        "transport": st.sampled_from(["http", "database", "smoke"]),
        "operations": st.dictionaries(
            st.text(max_size=8), st.fixed_dictionaries({"idempotent": st.booleans()}), max_size=3
        ),
    },
)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    payload=st.one_of(
        st.binary(max_size=300),
        st.text(max_size=300).map(str.encode),
        YAML_FIELDS.map(lambda fields: __import__("yaml").safe_dump(fields).encode()),
    )
)
def test_hostile_input_only_ever_raises_handler_load_errors(
    tmp_path_factory: pytest.TempPathFactory, import_guard: list[str], payload: bytes
) -> None:
    """Any bytes or YAML: the loader returns a report (never raises), every refusal is a
    HandlerLoadError with a code, and nothing outside the allowlist is imported."""
    directory = tmp_path_factory.mktemp("hostile")
    write(directory, "")
    (directory / "handler_contract.yaml").write_bytes(payload)
    report = load_handlers([directory], allowed_namespaces=["activities.", "tests.plugins."])
    for error in report.refused:
        assert error.loader_code.startswith("HANDLER_LOADER_0")
    assert import_guard == [], f"imported outside the allowlist: {import_guard}"
