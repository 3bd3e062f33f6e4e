"""The payload codec and the codec server, without Temporal: keys, bad input, HTTP refusals."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp.test_utils import TestClient, TestServer
from pydantic import SecretStr
from temporalio.api.common.v1 import Payload

from activities.resilience.sanitize import sanitize_text
from activities.settings import SecretsSettings
from activities.vault import SecretResolver
from contracts.errors import ConfigurationError
from tests.support import free_port
from workers.codec import (
    CIPHER_HEADER,
    KEY_ID_HEADER,
    EncryptionCodec,
    MissingPayloadKeyError,
    PayloadDecryptionError,
    PayloadKey,
    PayloadKeyError,
    PayloadKeyring,
    is_status_summary,
    load_keyring,
)
from workers.codec_server import codec_app
from workers.converter import DATA_CONVERTER, build_data_converter, encrypted_converter
from workers.settings import CodecSettings, OnexSettings

K1 = PayloadKey.generate("k1")
K2 = PayloadKey.generate("k2")
TOKEN = "codec-token-" + "x" * 20
ORIGIN = "http://127.0.0.1:8233"


def plain(value: object) -> Payload:
    return DATA_CONVERTER.payload_converter.to_payload(value)


REQUEST = plain({"address": "10.0.0.7", "service_name": "billing"})


def secret_text(key: PayloadKey) -> str:
    return base64.b64encode(key.key).decode()


def assert_names_key_id_not_key(error: BaseException, key_id: str, *keys: PayloadKey) -> None:
    message = str(error)
    assert key_id in message, f"the message must name key id {key_id}: {message}"
    for key in keys:
        assert secret_text(key) not in message, "HOW TO FIX: never put a key in a message"


async def test_a_payload_round_trips_and_is_unreadable_when_encrypted() -> None:
    """encrypt then decrypt gives the payload back; the stored form carries the key id and the
    codec header, and none of the request's text."""
    codec = EncryptionCodec(PayloadKeyring((K1,)))
    (sealed,) = await codec.encode([REQUEST])
    assert sealed.metadata[KEY_ID_HEADER] == b"k1"
    assert sealed.metadata["encoding"] == b"binary/encrypted"
    assert b"10.0.0.7" not in sealed.SerializeToString(), "the request must not be readable"
    assert (await codec.decode([sealed])) == [REQUEST]


async def test_the_newest_key_encrypts_and_every_key_decrypts() -> None:
    """After rotation (k2 prepended), new payloads use k2 and payloads sealed with k1 still
    decrypt."""
    (old,) = await EncryptionCodec(PayloadKeyring((K1,))).encode([REQUEST])
    rotated = EncryptionCodec(PayloadKeyring((K2, K1)))
    (new,) = await rotated.encode([REQUEST])
    assert new.metadata[KEY_ID_HEADER] == b"k2"
    assert await rotated.decode([old, new]) == [REQUEST, REQUEST]


async def test_plaintext_payloads_decode_as_they_are() -> None:
    """Histories recorded before encryption replay: a payload that is not binary/encrypted is
    passed through by decode."""
    codec = EncryptionCodec(PayloadKeyring((K1,)))
    assert await codec.decode([REQUEST]) == [REQUEST]


async def test_a_status_summary_stays_plaintext_and_nothing_else_does() -> None:
    """The memo's per-backend summary (status words only) is not encrypted; a mapping with any
    other value, or a non-mapping, is."""
    codec = EncryptionCodec(PayloadKeyring((K1,)))
    summary = plain({"consul": "succeeded", "postgres": "failed"})
    assert is_status_summary(summary)
    assert await codec.encode([summary]) == [summary]
    for value in ({"consul": "10.0.0.7"}, {"Address": "succeeded"}, ["succeeded"], "succeeded"):
        (sealed,) = await codec.encode([plain(value)])
        assert sealed.metadata["encoding"] == b"binary/encrypted", f"{value!r} must be encrypted"


async def test_a_wrong_key_fails_naming_the_key_id_never_the_key() -> None:
    """A payload sealed with k1 and opened with another key configured as k1 fails to
    authenticate; the message names k1 and neither key."""
    (sealed,) = await EncryptionCodec(PayloadKeyring((K1,))).encode([REQUEST])
    impostor = PayloadKey.generate("k1")
    with pytest.raises(PayloadDecryptionError) as error:
        await EncryptionCodec(PayloadKeyring((impostor,))).decode([sealed])
    assert_names_key_id_not_key(error.value, "k1", K1, impostor)
    assert "not the one it was encrypted with" in str(error.value)


async def test_a_key_id_that_is_not_configured_fails_naming_it() -> None:
    """Replay or decode without the key: MissingPayloadKeyError naming the missing id and the
    configured ones, a configuration error (exit 2)."""
    (sealed,) = await EncryptionCodec(PayloadKeyring((K1,))).encode([REQUEST])
    with pytest.raises(MissingPayloadKeyError) as error:
        await EncryptionCodec(PayloadKeyring((K2,))).decode([sealed])
    assert_names_key_id_not_key(error.value, "k1", K1, K2)
    assert "configured: k2" in str(error.value)


async def test_a_payload_without_a_key_id_fails_clearly() -> None:
    """An encrypted payload whose key id header was removed cannot be decrypted, and says so."""
    (sealed,) = await EncryptionCodec(PayloadKeyring((K1,))).encode([REQUEST])
    del sealed.metadata[KEY_ID_HEADER]
    with pytest.raises(PayloadDecryptionError, match=KEY_ID_HEADER):
        await EncryptionCodec(PayloadKeyring((K1,))).decode([sealed])


@pytest.mark.parametrize("cut", ["truncated", "short", "flipped", "relabelled"])
async def test_a_truncated_or_tampered_payload_fails_naming_the_key_id(cut: str) -> None:
    """Cut data, data shorter than nonce and tag, a flipped bit, or a key id header changed to
    another configured key: each fails, naming the key id, never a key."""
    codec = EncryptionCodec(PayloadKeyring((K1, K2)))
    (sealed,) = await codec.encode([REQUEST])
    sealed.metadata[KEY_ID_HEADER] = b"k1"  # sealed with K1 (the newest)
    key_id = "k1"
    if cut == "truncated":
        sealed.data = sealed.data[:-5]
    elif cut == "short":
        sealed.data = sealed.data[:10]
    elif cut == "flipped":
        sealed.data = sealed.data[:20] + bytes([sealed.data[20] ^ 1]) + sealed.data[21:]
    else:
        sealed.metadata[KEY_ID_HEADER] = key_id_bytes = b"k2"
        key_id = key_id_bytes.decode()
    with pytest.raises(PayloadDecryptionError) as error:
        await codec.decode([sealed])
    assert_names_key_id_not_key(error.value, key_id, K1, K2)


async def test_an_unknown_codec_header_fails_naming_the_key_id() -> None:
    """A payload from another (or newer) codec version is refused, naming the header and the
    key id."""
    (sealed,) = await EncryptionCodec(PayloadKeyring((K1,))).encode([REQUEST])
    sealed.metadata[CIPHER_HEADER] = b"ChaCha20/v9"
    with pytest.raises(PayloadDecryptionError) as error:
        await EncryptionCodec(PayloadKeyring((K1,))).decode([sealed])
    assert_names_key_id_not_key(error.value, "k1", K1)
    assert CIPHER_HEADER in str(error.value)
    assert "ChaCha20/v9" in str(error.value)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "entry 1"),
        ("k1", "entry 1"),
        ("k1:" + "A" * 43 + "=,nocolon", "entry 2"),
        ("k1:not base64!", "not valid base64"),
        ("k1:" + base64.b64encode(b"short").decode(), "AES-256 needs 32"),
        (f"k1:{secret_text(K1)},k1:{secret_text(K2)}", "appears twice"),
        (f"bad id:{secret_text(K1)}", "entry 1"),
    ],
)
def test_a_malformed_keyring_is_refused_without_quoting_it(text: str, expected: str) -> None:
    """Each malformed keyring names the entry or key id at fault and quotes no value."""
    with pytest.raises(PayloadKeyError) as error:
        PayloadKeyring.parse(text)
    assert expected in str(error.value)
    for value in (secret_text(K1), secret_text(K2), "not base64!"):
        assert value not in str(error.value)


async def test_the_keyring_comes_from_the_secret_store_and_is_registered_secret(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """temporal.payload_key resolves through the secret store (env fallback here); its value
    and each key are scrubbed from any message afterwards."""
    monkeypatch.setenv("ONEX_SECRET_TEMPORAL_PAYLOAD_KEY", f"{K2.encoded()}, {K1.encoded()}")
    settings = OnexSettings(codec=CodecSettings(enabled=True))
    resolver = SecretResolver(SecretsSettings())
    keyring = await load_keyring(settings, secrets=resolver)
    assert keyring.key_ids == ["k2", "k1"]
    assert secret_text(K1) not in sanitize_text(f"oops {secret_text(K1)}")
    converter = await build_data_converter(settings, secrets=resolver)
    assert isinstance(converter.payload_codec, EncryptionCodec)
    off = await build_data_converter(OnexSettings(), secrets=resolver)
    assert off is DATA_CONVERTER, "encryption is off unless ONEX_CODEC__ENABLED"


async def test_failure_messages_are_encrypted_and_read_back() -> None:
    """With the codec, a failure's (sanitized) message travels in its encoded attributes: the
    stored message is a placeholder and the SDK reads the real one back."""
    from temporalio.api.failure.v1 import Failure

    converter = encrypted_converter(PayloadKeyring((K1,)))
    failure = Failure()
    await converter.encode_failure(RuntimeError("service billing-ledger refused"), failure)
    assert "billing-ledger" not in failure.message
    assert b"billing-ledger" not in failure.SerializeToString()
    decoded = await converter.decode_failure(failure)
    assert "billing-ledger" in str(decoded)


# -- the codec server ---------------------------------------------------------------------------


@pytest.fixture
async def server() -> AsyncIterator[TestClient[aiohttp.web.Request, aiohttp.web.Application]]:
    app = codec_app(
        EncryptionCodec(PayloadKeyring((K1,))),
        token=SecretStr(TOKEN),
        origin=ORIGIN,
        max_body_bytes=4096,
    )
    async with TestClient(TestServer(app, port=free_port())) as client:
        yield client


def body(*payloads: Payload) -> str:
    from google.protobuf import json_format
    from temporalio.api.common.v1 import Payloads

    return json_format.MessageToJson(Payloads(payloads=list(payloads)))


async def test_the_server_encodes_and_decodes_with_a_bearer_or_a_path_token(
    server: TestClient[aiohttp.web.Request, aiohttp.web.Application],
) -> None:
    """/encode then /decode gives the payload back, with the token as a bearer header or as
    the path segment before the action; CORS admits the UI origin."""
    headers = {"Authorization": f"Bearer {TOKEN}", "Origin": ORIGIN}
    encoded = await server.post("/encode", data=body(REQUEST), headers=headers)
    assert encoded.status == 200, await encoded.text()
    assert encoded.headers["Access-Control-Allow-Origin"] == ORIGIN
    sealed = await encoded.text()
    assert "10.0.0.7" not in sealed
    decoded = await server.post(f"/{TOKEN}/decode", data=sealed, headers={"Origin": ORIGIN})
    assert decoded.status == 200, await decoded.text()
    assert json.loads(await decoded.text()) == json.loads(body(REQUEST))


async def test_the_server_refuses_a_missing_or_bad_token_with_401(
    server: TestClient[aiohttp.web.Request, aiohttp.web.Application],
) -> None:
    """No token, a wrong bearer token, a wrong path token: 401, and the refusal never echoes a
    token."""
    attempts = [
        ("/decode", {}),
        ("/decode", {"Authorization": "Bearer wrong-token-wrong-token"}),
        ("/wrong-token-wrong-token/decode", {}),
        ("/decode", {"Authorization": TOKEN}),  # not the Bearer scheme
    ]
    for path, headers in attempts:
        response = await server.post(path, data=body(REQUEST), headers=headers)
        assert response.status == 401, f"{path} {headers}: {response.status}"
        assert TOKEN not in await response.text()


async def test_the_server_refuses_an_oversized_body_with_413(
    server: TestClient[aiohttp.web.Request, aiohttp.web.Application],
) -> None:
    """A body over max_body_bytes is refused with 413, with or without a Content-Length."""
    big = body(plain("x" * 8000))
    headers = {"Authorization": f"Bearer {TOKEN}"}
    response = await server.post("/decode", data=big, headers=headers)
    assert response.status == 413

    async def chunks() -> AsyncIterator[bytes]:
        yield big.encode()

    chunked = await server.post("/decode", data=chunks(), headers=headers)
    assert chunked.status == 413


async def test_the_server_answers_preflights_for_the_ui_origin_only(
    server: TestClient[aiohttp.web.Request, aiohttp.web.Application],
) -> None:
    """A browser's preflight (no token) is answered; only the UI's origin is allowed."""
    preflight = {
        "Origin": ORIGIN,
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type,x-namespace",
    }
    response = await server.options("/decode", headers=preflight)
    assert response.status == 204
    assert response.headers["Access-Control-Allow-Origin"] == ORIGIN
    assert "X-Namespace" in response.headers["Access-Control-Allow-Headers"]
    other = await server.options("/decode", headers={**preflight, "Origin": "http://evil.test"})
    assert "Access-Control-Allow-Origin" not in other.headers


async def test_the_server_reports_bad_payloads_naming_the_key_id(
    server: TestClient[aiohttp.web.Request, aiohttp.web.Application],
) -> None:
    """A payload sealed with an unknown key: 400 naming its key id; a body that is not
    Payloads JSON: 400."""
    (foreign,) = await EncryptionCodec(PayloadKeyring((K2,))).encode([REQUEST])
    headers = {"Authorization": f"Bearer {TOKEN}"}
    response = await server.post("/decode", data=body(foreign), headers=headers)
    assert response.status == 400
    assert "k2" in await response.text()
    garbage = await server.post("/decode", data="{not json", headers=headers)
    assert garbage.status == 400


def test_a_short_token_is_refused() -> None:
    """A codec token under 16 characters is a configuration error."""
    with pytest.raises(ConfigurationError, match="shorter than 16"):
        codec_app(
            EncryptionCodec(PayloadKeyring((K1,))),
            token=SecretStr("short"),
            origin=ORIGIN,
            max_body_bytes=4096,
        )
