"""What may be shown of a message, a mapping, a DSN, a path or an exception (SAN rules).

Everything here errs on the side of hiding: losing a detail costs a debugging session, leaking a
credential into a log line or into Temporal history (visible in the UI forever) costs a rotation.

* One placeholder for a redacted value, :data:`REDACTED`; a whole message that may hold a
  credential becomes :data:`GENERIC_MESSAGE`, followed by the first allowlisted phrase it
  contains (``connection refused``, ``timeout``, ...) so that operators still learn what happened.
* Secrets read at start-up are registered with :func:`register_secret`; every text that goes
  through :func:`sanitize_text` has them scrubbed, whether or not anything else looks suspicious,
  in every form a secret travels in (URL-quoted three ways, JSON-escaped, ``repr`` of text or
  bytes, base64 at any alignment, so inside HTTP Basic ``user:pw`` too). A secret of any length
  is scrubbed; one shorter than :data:`MIN_SUBSTRING_LENGTH` only as a whole token, so that a
  two-letter secret does not eat every word that contains those letters.
* A text is suspicious when one of the credential detectors of :mod:`contracts.credentials`
  matches it (``password=x``, ``user:pw@host``, a token or key shape, a PEM block, ...), after
  NFKC normalization, zero-width removal, look-alike folding, URL-decoding and JSON-unescaping.
  The detectors look for a credential's shape, not for words: the product's operation names
  (``lookup_token``), class names (``SecretResolutionError``) and guidance ("set
  ONEX_VAULT__TOKEN") pass unchanged, so the message that tells a user what to do survives.
  The same detectors refuse credentials in request fields, so the two always agree.
* Mapping keys are matched against a narrower pattern (a key names a field; it is not prose):
  short words (``auth``, ``pw``, ``pin``, ``otp``) count only as a whole segment (``basic_auth``,
  ``auth-header``), so ``author`` and ``spinner`` are kept, and the bare ``key`` of a Kafka
  message is never redacted. A pair given as a list (``[["password", x]]``, header lists) is
  redacted like a mapping entry. Each container level (mapping, list, tuple, set) counts
  towards :data:`MAX_DEPTH`; deeper ones are replaced, which also ends cycles.
* DSNs keep scheme, host, port and database; any userinfo becomes ``***:***``; query, fragment
  and ``;``-parameters are dropped (``?password=`` and ``;password=`` are common); anything
  ambiguous is redacted whole.
* An exception is shown as ``Type: message``; if anything in its cause/context chain looks
  suspicious, its own message is replaced too, since wrappers often echo their cause.
"""

from __future__ import annotations

import base64
import json
import re
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any
from urllib.parse import quote, quote_plus, urlsplit

from pydantic import BaseModel, SecretBytes, SecretStr

from contracts.credentials import credential_key, find_credential, normalize, variants

REDACTED = "<redacted>"
GENERIC_MESSAGE = "[REDACTED - potentially sensitive data]"
MAX_MESSAGE_LENGTH = 500
MAX_DEPTH = 10

DSN_REDACTED = "<connection-string-redacted>"
TRUNCATED_SUFFIX = "... [truncated]"
DEPTH_EXCEEDED: dict[str, Any] = {"<truncated>": "max depth exceeded"}
# A registered secret shorter than this is scrubbed only as a whole token (not inside a word).
MIN_SUBSTRING_LENGTH = 4

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


def _base64_fragments(raw: bytes) -> Iterator[str]:
    """The base64 characters determined by ``raw`` alone, at each of the three alignments.

    ``raw`` inside a longer value (HTTP Basic ``user:pw``) encodes to one of these, whatever
    precedes it; the characters that mix in a neighbouring byte are left out.
    """
    for offset in range(3):
        encoded = base64.b64encode(b"\0" * offset + raw).decode()
        first = -(-8 * offset // 6)  # ceil: the first character holding only bytes of raw
        last = (8 * (offset + len(raw))) // 6  # the characters before it hold only raw's bits
        fragment = encoded[first:last]
        yield fragment
        yield fragment.replace("+", "-").replace("/", "_")  # the URL-safe alphabet


def _encodings(raw: str) -> set[str]:
    """Every form of ``raw`` that a message, a URL, a JSON document or a repr may carry."""
    forms = {
        raw,
        normalize(raw),
        quote(raw, safe=""),
        quote(raw),  # keeps "/"
        quote_plus(raw),
        json.dumps(raw)[1:-1],
        json.dumps(raw, ensure_ascii=False)[1:-1],
        repr(raw)[1:-1],
        repr(raw.encode())[2:-1],
    }
    if len(raw) >= MIN_SUBSTRING_LENGTH:
        forms.update(_base64_fragments(raw.encode()))
    else:  # too short for a fragment to mean anything: only its own encoding, as a token
        forms.add(base64.b64encode(raw.encode()).decode().rstrip("="))
    return {form for form in forms if form}


def _compile(secrets: frozenset[str]) -> re.Pattern[str] | None:
    if not secrets:
        return None
    forms = {form for secret in secrets for form in _encodings(secret)}
    # Longest first, so that a secret containing another is scrubbed whole.
    ordered = sorted(forms, key=lambda form: (-len(form), form))
    alternatives = [
        re.escape(form)
        if len(form) >= MIN_SUBSTRING_LENGTH
        else rf"(?<![A-Za-z0-9]){re.escape(form)}(?![A-Za-z0-9])"
        for form in ordered
    ]
    return re.compile("|".join(alternatives))


def register_secret(value: str | SecretStr | None) -> None:
    """Remember a secret value process-wide so sanitize_text scrubs any occurrence of it.

    Any non-empty value counts, in every encoding (see the module docstring); one shorter than
    :data:`MIN_SUBSTRING_LENGTH` is matched only as a whole token. Thread-safe.
    """
    global _secrets, _secrets_pattern
    raw = value.get_secret_value() if isinstance(value, SecretStr) else value
    if not raw:
        return
    with _secrets_lock:
        secrets = _secrets | {raw}
        _secrets_pattern = _compile(secrets)
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
    """A registered secret in any decoded form of ``text``, or a credential detector matches."""
    pattern = _secrets_pattern
    if pattern is not None and any(pattern.search(form) for form in [text, *variants(text)]):
        return True
    return find_credential(text) is not None


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
    """Scrub registered secrets, hide the whole text if it holds a credential, cut it at max_length.

    Text without a credential comes out unchanged (but for the length).
    """
    if max_length < len(TRUNCATED_SUFFIX):
        raise ValueError(f"max_length must be at least {len(TRUNCATED_SUFFIX)}, not {max_length}")
    text = _scrub_registered(text)
    if _is_suspicious(text):  # a disguised registered secret, or an unknown credential
        return _generic(normalize(text), max_length)
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
    # ";password=..." parameters (JDBC, some drivers) live in the path.
    path = parts.path.split(";", 1)[0]
    return f"{parts.scheme}://{netloc}{path}"


def _redact_value(value: Any, depth: int) -> Any:
    if isinstance(value, BaseModel):
        value = value.model_dump(mode="json", fallback=str, warnings=False)
    if isinstance(value, (Mapping, list, tuple, set, frozenset)) and depth > MAX_DEPTH:
        return dict(DEPTH_EXCEEDED)
    if isinstance(value, Mapping):
        return _redact(value, depth)
    if isinstance(value, (list, tuple)) and _is_secret_pair(value):
        pair = [_scrub_registered(_printable(value[0])), REDACTED]
        return tuple(pair) if isinstance(value, tuple) else pair
    if isinstance(value, (list, tuple, set, frozenset)):
        items = [_redact_value(item, depth + 1) for item in value]
        return tuple(items) if isinstance(value, tuple) else items
    if value is None or isinstance(value, (bool, int, float)):
        return value
    # Anything else (UUIDs, datetimes, bytes, objects) is shown as text, under the text rules.
    return sanitize_text(_printable(value))


def _is_secret_pair(value: list[Any] | tuple[Any, ...]) -> bool:
    """A ``[name, value]`` pair whose name is a credential key: headers given as a list."""
    return len(value) == 2 and isinstance(value[0], str) and is_secret_key(value[0])


def _redact(data: Mapping[Any, Any], depth: int) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in data.items():
        name = _scrub_registered(_printable(key))
        result[name] = REDACTED if is_secret_key(name) else _redact_value(value, depth + 1)
    return result


def is_secret_key(name: str) -> bool:
    """Whether a mapping key (or variable name) names a credential (SAN-6)."""
    return credential_key(name)


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
