"""What may be shown of a message, a mapping, a DSN, a path or an exception (SAN rules).

Everything here errs on the side of hiding: losing a detail costs a debugging session, leaking a
credential into a log line or into Temporal history (visible in the UI forever) costs a rotation.

* One placeholder for a redacted value, :data:`REDACTED`; a whole message that may hold a
  credential becomes :data:`GENERIC_MESSAGE`, followed by the first allowlisted phrase it
  contains (``connection refused``, ``timeout``, ...) so that operators still learn what happened.
* Secrets read at start-up are registered with :func:`register_secret`; every text that goes
  through :func:`sanitize_text` has them scrubbed, whether or not anything else looks suspicious.
* A text is suspicious when its lower-cased form contains a credential marker (``password``,
  ``token``, ``bearer``, ``-----begin``, a URL with userinfo, a database or broker URL scheme, a
  JWT, ...). Markers over-match on purpose: "token expired" is hidden too, its phrase is not.
* Mapping keys are matched against a narrower pattern (a key names a field; it is not prose):
  ``auth`` counts only as a whole segment (``basic_auth``, ``auth-header``), so ``author`` is kept,
  and the bare ``key`` of a Kafka message is never redacted. Each container level (mapping, list,
  tuple, set) counts towards :data:`MAX_DEPTH`; deeper ones are replaced, which also ends cycles.
* DSNs keep scheme, host, port and database; any userinfo becomes ``***:***``; query and fragment
  are dropped (``?password=`` is common); anything ambiguous is redacted whole.
* An exception is shown as ``Type: message``; if anything in its cause/context chain looks
  suspicious, its own message is replaced too, since wrappers often echo their cause.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote, urlsplit

from pydantic import BaseModel, SecretBytes, SecretStr

REDACTED = "<redacted>"
GENERIC_MESSAGE = "[REDACTED - potentially sensitive data]"
MAX_MESSAGE_LENGTH = 500
MAX_DEPTH = 10

DSN_REDACTED = "<connection-string-redacted>"
TRUNCATED_SUFFIX = "... [truncated]"
DEPTH_EXCEEDED: dict[str, Any] = {"<truncated>": "max depth exceeded"}
# Shorter values are ordinary words or numbers: scrubbing them would mangle every message.
MIN_SECRET_LENGTH = 4

# SAN-12 in full (some contain others, so the list reads against the spec), matched as
# substrings of the lower-cased text.
_MARKER_WORDS = (
    "password", "passwd", "secret", "token", "api_key", "apikey", "api-key", "access_key",
    "private_key", "ssh_key", "client_secret", "credential", "bearer", "authorization",
    "session_id", "connection_string", "conn_str", "aws_secret", "aws_access", "vault_token",
    "x-vault-token", "consul_token", "consul_http_token", "x-consul-token", "db_password",
    "pgpassword", "mysql_pwd", "-----begin", "-----end",
    "postgres://", "postgresql://", "mysql://", "mongodb://", "mongodb+srv://", "redis://",
    "rediss://", "valkey://", "amqp://", "amqps://", "kafka://",
)  # fmt: skip
# Repetitions are bounded, or anchored at the start of a run, so that a long message (a base64
# blob, a minified payload) costs linear time rather than quadratic.
_MARKERS = re.compile(
    "|".join(map(re.escape, _MARKER_WORDS))
    # "pwd" is short enough to occur inside other words: only on its own.
    + r"|(?<![a-z0-9])pwd(?![a-z0-9])"
    # Userinfo in any scheme; anything up to an "@" counts, since passwords may hold "/".
    + r"|[a-z][a-z0-9+.\-]{0,31}://[^\s@]{0,512}@"
    # A JWT starts with a base64url-encoded '{"': its header is a bearer token by itself.
    + r"|(?<![a-z0-9_\-])eyj[a-z0-9_\-]{8,}\.[a-z0-9_\-]{8,}"
)

_SEP = r"[_\-. ]?"
_SECRET_KEY = re.compile(
    rf"passw(?:or)?d|passphrase|pwd|secret|token|api{_SEP}key|access{_SEP}key|credential"
    rf"|private{_SEP}key|authorization|cookie|session{_SEP}id|dsn|connection{_SEP}string"
    rf"|credit{_SEP}card|card{_SEP}number"
    # Short words only as whole segments: "author", "classname" are not secrets.
    r"|(?<![a-z])(?:auth|ssn)(?![a-z])",
    re.IGNORECASE,
)

# SAN-14: checked in this order, so that the most specific phrase wins ("host not found").
SAFE_PHRASES = (
    "connection refused", "connection reset", "connection timeout", "connection closed",
    "network unreachable", "host not found", "dns lookup failed", "service unavailable",
    "too many connections", "resource exhausted", "authentication failed", "permission denied",
    "access denied", "already exists", "not found", "conflict", "timeout", "unavailable",
)  # fmt: skip

_PRIVATE_PATH = re.compile(
    r"^(?:/opt/onex/secrets/|/var/lib/onex/credentials/|/home/|/root/|/etc/onex/)"
)

# Copy-on-write: readers take the current pattern without locking; writers swap it whole.
_secrets_lock = threading.Lock()
_secrets: frozenset[str] = frozenset()
_secrets_pattern: re.Pattern[str] | None = None


def register_secret(value: str | SecretStr | None) -> None:
    """Remember a secret value process-wide so sanitize_text scrubs any occurrence of it.

    Values shorter than 4 characters are ignored (they would redact ordinary words). The
    URL-quoted form is remembered too, since DSNs carry passwords quoted. Thread-safe.
    """
    global _secrets, _secrets_pattern
    raw = value.get_secret_value() if isinstance(value, SecretStr) else value
    if raw is None or len(raw) < MIN_SECRET_LENGTH:
        return
    with _secrets_lock:
        secrets = _secrets | {raw, quote(raw, safe="")}
        # Longest first, so that a secret containing another is scrubbed whole.
        ordered = sorted(secrets, key=len, reverse=True)
        _secrets_pattern = re.compile("|".join(map(re.escape, ordered)))
        _secrets = secrets


def forget_secrets() -> None:
    """Forget every registered secret (for tests)."""
    global _secrets, _secrets_pattern
    with _secrets_lock:
        _secrets, _secrets_pattern = frozenset(), None


def _scrub_registered(text: str) -> str:
    pattern = _secrets_pattern
    return text if pattern is None else pattern.sub(REDACTED, text)


def _is_suspicious(text: str) -> bool:
    pattern = _secrets_pattern
    if pattern is not None and pattern.search(text):
        return True
    return _MARKERS.search(text.lower()) is not None


def _printable(value: Any, render: Callable[[Any], str] = str) -> str:
    try:
        return render(value)
    except Exception:  # a broken __str__ or __repr__ must not break error reporting
        return f"<unprintable {type(value).__name__}>"


def _truncate(text: str, max_length: int) -> str:
    if len(text) <= max_length:
        return text
    return text[: max_length - len(TRUNCATED_SUFFIX)] + TRUNCATED_SUFFIX


def _generic(text: str, max_length: int) -> str:
    phrase = safe_phrase(text)
    return _truncate(
        GENERIC_MESSAGE if phrase is None else f"{GENERIC_MESSAGE}: {phrase}", max_length
    )


def safe_phrase(text: str) -> str | None:
    """The first allowlisted phrase (SAN-14 order) found in ``text``, or None."""
    lowered = text.lower()
    return next((phrase for phrase in SAFE_PHRASES if phrase in lowered), None)


def sanitize_text(text: str, *, max_length: int = MAX_MESSAGE_LENGTH) -> str:
    """Scrub registered secrets, hide the whole text if it holds a marker, cut it at max_length."""
    if max_length < len(TRUNCATED_SUFFIX):
        raise ValueError(f"max_length must be at least {len(TRUNCATED_SUFFIX)}, not {max_length}")
    text = _scrub_registered(text)
    if _MARKERS.search(text.lower()):
        return _generic(text, max_length)
    return _truncate(text, max_length)


def _linked(exc: BaseException) -> list[BaseException]:
    links = [exc.__cause__, exc.__context__]
    if isinstance(exc, BaseExceptionGroup):
        links.extend(exc.exceptions)
    return [link for link in links if link is not None]


def _chain_is_suspicious(exc: BaseException) -> bool:
    seen = {id(exc)}
    pending = _linked(exc)
    visited = 0
    while pending and visited < MAX_DEPTH:
        link = pending.pop(0)
        if id(link) in seen:  # __context__ chains can loop
            continue
        seen.add(id(link))
        visited += 1
        if _is_suspicious(_printable(link)):
            return True
        pending.extend(_linked(link))
    return False


def sanitize_exception(exc: BaseException) -> str:
    """``Type: sanitized message``; never includes the text of a cause or context.

    If a linked exception (up to MAX_DEPTH links) looks suspicious, the outer message is hidden as
    well: wrappers tend to repeat what they wrap, and we cannot tell which part is the secret.
    """
    name = type(exc).__name__
    message = _printable(exc)
    if not message:
        return name
    if _chain_is_suspicious(exc):
        return f"{name}: {_generic(message, MAX_MESSAGE_LENGTH)}"
    return f"{name}: {sanitize_text(message)}"


def mask_dsn(dsn: str) -> str:
    """``scheme://***:***@host:port/database`` when userinfo is present; query and fragment dropped.

    Ambiguous input is redacted whole: no scheme or host, a bad port or IPv6 literal, or an "@"
    outside the netloc (an unquoted "/", "?" or "#" in a password splits the URL early).
    """
    try:
        parts = urlsplit(dsn)
        has_host = bool(parts.hostname)
        _ = parts.port  # raises ValueError on a non-numeric port
    except ValueError:
        return DSN_REDACTED
    if not parts.scheme or not has_host or "@" in parts.path + parts.query + parts.fragment:
        return DSN_REDACTED
    _userinfo, at, hostport = parts.netloc.rpartition("@")
    netloc = f"***:***@{hostport}" if at else hostport
    return f"{parts.scheme}://{netloc}{parts.path}"


def _redact_value(value: Any, depth: int) -> Any:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", fallback=str, warnings=False)
    if isinstance(value, (Mapping, list, tuple, set, frozenset)) and depth > MAX_DEPTH:
        return dict(DEPTH_EXCEEDED)
    if isinstance(value, Mapping):
        return _redact(value, depth)
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_redact_value(item, depth + 1) for item in value]
        return tuple(items) if isinstance(value, tuple) else items
    if value is None or isinstance(value, (bool, int, float)):
        return value
    # Anything else (UUIDs, datetimes, bytes, objects) is shown as text, under the text rules.
    return sanitize_text(_printable(value))


def _redact(data: Mapping[Any, Any], depth: int) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in data.items():
        name = _scrub_registered(_printable(key))
        result[name] = REDACTED if is_secret_key(name) else _redact_value(value, depth + 1)
    return result


def is_secret_key(name: str) -> bool:
    """Whether a mapping key (or variable name) names a credential (SAN-6)."""
    return _SECRET_KEY.search(name) is not None


def redact_mapping(data: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of ``data`` with secret-like keys redacted and every string value sanitized (SAN-6).

    The top-level mapping is depth 0; a container nested deeper than MAX_DEPTH is replaced by
    ``{"<truncated>": "max depth exceeded"}``.
    """
    return _redact(data, 0)


def sanitize_path(path: str) -> str:
    """Replace a private directory prefix (SAN-7) by ``<config-dir>/``, keeping the rest."""
    return _PRIVATE_PATH.sub("<config-dir>/", path, count=1)


def safe_repr(value: Any) -> str:
    """A repr safe for logs: models and mappings redacted, secrets masked, text sanitized."""
    if isinstance(value, (SecretStr, SecretBytes)):
        return repr(value)  # pydantic already masks it: SecretStr('**********')
    if isinstance(value, BaseModel):
        fields = _redact_value(value, 0)
        rendered = ", ".join(f"{name}={field!r}" for name, field in fields.items())
        return f"{type(value).__name__}({rendered})"
    if isinstance(value, Mapping):
        return repr(redact_mapping(value))
    return sanitize_text(_printable(value, repr))
