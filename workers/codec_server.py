"""``onex codec-server``: the Temporal UI's (and CLI's) remote codec, over aiohttp.

The protocol is Temporal's: ``POST .../encode`` and ``POST .../decode`` take and return a
``Payloads`` message as protobuf JSON (``{"payloads": [{"metadata": {...}, "data": "..."}]}``);
only the last path segment says which. Every request must carry the token (the secret
``temporal.codec_token``), either as ``Authorization: Bearer <token>`` (the ``temporal`` CLI's
``--codec-auth``, scripts) or as the path segment before the action, ``/<token>/decode``, for a
UI that cannot send a header (the embedded one: ``onex dev up --codec`` wires it so). Without it,
or with another: 401. A body larger than ``codec.max_body_bytes``: 413. CORS admits the UI's
origin only; preflights (which browsers send without credentials) need no token.

Nothing here logs a token or a payload, and aiohttp's access log is off: it would print the
path, which may hold the token.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import Awaitable, Callable
from typing import Final

import structlog
from aiohttp import web
from google.protobuf import json_format
from pydantic import SecretStr
from temporalio.api.common.v1 import Payloads
from temporalio.converter import PayloadCodec

from activities.base import SecretSource
from activities.resilience.sanitize import register_secret
from contracts.errors import ConfigurationError
from workers.codec import EncryptionCodec, PayloadCodecError, load_keyring, resolve_secret
from workers.settings import OnexSettings

CODEC_TOKEN_SECRET: Final = "temporal.codec_token"  # noqa: S105 - a name, not a value
"""The logical secret every request to the codec server must present."""

MIN_TOKEN_LENGTH: Final = 16
ACTIONS: Final = ("encode", "decode")
_ALLOWED_HEADERS: Final = "Authorization, Content-Type, X-Namespace"

logger = structlog.get_logger("onex.codec_server")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def ui_origin(settings: OnexSettings) -> str:
    """The origin CORS admits: ``codec.ui_origin``, or the embedded UI's."""
    return settings.codec.ui_origin or settings.temporal.ui_url


def codec_app(
    codec: PayloadCodec, *, token: SecretStr, origin: str, max_body_bytes: int
) -> web.Application:
    """The codec server's application (tests run it on a free port)."""
    expected = token.get_secret_value()
    if len(expected) < MIN_TOKEN_LENGTH:
        raise ConfigurationError(
            f"secret {CODEC_TOKEN_SECRET} is shorter than {MIN_TOKEN_LENGTH} characters "
            "(make one with: openssl rand -hex 24)"
        )
    register_secret(token)
    secret = expected.encode()

    def cors(response: web.StreamResponse, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Origin") == origin:
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Access-Control-Allow-Credentials"] = "true"
        response.headers["Vary"] = "Origin"
        return response

    def refuse(request: web.Request, status: int, message: str) -> web.StreamResponse:
        logger.warning("codec_request_refused", status=status, reason=message)
        return cors(web.json_response({"error": message}, status=status), request)

    def authorised(request: web.Request, segments: list[str]) -> bool:
        scheme, _, presented = request.headers.get("Authorization", "").partition(" ")
        candidates = [presented.strip()] if scheme.lower() == "bearer" else []
        if len(segments) >= 2:
            candidates.append(segments[-2])
        # compare_digest on every candidate: the time taken says nothing about the token.
        return any(hmac.compare_digest(c.encode(), secret) for c in candidates if c)

    async def handle(request: web.Request) -> web.StreamResponse:
        segments = [part for part in request.path.split("/") if part]
        action = segments[-1] if segments else ""
        if request.method == "OPTIONS":
            response = web.Response(status=204)
            response.headers["Access-Control-Allow-Methods"] = "POST, OPTIONS"
            response.headers["Access-Control-Allow-Headers"] = _ALLOWED_HEADERS
            response.headers["Access-Control-Max-Age"] = "600"
            return cors(response, request)
        if not authorised(request, segments):
            return refuse(request, 401, "a valid codec token is required")
        if action not in ACTIONS:
            return refuse(request, 404, "not found: POST .../encode or .../decode")
        if request.method != "POST":
            return refuse(request, 405, "use POST")
        if (request.content_length or 0) > max_body_bytes:
            return refuse(request, 413, f"the body is larger than {max_body_bytes} bytes")
        try:
            body = await request.read()  # client_max_size stops a chunked body at the limit
        except web.HTTPRequestEntityTooLarge:
            return refuse(request, 413, f"the body is larger than {max_body_bytes} bytes")
        payloads = Payloads()
        try:
            json_format.Parse(body, payloads, ignore_unknown_fields=True)
        except (json_format.ParseError, UnicodeDecodeError):
            return refuse(request, 400, "the body is not a Payloads message in protobuf JSON")
        try:
            if action == "encode":
                result = await codec.encode(payloads.payloads)
            else:
                result = await codec.decode(payloads.payloads)
        except PayloadCodecError as error:
            return refuse(request, 400, str(error))
        logger.info("codec_request", action=action, payloads=len(result))
        text = json_format.MessageToJson(Payloads(payloads=result), indent=None)
        return cors(web.Response(text=text, content_type="application/json"), request)

    # The body limit applies before any handler reads; +1 KiB so that our own check answers.
    app = web.Application(client_max_size=max_body_bytes + 1024)
    app.router.add_route("*", "/{tail:.*}", handle)
    return app


async def build_codec_app(
    settings: OnexSettings, *, secrets: SecretSource | None = None
) -> web.Application:
    """The application for ``settings``: their keyring and token, from one secret store."""
    if secrets is None:
        from activities.vault import build_secret_resolver

        resolver, vault = await build_secret_resolver(settings)
        try:
            return await build_codec_app(settings, secrets=resolver)
        finally:
            if vault is not None:
                vault.close()
    keyring = await load_keyring(settings, secrets=secrets)
    token = await resolve_secret(settings, CODEC_TOKEN_SECRET, secrets=secrets)
    return codec_app(
        EncryptionCodec(keyring),
        token=token,
        origin=ui_origin(settings),
        max_body_bytes=settings.codec.max_body_bytes,
    )


async def serve(settings: OnexSettings, stop: asyncio.Event) -> None:
    """Serve on ``codec.host:codec.port`` until ``stop`` is set."""
    app = await build_codec_app(settings)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, settings.codec.host, settings.codec.port)
        await site.start()
        logger.info(
            "codec_server_started",
            address=f"{settings.codec.host}:{settings.codec.port}",
            ui_origin=ui_origin(settings),
        )
        await stop.wait()
    finally:
        await runner.cleanup()
        logger.info("codec_server_stopped")
