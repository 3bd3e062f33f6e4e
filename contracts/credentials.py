"""Whether a text holds a credential: the one set of detectors for requests and the sanitizer.

A request field that trips a detector is refused (:mod:`contracts.registry`); a message that
trips one is hidden (:mod:`activities.resilience.sanitize`). The same rules serve both, so that
what a user may put into a request and what the product may show agree.

The detectors look for a credential's *shape*, not for words: ``password=x``, ``user:pw@host``,
``Authorization: Basic ...``, a Vault, AWS, GitHub or Slack token, a JWT, a PEM block or body, a
pgpass line. The words alone (``lookup_token``, ``SecretResolutionError``, "set
ONEX_VAULT__TOKEN") are not credentials, so the product's operation names, class names and
guidance pass. Every text is checked in several forms (:func:`variants`): NFKC-normalized with
zero-width characters removed and look-alike letters folded to Latin, URL-decoded once and twice,
and JSON-unescaped, so that ``password`` spelt with a Cyrillic o, or
``postgresql%3A%2F%2Fu%3Apw%40db``, is no disguise.

:func:`find_credential` returns the name of the rule that matched, never the matched text: a
refusal names the field and the rule, and never echoes the value.
"""

from __future__ import annotations

import re
import unicodedata
from urllib.parse import unquote

# Characters that render as nothing: removed before matching.
_INVISIBLE = re.compile("[\u00ad\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\ufeff]")
# Cyrillic and Greek letters that look like Latin ones, folded before matching (NFKC keeps them).
_LOOK_ALIKES = str.maketrans(
    "аеорсухіјѕԁһԛԝАВЕКМНОРСТХІЈЅαεορτκνιΑΒΕΖΗΙΚΜΝΟΡΤΥΧ",
    "aeopcyxijsdhqwABEKMHOPCTXIJSaeoptkviABEZHIKMNOPTYX",
)

# Names of a credential field. Long ones anywhere in an identifier (``dbpassword``,
# ``X-Vault-Token``, ``access_token``); short ones only as a whole segment (``pwd``, not ``spin``).
_LONG_NAME = (
    r"passwd|password|passphrase|secret(?:[_-]?id)?|token|api[_-]?key|access[_-]?key|accesskeyid"
    r"|client[_-]?secret|private[_-]?key|credentials?|role[_-]?id|signature|hmac|authorization"
)
_SHORT_NAME = r"(?<![a-z0-9])(?:pwd|pass|pw|jwt|otp|pin)"
_NAME = rf"(?:{_LONG_NAME}|{_SHORT_NAME})"
# With a colon, only a credential name itself (with a credential-ish prefix) counts: a colon also
# introduces prose, and ``lookup_token: permission denied`` names an operation, not a value.
_PREFIX = (
    r"(?:(?:access|refresh|id|client|db|database|vault|consul|x[_-]vault|x[_-]consul|session|api"
    r"|app|user|admin|root|sasl|pg|mysql|aws|aws[_-]secret|private|bearer|secret|onex_\w{1,40})"
    r"[_-]{1,2})"
)
# A placeholder is not a value: guidance writes ``ONEX_VAULT__TOKEN=<token>``.
_VALUE = r"""(?!<|\*\*\*|\.\.\.)[^\s"'`,;&)}\]]"""
_QUOTE = r"""["']?"""
_ENCODED_CHARS = r"[a-z0-9+/=._~\-]"
# The shape of an encoded credential: some digit or base64 punctuation in it, so that "basic
# authentication." is prose.
_ENCODED = rf"(?=[a-z._~\-]*[0-9+/=]){_ENCODED_CHARS}{{8,}}"
_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    (
        "userinfo in a URL",
        # Anything up to an "@" counts: passwords may hold "/".
        re.compile(r"[a-z][a-z0-9+.\-]{0,31}://(?!\*\*\*:\*\*\*@)[^\s@]{1,256}@", re.I),
    ),
    (
        "user:password@host",
        re.compile(r"(?<![\w.%+\-:/])[\w.%+\-]{1,64}:(?!\*\*\*@)[^\s/@:]{1,256}@[\w\-\[]", re.I),
    ),
    (
        "a credential assigned to a name",
        re.compile(rf"{_NAME}{_QUOTE}\s*=\s*{_QUOTE}{_VALUE}", re.I),
    ),
    (
        "a credential field",
        re.compile(rf"(?<![a-z0-9_.\-]){_PREFIX}?{_NAME}{_QUOTE}\s*:\s*{_QUOTE}{_VALUE}", re.I),
    ),
    (
        # "token expired" is prose; "token Zq9f3kL0x" is not: a random-looking word after the name.
        "a credential after its name",
        re.compile(
            rf"{_NAME}{_QUOTE}\s+{_QUOTE}(?=[^\s\"']*\d)(?=[^\s\"']*[a-z])[^\s\"']{{8,}}", re.I
        ),
    ),
    (
        "an authorization header",
        re.compile(
            r"(?<![a-z0-9])(?:proxy-)?auth(?:orization)?"
            + _QUOTE
            + r"\s*[:=]\s*"
            + _QUOTE
            + rf"(?:(?:basic|bearer|digest|negotiate|token)\s+\S{{4,}}|{_ENCODED})",
            re.I,
        ),
    ),
    ("a cookie header", re.compile(r"(?<![a-z0-9])(?:set-)?cookie\s*:\s*\S", re.I)),
    (
        "a bearer or basic credential",
        re.compile(
            rf"(?<![a-z0-9])(?:bearer\s+(?=\S*[^a-z\s.,;:!?])\S{{8,}}|basic\s+{_ENCODED})", re.I
        ),
    ),
    (
        "a Vault token",
        re.compile(
            r"(?<![A-Za-z0-9])(?:hv[sbr]\.[A-Za-z0-9_\-]{20,}|s\.[A-Za-z0-9]{24})(?![A-Za-z0-9])"
        ),
    ),
    (
        "an AWS access key",
        re.compile(
            r"(?<![A-Z0-9])(?:AKIA|ASIA|AGPA|AIDA|AROA)[A-Z0-9]{16}(?![A-Z0-9])"
            r"|AccessKeyId\s*[=:]"
        ),
    ),
    ("a GitHub token", re.compile(r"(?<![A-Za-z0-9])(?:gh[pousr]_|github_pat_)\w{20,}")),
    ("a Slack token", re.compile(r"(?<![A-Za-z0-9])xox[abposr]-[A-Za-z0-9\-]{10,}")),
    ("a JWT", re.compile(r"(?<![A-Za-z0-9])eyJ[A-Za-z0-9_\-]{8,}\.[A-Za-z0-9_\-]{8,}")),
    ("a PEM block", re.compile(r"-----(?:BEGIN|END)\b", re.I)),
    # A DER key or certificate starts "MII" (a long SEQUENCE) or "MC4CAQ" (an Ed25519 key).
    ("a PEM body", re.compile(r"(?<![A-Za-z0-9+/])(?:MII|MC4CAQ)[A-Za-z0-9+/]{40,}")),
    (
        "a pgpass line",
        # host:port:database:user:password, on a line of its own or inside a message.
        re.compile(
            r"(?<![\w.\-:\[])[\w.\-]{1,255}:(?:\d{1,5}|\*):[\w.\-*]{1,255}:[\w.\-*]{1,255}"
            r":[^\s:]{1,256}"
        ),
    ),
)

_JSON_ESCAPE = re.compile(r"\\u([0-9a-fA-F]{4})|\\([\\/\"'])")


def normalize(text: str) -> str:
    """NFKC, without invisible characters, look-alike letters folded: what a reader sees."""
    return _INVISIBLE.sub("", unicodedata.normalize("NFKC", text)).translate(_LOOK_ALIKES)


def _json_unescaped(text: str) -> str:
    return _JSON_ESCAPE.sub(lambda m: chr(int(m[1], 16)) if m[1] else m[2], text)


def variants(text: str) -> list[str]:
    """``text`` in every form a detector checks: normalized, URL-decoded (twice), JSON-unescaped.

    Only distinct forms are returned, the normalized text first.
    """
    seen: list[str] = []
    base = normalize(text)
    once = unquote(base)
    unescaped = _json_unescaped(base)
    for form in (base, once, unquote(once), unescaped, _json_unescaped(unescaped)):
        form = normalize(form)
        if form not in seen:
            seen.append(form)
    return seen


def find_credential(text: str) -> str | None:
    """The name of the first rule a form of ``text`` matches, or None. Never the matched text."""
    for form in variants(text):
        for name, rule in _RULES:
            if rule.search(form):
                return name
    return None


def credential_key(name: str) -> bool:
    """Whether a key (a metadata key, a mapping key, a header name) names a credential."""
    return _KEY.search(normalize(name)) is not None


_SEP = r"[_\-. ]?"
_KEY = re.compile(
    rf"passw(?:or)?d|passphrase|secret|token|api{_SEP}key|access{_SEP}key|credential"
    rf"|private{_SEP}key|authorization|cookie|session{_SEP}id|dsn|connection{_SEP}string"
    rf"|credit{_SEP}card|card{_SEP}number|bearer|jwt|signature|hmac|role{_SEP}id"
    # Short words only as whole segments: "author", "classname", "spinner" are not secrets.
    r"|(?<![a-z])(?:auth|ssn|pwd|pass|pw|otp|pin)(?![a-z])",
    re.IGNORECASE,
)
