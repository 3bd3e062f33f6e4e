"""The libraries' log records go through structlog, sanitized; a command holds them back and
shows them only when it fails."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator

import pytest

from activities.resilience.sanitize import GENERIC_MESSAGE, register_secret
from tests.fakes import planted
from workers.logging import LibraryLogs, configure_logging, show_library_logs

SECRET = "kafka-Secret-93c1e"


@pytest.fixture(autouse=True)
def _default_logging() -> Iterator[None]:
    """Each test configures logging its way; the next one starts from the worker's default."""
    yield
    configure_logging("info")


def test_a_command_holds_library_lines_until_it_fails(capsys: pytest.CaptureFixture[str]) -> None:
    """With libraries="on_failure", aiokafka's connection error is not printed while the
    command runs; show_library_logs() prints it then, as a JSON line naming its logger."""
    configure_logging("info", json=True, libraries="on_failure")
    logging.getLogger("aiokafka").error('Unable connect to "127.0.0.1:9092"')
    assert capsys.readouterr().err == "", (
        "a library's line reached stderr before any failure: it must be held back "
        "(workers.logging._HeldRecords)"
    )
    show_library_logs()
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    record = json.loads(lines[0])
    assert (record["logger"], record["level"]) == ("aiokafka", "error"), record
    assert record["event"] == 'Unable connect to "127.0.0.1:9092"'
    show_library_logs()
    assert capsys.readouterr().err == "", "a held line is shown once"


def test_a_service_shows_library_lines_as_they_come_sanitized(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """With libraries="live" (the worker), a library's warning is printed at once; a secret in
    it is scrubbed, and its exception is one sanitized line, not a traceback. Below WARNING,
    libraries stay quiet."""
    register_secret(SECRET)
    configure_logging("info", json=True, libraries="live")
    library = logging.getLogger("asyncpg")
    library.info("connected")
    try:
        raise ConnectionResetError(f"reset while sending {SECRET}")
    except ConnectionResetError:
        library.warning("connection lost using %s", SECRET, exc_info=True)
    err = capsys.readouterr().err
    assert SECRET not in err, f"a registered secret reached the log: {err}"
    assert "Traceback" not in err, "a library's exception is summarized, not printed whole"
    lines = err.splitlines()
    assert len(lines) == 1, f"expected only the warning (INFO is below the libraries' level): {err}"
    record = json.loads(lines[0])
    assert record["logger"] == "asyncpg"
    assert record["event"].startswith("connection lost using"), record
    assert record["error"].startswith("ConnectionResetError"), record


class _Collecting(logging.Handler):
    """A handler someone else put on the root logger (an embedder's, a log shipper's)."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.mark.parametrize("libraries", ["live", "on_failure"])
@pytest.mark.parametrize("name", ["aiokafka", "asyncpg", "aiohttp.client", "hvac"])
def test_a_third_party_logger_is_sanitized_for_every_root_handler(
    capsys: pytest.CaptureFixture[str], name: str, libraries: LibraryLogs
) -> None:
    """A client library's record carrying a credential in its arguments and in its exception
    (a DSN with its password, the password again, neither registered with the sanitizer) is
    sanitized as it is made: on standard error (the root handler installed here) and in a
    handler someone else added to the root alike, its message is hidden whole and its
    exception is one sanitized line, not a traceback; its logger and level are kept."""
    password = planted.POSTGRES_PASSWORD
    dsn = f"postgresql://onex:{password}@db.internal:5432/onex"
    configure_logging("info", json=True, libraries=libraries)
    other = _Collecting()
    logging.getLogger().addHandler(other)
    try:
        logging.getLogger(name).warning(
            "connecting to %s failed, retrying with password=%s",
            dsn,
            password,
            exc_info=ConnectionRefusedError(f"connect call failed: {dsn}"),
        )
    finally:
        logging.getLogger().removeHandler(other)
    show_library_logs()  # a no-op when live
    err = capsys.readouterr().err
    assert password not in err, f"a {name} record reached stderr unsanitized"
    [line] = err.splitlines()
    record = json.loads(line)
    assert (record["logger"], record["level"]) == (name, "warning"), record
    assert record["event"] == GENERIC_MESSAGE, record
    assert record["error"] == f"ConnectionRefusedError: {GENERIC_MESSAGE}", record
    shown = "\n".join(other.lines)
    assert password not in shown, f"another root handler got the {name} record unsanitized"
    assert shown == (
        f"{name} WARNING {GENERIC_MESSAGE}\nConnectionRefusedError: {GENERIC_MESSAGE}"
    ), shown
