"""Sanitization: DSNs, mappings, messages, exceptions, paths and reprs never show a secret.

Examples pin the exact output; properties place a generated secret in every supported shape and
check that the sanitized output never contains it. Generated secrets start with ``Zq9`` so that
they cannot coincide with anything the sanitizer writes itself.
"""

from __future__ import annotations

import base64
import json
import logging
import re
import string
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any
from urllib.parse import quote, quote_plus

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, SecretStr

from activities.resilience.sanitize import (
    GENERIC_MESSAGE,
    MAX_DEPTH,
    MAX_MESSAGE_LENGTH,
    REDACTED,
    forget_secrets,
    mask_dsn,
    redact_mapping,
    register_secret,
    safe_phrase,
    safe_repr,
    sanitize_exception,
    sanitize_path,
    sanitize_text,
)

# database=None: examples are neither replayed from nor saved to .hypothesis/examples.
PROPERTY = settings(max_examples=200, deadline=None, database=None)

SECRETS = st.text(
    alphabet=string.ascii_letters + string.digits + "!#%&*+-./:;=?@^_~", min_size=6, max_size=40
).map(lambda s: "Zq9" + s)
SCHEMES = st.sampled_from(
    [
        *("postgresql", "postgres", "mysql", "mongodb", "redis", "rediss", "valkey", "amqp"),
        *("kafka", "https", "http", "consul", "vault", "custom+tls"),
    ]
)
HOSTS = st.sampled_from(["db.internal", "10.0.0.5", "localhost", "[::1]", "[2001:db8::5]"])
PORTS = st.sampled_from(["", ":5432", ":9092", ":6379"])
DATABASES = st.sampled_from(["", "/", "/registry", "/onex_test"])
SURROUNDING = st.text(max_size=80)

SECRET_KEYS = [
    "password", "db_password", "PGPASSWORD", "passwd", "pwd", "client_secret", "secret",
    "token", "refresh_token", "X-Vault-Token", "x-consul-token", "api_key", "apiKey", "api-key",
    "credential", "credentials", "private_key", "Authorization", "auth", "basic_auth",
    "auth-header", "cookie", "session_id", "dsn", "connection_string", "ssn", "credit_card",
    "card_number",
]  # fmt: skip


@pytest.fixture(autouse=True, scope="module")
def _no_secrets_around_this_module() -> Iterator[None]:
    forget_secrets()
    yield
    forget_secrets()


@pytest.fixture
def no_secrets() -> Iterator[None]:
    """Registered secrets are process-wide: start and end each test without any."""
    forget_secrets()
    yield
    forget_secrets()


@contextmanager
def registered(secret: str) -> Iterator[None]:
    """Register for one hypothesis example (function fixtures do not run per example)."""
    register_secret(secret)
    try:
        yield
    finally:
        forget_secrets()


def nested(depth: int, leaf: dict[str, Any]) -> dict[str, Any]:
    """``leaf`` as the mapping ``depth`` levels below the top-level mapping (depth 0)."""
    node = leaf
    for _ in range(depth):
        node = {"level": node}
    return node


def descend(data: dict[str, Any], depth: int) -> Any:
    for _ in range(depth):
        data = data["level"]
    return data


def raise_chain(secret: str, links: int, outer: str, *, explicit: bool) -> BaseException:
    """``links`` exceptions deep, the innermost holding ``password=<secret>``; return the outer."""

    def level(depth: int) -> None:
        if depth == links:
            raise RuntimeError(f"password={secret}")
        try:
            level(depth + 1)
        except Exception as exc:
            message = outer if depth == 0 else f"layer {depth}"
            if explicit:
                raise ValueError(message) from exc
            raise ValueError(message)  # noqa: B904 - the implicit __context__ is the point

    try:
        level(0)
    except ValueError as exc:
        return exc
    raise AssertionError("level(0) must raise")


def assert_hidden(secret: str, output: str) -> None:
    assert secret not in output, f"secret {secret!r} leaked into {output!r}"
    assert quote(secret, safe="") not in output, f"quoted {secret!r} leaked into {output!r}"


# --- mask_dsn -----------------------------------------------------------------------------------


def test_mask_dsn_masks_userinfo_and_keeps_host_port_database() -> None:
    """User and password become ***:***; scheme, host, port and database stay readable."""
    dsn = "postgresql://onex:hunter2@db.internal:5432/registry"
    assert mask_dsn(dsn) == "postgresql://***:***@db.internal:5432/registry"


def test_mask_dsn_masks_a_user_without_password() -> None:
    """A lone user name is masked the same way: a user name is PII."""
    assert mask_dsn("postgresql://onex@db.internal/registry") == (
        "postgresql://***:***@db.internal/registry"
    )


def test_mask_dsn_keeps_ipv6_hosts_bracketed() -> None:
    """An IPv6 literal keeps its brackets, so the port is still unambiguous."""
    assert mask_dsn("postgresql://onex:hunter2@[2001:db8::5]:5432/registry") == (
        "postgresql://***:***@[2001:db8::5]:5432/registry"
    )


def test_mask_dsn_leaves_a_dsn_without_userinfo_unchanged() -> None:
    """Nothing to hide: the DSN comes back as it was."""
    dsn = "postgresql://db.internal:5432/registry"
    assert mask_dsn(dsn) == dsn


def test_mask_dsn_drops_query_and_fragment() -> None:
    """Query strings carry passwords too (?password=...), so they never survive."""
    dsn = "postgresql://db.internal:5432/registry?password=hunter2&sslmode=require#frag"
    assert mask_dsn(dsn) == "postgresql://db.internal:5432/registry"


@pytest.mark.parametrize(
    "dsn",
    [
        "not a connection string",
        "",
        "db.internal:5432",  # no scheme
        "postgresql:///registry",  # no host
        "postgresql://onex:hunter2@db.internal:port/registry",  # bad port
        "postgresql://onex:hunter2@[::1/registry",  # bad IPv6 literal
        "postgresql://onex:12/34@db.internal/registry",  # unquoted "/" in the password
        "postgresql://onex?hunter2@db.internal/registry",  # "@" in the query
    ],
)
def test_mask_dsn_redacts_what_it_cannot_parse(dsn: str) -> None:
    """Anything ambiguous is redacted whole rather than half-masked."""
    assert mask_dsn(dsn) == "<connection-string-redacted>"


# --- redact_mapping -----------------------------------------------------------------------------


def test_redact_mapping_redacts_secret_keys_in_nested_dicts_and_lists() -> None:
    """Secret-like keys are redacted at every level, whatever their value's type."""
    data = {
        "host": "db.internal",
        "port": 5432,
        "auth": {"user": "onex", "password": "hunter2"},
        "headers": [{"Authorization": "Bearer abc"}, {"Accept": "application/json"}],
        "api_key": ["a", "b"],
        "extra": ({"client_secret": 1},),
    }
    assert redact_mapping(data) == {
        "host": "db.internal",
        "port": 5432,
        "auth": REDACTED,
        "headers": [{"Authorization": REDACTED}, {"Accept": "application/json"}],
        "api_key": REDACTED,
        "extra": ({"client_secret": REDACTED},),
    }


def test_redact_mapping_keeps_ordinary_keys_that_merely_look_close() -> None:
    """A Kafka message key, an author, an OAuth provider name, a class name are not secrets."""
    data = {"key": "node-1", "author": "alice", "oauth_provider_name": "github", "classname": "X"}
    assert redact_mapping(data) == data


def test_redact_mapping_sanitizes_string_values_and_stringifies_keys() -> None:
    """Values that hold a credential marker become generic; non-str keys become strings."""
    data: dict[Any, str] = {
        1: "fine",
        "error": "could not connect to postgresql://onex:hunter2@db/registry",
    }
    assert redact_mapping(data) == {"1": "fine", "error": GENERIC_MESSAGE}


def test_redact_mapping_keeps_depth_ten_and_truncates_depth_eleven() -> None:
    """The top-level mapping is depth 0; a mapping at depth 11 is replaced, depth 10 is kept."""
    kept = redact_mapping(nested(MAX_DEPTH, {"leaf": "kept"}))
    assert descend(kept, MAX_DEPTH) == {"leaf": "kept"}
    cut = redact_mapping(nested(MAX_DEPTH + 1, {"leaf": "kept"}))
    assert descend(cut, MAX_DEPTH + 1) == {"<truncated>": "max depth exceeded"}


def test_redact_mapping_survives_cycles() -> None:
    """Self-referencing mappings and lists end at the depth limit instead of recursing forever."""
    data: dict[str, Any] = {"name": "loop"}
    data["self"] = data
    assert redact_mapping(data)["self"]["self"]["name"] == "loop"
    items: list[Any] = ["x"]
    items.append(items)
    assert redact_mapping({"items": items})["items"][1][1][0] == "x"


# --- sanitize_text ------------------------------------------------------------------------------


def test_sanitize_text_replaces_a_message_with_a_credential_keeping_the_safe_phrase() -> None:
    """A credential hides the whole message; the allowlisted phrase still says why."""
    result = sanitize_text("login with password=hunter2 at db: authentication failed")
    assert result == f"{GENERIC_MESSAGE}: authentication failed"


def test_sanitize_text_without_a_safe_phrase_is_just_generic() -> None:
    """No allowlisted phrase: only the generic message remains."""
    assert sanitize_text("-----BEGIN PRIVATE KEY----- MIIEv...") == GENERIC_MESSAGE


@pytest.mark.parametrize(
    "text",
    [
        "GET https://alice@api.example.com/v1 returned 401",  # userinfo in any scheme
        "header was eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.sig",  # a JWT
        "MYSQL_PWD=hunter2 is set",
        "bad pwd: hunter2",
    ],
)
def test_sanitize_text_recognizes_markers(text: str) -> None:
    """Every credential shape turns the message generic."""
    assert sanitize_text(text).startswith(GENERIC_MESSAGE)


def test_sanitize_text_keeps_harmless_text() -> None:
    """Operational context without markers passes through untouched."""
    text = "connection refused by postgresql-primary after 3 retries (timeout 10s)"
    assert sanitize_text(text) == text


def test_sanitize_text_truncates_beyond_500_characters() -> None:
    """500 characters pass; 501 are cut to exactly 500, ending with the truncation suffix."""
    assert sanitize_text("x" * MAX_MESSAGE_LENGTH) == "x" * MAX_MESSAGE_LENGTH
    cut = sanitize_text("x" * (MAX_MESSAGE_LENGTH + 1))
    assert len(cut) == MAX_MESSAGE_LENGTH
    assert cut.endswith("... [truncated]")


@pytest.mark.timeout(30)
@pytest.mark.parametrize("unit", ["a", "eyj-", "x://", "ab1+", "pwd"])
def test_sanitize_text_stays_linear_on_long_messages(unit: str) -> None:
    """Marker patterns never backtrack quadratically on a 200 kB adversarial message.

    Linear work takes milliseconds; quadratic backtracking takes minutes and hits the hang
    guard (the timeout marker), so no timing is asserted here.
    """
    text = unit * (200_000 // len(unit))
    assert len(sanitize_text(text)) <= MAX_MESSAGE_LENGTH


def test_sanitize_text_scrubs_a_registered_secret_without_any_marker(no_secrets: None) -> None:
    """A registered secret is scrubbed even where nothing else looks suspicious."""
    register_secret(SecretStr("hunter2hunter2"))
    assert sanitize_text("login as onex with hunter2hunter2 failed") == (
        f"login as onex with {REDACTED} failed"
    )


def test_register_secret_scrubs_short_values_as_whole_tokens_only(no_secrets: None) -> None:
    """A secret under 4 characters is scrubbed where it stands alone, never inside a word (that
    would mangle every message); None and the empty string are ignored."""
    register_secret("abc")
    register_secret(None)
    register_secret("")
    assert sanitize_text("abc def") == f"{REDACTED} def"
    assert sanitize_text("the abcdef table") == "the abcdef table", "only as a whole token"


def test_safe_phrase_prefers_the_specific_phrase() -> None:
    """Phrases are tried in allowlist order: "host not found" wins over "not found"."""
    assert safe_phrase("Host Not Found: db.internal") == "host not found"
    assert safe_phrase("nothing to see") is None


# --- sanitize_exception, sanitize_path, safe_repr -----------------------------------------------


def test_sanitize_exception_prefixes_the_type_name() -> None:
    """An exception renders as its type and sanitized message, or its type alone."""
    assert (
        sanitize_exception(TimeoutError("timeout after 10s")) == "TimeoutError: timeout after 10s"
    )
    assert sanitize_exception(ValueError()) == "ValueError"


def test_sanitize_exception_hides_a_message_echoing_a_suspicious_cause() -> None:
    """A wrapper repeating its cause's secret is hidden because the cause looks suspicious."""
    outer = raise_chain("hunter2", 1, "rejected hunter2: connection refused", explicit=True)
    assert sanitize_exception(outer) == f"ValueError: {GENERIC_MESSAGE}: connection refused"


@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/opt/onex/secrets/db/password", "<config-dir>/db/password"),
        ("/var/lib/onex/credentials/kafka.pem", "<config-dir>/kafka.pem"),
        ("/home/alice/.onex/config.yaml", "<config-dir>/alice/.onex/config.yaml"),
        ("/root/.ssh/id_ed25519", "<config-dir>/.ssh/id_ed25519"),
        ("/etc/onex/contracts/node.yaml", "<config-dir>/contracts/node.yaml"),
        ("/usr/share/onex/schema.json", "/usr/share/onex/schema.json"),
        ("relative/home/alice", "relative/home/alice"),
    ],
)
def test_sanitize_path_replaces_private_prefixes(path: str, expected: str) -> None:
    """Private directory prefixes become <config-dir>/; the rest of the path is kept."""
    assert sanitize_path(path) == expected


class DatabaseConfig(BaseModel):
    host: str
    user: str
    password: SecretStr
    api_token: str
    options: dict[str, Any] = {}


def test_safe_repr_of_a_model_redacts_secret_fields() -> None:
    """Models render like their repr, with secret fields redacted and SecretStr masked."""
    config = DatabaseConfig(
        host="db.internal",
        user="onex",
        password=SecretStr("hunter2"),
        api_token="tok-123",
        options={"sslpassword": "x", "sslmode": "require"},
    )
    rendered = safe_repr(config)
    assert rendered == (
        "DatabaseConfig(host='db.internal', user='onex', password='<redacted>', "
        "api_token='<redacted>', options={'sslpassword': '<redacted>', 'sslmode': 'require'})"
    )


def test_safe_repr_of_secrets_mappings_and_strings() -> None:
    """SecretStr stays masked, mappings are redacted, strings are sanitized reprs."""
    assert safe_repr(SecretStr("hunter2")) == "SecretStr('**********')"
    assert safe_repr({"token": "abc", "n": 1}) == "{'token': '<redacted>', 'n': 1}"
    assert safe_repr("plain") == "'plain'"
    assert safe_repr("Bearer abc123def456") == GENERIC_MESSAGE


# --- properties: a secret in every supported shape never comes out -------------------------------


@PROPERTY
@given(SECRETS, SCHEMES, HOSTS, PORTS, DATABASES, SURROUNDING)
def test_property_dsn_password_never_shown(
    secret: str, scheme: str, host: str, port: str, database: str, around: str
) -> None:
    """A DSN password (quoted or raw) is masked by mask_dsn and hidden by sanitize_text."""
    quoted = f"{scheme}://onex:{quote(secret, safe='')}@{host}{port}{database}"
    assert mask_dsn(quoted) == f"{scheme}://***:***@{host}{port}{database}"
    raw = f"{scheme}://onex:{secret}@{host}{port}{database}"
    for dsn in (quoted, raw):
        assert_hidden(secret, mask_dsn(dsn))
        assert_hidden(secret, sanitize_text(f"{around}could not connect to {dsn}{around}"))


@PROPERTY
@given(SECRETS, SCHEMES, HOSTS, PORTS, DATABASES, SURROUNDING)
def test_property_dsn_user_never_shown(
    secret: str, scheme: str, host: str, port: str, database: str, around: str
) -> None:
    """A DSN user name (quoted or raw, with or without password) never survives either."""
    quoted = f"{scheme}://{quote(secret, safe='')}@{host}{port}{database}"
    assert mask_dsn(quoted) == f"{scheme}://***:***@{host}{port}{database}"
    for dsn in (quoted, f"{scheme}://{secret}:pw@{host}{port}{database}"):
        assert_hidden(secret, mask_dsn(dsn))
        assert_hidden(secret, sanitize_text(f"{around} {dsn} {around}"))


SPELLINGS: list[Callable[[str], str]] = [str, str.upper, str.title]
WRAPPERS: list[Callable[[str], Any]] = [str, lambda s: [s], lambda s: (s,), lambda s: {"v": s}]


@st.composite
def secret_in_nested_data(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    """A secret under a secret-like key, buried 0..12 containers deep among harmless data."""
    secret = draw(SECRETS)
    spelling = draw(st.sampled_from(SPELLINGS))
    key = spelling(draw(st.sampled_from(SECRET_KEYS)))
    wrap = draw(st.sampled_from(WRAPPERS))
    node: Any = {"note": "harmless", key: wrap(secret), "count": 3}
    for _ in range(draw(st.integers(min_value=0, max_value=12))):
        node = {"child": node, "other": "x"} if draw(st.booleans()) else ["x", node, 1]
    return secret, node if isinstance(node, dict) else {"items": node}


@PROPERTY
@given(secret_in_nested_data())
def test_property_secret_keys_redacted_at_any_depth(case: tuple[str, dict[str, Any]]) -> None:
    """Under a secret-like key at any depth, a value is redacted (or cut off by the depth limit)."""
    secret, data = case
    result = redact_mapping(data)
    assert_hidden(secret, str(result))
    assert_hidden(secret, repr(result))
    assert_hidden(secret, safe_repr(data))


HEADERS = st.sampled_from(
    ["Authorization: Bearer {}", "X-Vault-Token: {}", "X-Consul-Token: {}", "authorization: {}"]
)


@PROPERTY
@given(SECRETS, HEADERS, SURROUNDING, SURROUNDING)
def test_property_http_header_values_never_shown(
    secret: str, header: str, before: str, after: str
) -> None:
    """A credential header line hides the whole text it appears in."""
    text = f"{before}\n{header.format(secret)}\n{after}"
    assert_hidden(secret, sanitize_text(text))


EXCEPTION_MESSAGES = st.sampled_from(
    ["password={}", "token {}", "invalid api_key: {}", "client_secret '{}' rejected", "pwd {}"]
)


@PROPERTY
@given(SECRETS, EXCEPTION_MESSAGES, st.sampled_from([ValueError, RuntimeError, OSError]))
def test_property_exception_messages_never_show_secrets(
    secret: str, message: str, kind: type[Exception]
) -> None:
    """An exception whose message holds a marker is shown as its type and a generic message."""
    result = sanitize_exception(kind(message.format(secret)))
    assert result.startswith(f"{kind.__name__}: {GENERIC_MESSAGE}")
    assert_hidden(secret, result)


@PROPERTY
@given(
    SECRETS,
    st.integers(min_value=1, max_value=MAX_DEPTH),
    st.sampled_from(["harmless", "wrapped: {}", "failed ({}) - connection reset"]),
    st.booleans(),
)
def test_property_causes_never_leak_through_the_outer_message(
    secret: str, links: int, outer: str, explicit: bool
) -> None:
    """A secret in a cause or context, even echoed by the outer message, never comes out."""
    exc = raise_chain(secret, links, outer.format(secret), explicit=explicit)
    result = sanitize_exception(exc)
    assert result.startswith("ValueError: ")
    assert_hidden(secret, result)


@PROPERTY
@given(SECRETS, SURROUNDING, SURROUNDING, st.booleans())
def test_property_registered_secrets_scrubbed_anywhere(
    secret: str, before: str, after: str, quoted: bool
) -> None:
    """A registered secret (raw or URL-quoted) is scrubbed from any surrounding text."""
    shown = quote(secret, safe="") if quoted else secret
    with registered(secret):
        assert_hidden(secret, sanitize_text(before + shown + after))
        assert_hidden(secret, sanitize_exception(ValueError(before + shown + after)))
        assert_hidden(secret, str(redact_mapping({"note": before + shown + after, shown: 1})))


@PROPERTY
@given(st.text(max_size=1200), st.integers(min_value=15, max_value=1000))
def test_property_sanitize_text_never_exceeds_max_length(text: str, max_length: int) -> None:
    """Whatever the input, the output fits in max_length characters."""
    assert len(sanitize_text(text, max_length=max_length)) <= max_length


# --- issue 12: forms the sanitizer used to miss, and text it used to over-redact -----------------

ENCODINGS: dict[str, Callable[[str], str]] = {
    "raw": str,
    "quote_plus": quote_plus,
    "quote": quote,  # keeps "/"
    "quote_safe_none": lambda s: quote(s, safe=""),
    "json": lambda s: json.dumps(s)[1:-1],
    "json_document": lambda s: json.dumps({"value": s}),
    "repr": repr,
    "bytes_repr": lambda s: repr(s.encode()),
    "base64": lambda s: base64.b64encode(s.encode()).decode(),
    "basic_auth": lambda s: "Basic " + base64.b64encode(f"onex:{s}".encode()).decode(),
    "basic_auth_long_user": lambda s: base64.b64encode(f"registry-admin:{s}".encode()).decode(),
    "urlsafe_base64": lambda s: base64.urlsafe_b64encode(s.encode()).decode(),
}
# Any printable ASCII, including the characters each encoding escapes.
ANY_SECRETS = st.text(
    alphabet=string.ascii_letters + string.digits + string.punctuation + " ",
    min_size=6,
    max_size=40,
).map(lambda s: "Zq9" + s)
SHORT_SECRETS = st.text(alphabet=string.ascii_letters + string.digits, min_size=1, max_size=3)


def encoded_forms(secret: str, encoding: str) -> list[str]:
    """What must not come out: the secret, and its encoded form (its base64 fragment)."""
    shown = ENCODINGS[encoding](secret)
    if "base64" in encoding or "basic" in encoding:
        return [secret, base64.b64encode(secret.encode()).decode()[: len(secret) * 4 // 3 - 1]]
    return [secret, shown]


def in_every_context(text: str) -> dict[str, str]:
    """``text`` sanitized in every context a secret reaches the outside through."""
    inner = ValueError("connect failed", text)
    outer = RuntimeError("wrapped")
    outer.__cause__ = inner
    return {
        "message": sanitize_text(f"request failed: {text} (attempt 2)"),
        "mapping_value": repr(redact_mapping({"note": text, "nested": {"list": [text]}})),
        "exception_args": sanitize_exception(ValueError("connect failed", text)),
        "exception_cause": sanitize_exception(outer),
        "list_pair": repr(redact_mapping({"headers": [["X-Note", text], ("note", text)]})),
        "log_record_args": library_log_line("request %s failed", text),
    }


def library_log_line(message: str, *args: object) -> str:
    """What a third-party logger's record becomes on standard error, through the log setup."""
    from workers.logging import render_library_record

    record = logging.LogRecord("aiokafka", logging.WARNING, __file__, 1, message, args, None)
    return render_library_record(record)


@settings(max_examples=300, deadline=None, database=None)
@given(ANY_SECRETS, st.sampled_from(sorted(ENCODINGS)))
def test_property_registered_secrets_never_come_out_in_any_encoding_or_context(
    secret: str, encoding: str
) -> None:
    """A registered secret, in every encoding (URL-quoted three ways, JSON, repr, bytes repr,
    base64, HTTP Basic), in every context (message, mapping value, exception args and cause,
    list pair, library log record), never comes out."""
    with registered(secret):
        for context, output in in_every_context(ENCODINGS[encoding](secret)).items():
            for form in encoded_forms(secret, encoding):
                assert form not in output, (
                    f"{encoding} form of a registered secret leaked through {context}: {output!r}"
                    "; add the encoding to sanitize._encodings"
                )


@settings(max_examples=100, deadline=None, database=None)
@given(SHORT_SECRETS, st.sampled_from(["raw", "quote_plus", "json", "repr"]))
def test_property_short_registered_secrets_are_scrubbed_as_whole_tokens(
    secret: str, encoding: str
) -> None:
    """A secret of 1 to 3 characters, standing alone, is scrubbed: no token of the output is it."""
    with registered(secret):
        output = sanitize_text(f"login onex {ENCODINGS[encoding](secret)} failed")
    tokens = re.split(r"[\s'\"]+", output)
    assert secret not in tokens, f"short secret {secret!r} kept in {output!r}"


UNKNOWN_CREDENTIALS = [
    # DSNs, URL-encoded, double-encoded, JSON-escaped, or with a ;password= parameter
    quote("postgresql://onex:Zq9pw@db.internal/registry", safe=""),
    quote(quote("postgresql://onex:Zq9pw@db.internal/registry", safe=""), safe=""),
    json.dumps("postgresql://onex:Zq9pw@db.internal/registry").replace("/", "\\/"),
    "postgresql://db.internal/registry;password=Zq9pw",
    # userinfo without a scheme, a pgpass line
    "onex:Zq9pw@10.0.0.9",
    "db.internal:5432:registry:onex:Zq9pw",
    # credential fields and headers
    "passphrase: Zq9pw",
    "Cookie: session=Zq9pw",
    "Set-Cookie: session=Zq9pw; HttpOnly",
    "Auth: Basic b25leDpacTlwdw==",
    # token shapes
    "hvs.CAESIZq9pwZq9pwZq9pwZq9pwZq9pw",
    "hvb.AAAAAQZq9pwZq9pwZq9pwZq9pwZq9pw",
    "AKIAIOSFODNN7EXAMPLE",
    "AccessKeyId=Zq9pw",
    "ghp_Zq9pwZq9pwZq9pwZq9pwZq9pwZq9pw",
    "xoxb-123456789012-Zq9pwZq9pw",
    # a PEM body without its BEGIN line, a JWT after "_"
    "MIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7Zq9pw",
    "token_eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.Zq9pw",
    # look-alikes: a Cyrillic o, zero-width characters, full-width letters
    "passw\u043erd=Zq9pw",
    "pass\u200bword=Zq9pw",
    "\uff50\uff41\uff53\uff53\uff57\uff4f\uff52\uff44=Zq9pw",
]


@pytest.mark.parametrize("text", UNKNOWN_CREDENTIALS)
def test_unknown_credentials_in_forms_once_missed_are_hidden(text: str) -> None:
    """Each form the sanitizer used to miss now hides the message (issue 12, item 5)."""
    for context, output in in_every_context(text).items():
        for part in ("Zq9pw", "AKIAIOSFODNN7EXAMPLE"):
            assert part not in output, (
                f"{text!r} came out through {context}: {output!r}; add its shape to "
                "contracts/credentials.py"
            )


@pytest.mark.parametrize(
    "key", ["pass", "pw", "bearer", "jwt", "signature", "hmac", "otp", "pin", "role_id"]
)
def test_values_under_short_credential_keys_and_list_pairs_are_redacted(key: str) -> None:
    """Values under pass, pw, bearer, jwt, signature, hmac, otp, pin, role_id are redacted, as
    are header pairs given as lists."""
    assert redact_mapping({key: "Zq9pw"}) == {key: REDACTED}
    assert redact_mapping({"headers": [[key, "Zq9pw"]]}) == {"headers": [[key, REDACTED]]}
    assert redact_mapping({"headers": [("password", "Zq9pw")]}) == {
        "headers": [("password", REDACTED)]
    }


def test_mask_dsn_drops_semicolon_parameters() -> None:
    """``;password=`` parameters live in the path: mask_dsn keeps only the database."""
    assert mask_dsn("postgresql://db.internal/registry;password=Zq9pw") == (
        "postgresql://db.internal/registry"
    )


def _product_vocabulary() -> dict[str, list[str]]:
    import contracts.errors as errors
    from contracts.topics import TopicName
    from workers.contract_files import read_handlers

    handlers = read_handlers(["contracts/handlers"]).contracts.values()
    return {
        "operations": sorted(
            {h.activity_name(op) for h in handlers for op in h.operations}
            | {"lookup_token", "renew_token", "read_secret", "get_secret", "login_approle"}
        ),
        "classes": sorted(
            name
            for name, value in vars(errors).items()
            if isinstance(value, type) and issubclass(value, BaseException)
        ),
        "topics": [topic.value for topic in TopicName],
    }


VOCABULARY = _product_vocabulary()
GUIDANCE = [
    "authentication failed at vault: the token was refused; set ONEX_VAULT__TOKEN or "
    "ONEX_VAULT__TOKEN_FILE to a valid token, or log in again with `vault login`",
    "secret postgres_password is not available: file source missing (set "
    "ONEX_SECRETS__SOURCES or create the file)",
    "secret not found in Vault: postgres_password",
    "the AppRole secret_id was refused at vault: issue a new secret_id",
    "password authentication failed for user onex",
    "invalid secret name: expected a lower-case identifier",
    "ONEX_VAULT__TOKEN=<token> onex worker",
    "cannot reach Temporal at localhost:7233 (is `onex dev up` running?)",
]
NODE_IDS = st.from_regex(r"\Anode-[a-z0-9]{1,12}(-[a-z0-9]{1,8})?\Z")
ADDRESSES = st.sampled_from(
    ["10.0.0.5", "10.0.0.5:8500", "db.internal:5432", "localhost:9092", "[::1]:7233",
     "http://10.0.0.5:8080/health", "postgresql://***:***@db.internal:5432/registry"]
)  # fmt: skip


@settings(max_examples=300, deadline=None, database=None)
@given(
    NODE_IDS,
    ADDRESSES,
    st.sampled_from(VOCABULARY["topics"]),
    st.sampled_from(VOCABULARY["operations"]),
    st.sampled_from(VOCABULARY["classes"]),
    st.sampled_from(GUIDANCE),
)
def test_property_ordinary_product_text_comes_out_unchanged(
    node_id: str, address: str, topic: str, operation: str, class_name: str, guidance: str
) -> None:
    """Node ids, addresses, topics, operation names (lookup_token), class names and the
    product's own guidance pass through sanitize_text, redact_mapping and sanitize_exception
    unchanged: precision matters as much as recall."""
    text = f"{operation} on {node_id} at {address} ({topic}): {class_name}: {guidance}"[:500]
    assert sanitize_text(text) == text, (
        f"ordinary text was changed: {text!r} -> {sanitize_text(text)!r}; a detector in "
        "contracts/credentials.py matches words rather than a credential's shape"
    )
    data = {"node_id": node_id, "address": address, "topic": topic, "operation": operation}
    assert redact_mapping(data) == data
    assert sanitize_exception(RuntimeError(guidance)) == f"RuntimeError: {guidance}"
