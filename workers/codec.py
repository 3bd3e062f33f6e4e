"""Payload encryption: AES-256-GCM over the pydantic data converter (docs/security.md).

An encrypted payload, as Temporal stores it::

    metadata  encoding          = binary/encrypted
              encryption-key-id = <key id>          which key of the keyring encrypted it
              encryption-cipher = AES-256-GCM/v1    the codec header: how to read ``data``
    data      nonce (12 bytes) || ciphertext || tag (16 bytes)

The plaintext is the original payload (metadata and data) serialized; the key id and the codec
header are the associated data, so a payload relabelled with another key id or header does not
authenticate. Keys come from the secret store by logical name (:data:`PAYLOAD_KEY_SECRET`) as a
keyring: ``key_id:base64-key`` entries separated by commas, newest first. The first key encrypts;
every key decrypts, so a key rotates without breaking running workflows (prepend the new key,
restart the workers and the codec server, drop the old key once no open workflow and no kept
history needs it).

Left in plaintext on purpose: payloads that are not ``binary/encrypted`` decode as they are
(histories recorded before encryption was on), and a *status summary* (a JSON object of short
backend names to the project's status words, such as the memo's ``{"postgres": "succeeded"}``)
is not encrypted, so that the memo stays readable without the codec server. Nothing but status
words can pass that rule: see :func:`is_status_summary`.

Errors (every message names the key id, never the key)::

    PayloadCodecError (InfraPermanentError)       a payload cannot be encrypted or decrypted
    ├── PayloadDecryptionError                    wrong key, tampered or truncated data,
    │                                             no key id, an unknown codec header
    └── MissingPayloadKeyError (+ ConfigurationError)   the payload's key id is not configured
    PayloadKeyError (ConfigurationError)          the configured keyring is malformed
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from google.protobuf.message import DecodeError
from pydantic import SecretStr
from temporalio.api.common.v1 import Payload
from temporalio.converter import PayloadCodec

from activities.base import SecretSource
from activities.resilience.sanitize import register_secret
from contracts.errors import ConfigurationError, InfraPermanentError
from contracts.operations_io import OperationStatus, StepStatus

if TYPE_CHECKING:  # hvac loads only when a secret is needed (see resolve_secret)
    from activities.vault import SecretStoreSettings

PAYLOAD_KEY_SECRET: Final = "temporal.payload_key"  # noqa: S105 - a name, not a value
"""The logical secret holding the keyring (``key_id:base64-key,...``, newest first)."""

ENCODING: Final = b"binary/encrypted"
KEY_ID_HEADER: Final = "encryption-key-id"
CIPHER_HEADER: Final = "encryption-cipher"
CIPHER: Final = b"AES-256-GCM/v1"
NONCE_BYTES: Final = 12
TAG_BYTES: Final = 16
KEY_BYTES: Final = 32

KEY_ID: Final = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_BACKEND_NAME: Final = re.compile(r"^[a-z][a-z0-9_]{0,31}$")
_STATUS_WORDS: Final = frozenset(s.value for s in OperationStatus) | frozenset(
    s.value for s in StepStatus
)
# A summary is a handful of backends; anything longer is not one (and is not even parsed).
_SUMMARY_MAX_BYTES: Final = 1024
_KEY_FORM = "key_id:base64-key entries separated by commas, newest first"


class PayloadCodecError(InfraPermanentError):
    """A payload cannot be encrypted or decrypted; the message names the key id, never a key."""


class PayloadDecryptionError(PayloadCodecError):
    """An encrypted payload does not decrypt: wrong key, altered, truncated, or unknown form."""


class MissingPayloadKeyError(PayloadCodecError, ConfigurationError):
    """A payload was encrypted with a key id that the keyring does not have."""


class PayloadKeyError(ConfigurationError):
    """The configured keyring cannot be used (its value is never quoted)."""


@dataclass(frozen=True)
class PayloadKey:
    key_id: str
    key: bytes = field(repr=False)

    def __post_init__(self) -> None:
        if not KEY_ID.fullmatch(self.key_id):
            raise PayloadKeyError(
                "a payload key id must be 1-64 letters, digits, '.', '_' or '-', "
                "starting with a letter or digit"
            )
        if len(self.key) != KEY_BYTES:
            raise PayloadKeyError(
                f"payload key {self.key_id} is {len(self.key)} bytes; AES-256 needs {KEY_BYTES} "
                "(make one with: openssl rand -base64 32)"
            )

    @classmethod
    def generate(cls, key_id: str) -> PayloadKey:
        """A fresh random key (tests, and the bench)."""
        return cls(key_id, os.urandom(KEY_BYTES))

    def encoded(self) -> str:
        """The keyring entry for this key: ``key_id:base64``."""
        return f"{self.key_id}:{base64.b64encode(self.key).decode()}"


@dataclass(frozen=True)
class PayloadKeyring:
    """The configured keys, newest first: the first encrypts, every one decrypts."""

    keys: tuple[PayloadKey, ...]

    def __post_init__(self) -> None:
        if not self.keys:
            raise PayloadKeyError(f"the payload keyring is empty: expected {_KEY_FORM}")
        seen: set[str] = set()
        for key in self.keys:
            if key.key_id in seen:
                raise PayloadKeyError(f"payload key id {key.key_id} appears twice in the keyring")
            seen.add(key.key_id)

    @property
    def current(self) -> PayloadKey:
        return self.keys[0]

    @property
    def key_ids(self) -> list[str]:
        return [key.key_id for key in self.keys]

    @classmethod
    def parse(cls, text: str) -> PayloadKeyring:
        """``key_id:base64-key`` entries separated by commas (whitespace ignored), newest first.

        Errors say which entry or key id is wrong, never what the value was: a key pasted into
        the wrong place must not end up in a log.
        """
        keys = []
        entries = [entry.strip() for entry in text.split(",")]
        for position, entry in enumerate(entries, start=1):
            key_id, separator, encoded = entry.partition(":")
            if not separator or not KEY_ID.fullmatch(key_id.strip()):
                raise PayloadKeyError(
                    f"entry {position} of secret {PAYLOAD_KEY_SECRET} is not key_id:base64-key "
                    f"(expected {_KEY_FORM}; a key id is 1-64 letters, digits, '.', '_' or '-')"
                )
            key_id = key_id.strip()
            try:
                raw = base64.b64decode(encoded.strip(), validate=True)
            except (binascii.Error, ValueError):
                raise PayloadKeyError(
                    f"payload key {key_id} in secret {PAYLOAD_KEY_SECRET} is not valid base64 "
                    "(make one with: openssl rand -base64 32)"
                ) from None
            keys.append(PayloadKey(key_id, raw))
        return cls(tuple(keys))

    def get(self, key_id: str) -> PayloadKey | None:
        return next((key for key in self.keys if key.key_id == key_id), None)


def is_status_summary(payload: Payload) -> bool:
    """Whether ``payload`` is a status summary, left in plaintext: a JSON object whose keys are
    short lowercase names and whose values are all status words (``succeeded``, ``partial``...).

    Such a payload can hold nothing a request or a result carries (addresses, names, metadata):
    its every value comes from a closed vocabulary. An empty object qualifies (a memo before the
    first backend answered).
    """
    if payload.metadata.get("encoding") != b"json/plain":
        return False
    if len(payload.data) > _SUMMARY_MAX_BYTES or not payload.data.startswith(b"{"):
        return False
    try:
        value = json.loads(payload.data)
    except ValueError:
        return False
    return isinstance(value, dict) and all(
        _BACKEND_NAME.fullmatch(key) and isinstance(word, str) and word in _STATUS_WORDS
        for key, word in value.items()
    )


def _printable_key_id(raw: bytes) -> str:
    """The key id a payload names, if it is a well-formed one (it comes from stored data)."""
    text = raw.decode(errors="replace")
    return text if KEY_ID.fullmatch(text) else "<malformed key id>"


class EncryptionCodec(PayloadCodec):
    """AES-256-GCM with the keyring's newest key; decrypts with whichever key a payload names."""

    def __init__(self, keyring: PayloadKeyring) -> None:
        self.keyring = keyring
        self._ciphers = {key.key_id: AESGCM(key.key) for key in keyring.keys}

    async def encode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.encrypt(payload) for payload in payloads]

    async def decode(self, payloads: Sequence[Payload]) -> list[Payload]:
        return [self.decrypt(payload) for payload in payloads]

    def encrypt(self, payload: Payload) -> Payload:
        if is_status_summary(payload):
            return payload
        key_id = self.keyring.current.key_id
        nonce = os.urandom(NONCE_BYTES)
        sealed = self._ciphers[key_id].encrypt(
            nonce, payload.SerializeToString(), _associated(key_id.encode(), CIPHER)
        )
        return Payload(
            metadata={"encoding": ENCODING, KEY_ID_HEADER: key_id.encode(), CIPHER_HEADER: CIPHER},
            data=nonce + sealed,
        )

    def decrypt(self, payload: Payload) -> Payload:
        if payload.metadata.get("encoding") != ENCODING:
            return payload  # plaintext: recorded before encryption, or a status summary
        raw_id = payload.metadata.get(KEY_ID_HEADER)
        if not raw_id:
            raise PayloadDecryptionError(
                f"an encrypted payload has no {KEY_ID_HEADER} header, so no key can decrypt it: "
                "it was not written by this codec, or its metadata was altered"
            )
        key_id = _printable_key_id(raw_id)
        cipher = payload.metadata.get(CIPHER_HEADER)
        if cipher != CIPHER:
            shown = "missing" if cipher is None else repr(cipher.decode(errors="replace")[:40])
            raise PayloadDecryptionError(
                f"the payload encrypted with key id {key_id} has an unknown codec header "
                f"{CIPHER_HEADER} ({shown}; this codec reads {CIPHER.decode()}): it was written "
                "by another or a newer codec"
            )
        aes = self._ciphers.get(key_id)
        if aes is None:
            raise MissingPayloadKeyError(
                f"the payload was encrypted with key id {key_id}, which is not configured "
                f"(configured: {', '.join(self.keyring.key_ids)}): add that key to the secret "
                f"{PAYLOAD_KEY_SECRET}"
            )
        if len(payload.data) < NONCE_BYTES + TAG_BYTES:
            raise PayloadDecryptionError(
                f"the payload encrypted with key id {key_id} is truncated ({len(payload.data)} "
                f"bytes; at least {NONCE_BYTES + TAG_BYTES})"
            )
        nonce, sealed = payload.data[:NONCE_BYTES], payload.data[NONCE_BYTES:]
        try:
            plain = aes.decrypt(nonce, sealed, _associated(raw_id, cipher))
            decoded = Payload()
            decoded.ParseFromString(plain)
        except (InvalidTag, DecodeError):
            raise PayloadDecryptionError(
                f"the payload encrypted with key id {key_id} does not authenticate: the key "
                f"configured as {key_id} is not the one it was encrypted with, or the payload "
                "was truncated or altered"
            ) from None
        return decoded


def _associated(key_id: bytes, cipher: bytes) -> bytes:
    # Binds the headers to the ciphertext: a payload relabelled with another key id fails.
    return b"onex-payload\x00" + cipher + b"\x00" + key_id


async def load_keyring(
    settings: SecretStoreSettings, *, secrets: SecretSource | None = None
) -> PayloadKeyring:
    """The keyring from the secret store (``secrets``, or one built from ``settings``).

    The value, and each key in it, is registered with the sanitizer.
    """
    value = await resolve_secret(settings, PAYLOAD_KEY_SECRET, secrets=secrets)
    text = value.get_secret_value()
    register_secret(value)
    for entry in text.split(","):
        register_secret(entry.partition(":")[2].strip() or None)
    return PayloadKeyring.parse(text)


async def resolve_secret(
    settings: SecretStoreSettings, name: str, *, secrets: SecretSource | None = None
) -> SecretStr:
    """The required secret ``name``, from ``secrets`` or a resolver built from ``settings``
    (closed again at once: a client process needs its keys only at start)."""
    if secrets is not None:
        value = await secrets.get_secret(name)
    else:
        from activities.vault import build_secret_resolver

        resolver, vault = await build_secret_resolver(settings)
        try:
            value = await resolver.get_secret(name)
        finally:
            if vault is not None:
                vault.close()
    return value if isinstance(value, SecretStr) else SecretStr(str(value))
