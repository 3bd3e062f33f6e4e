"""``onex codec-server``: the remote codec the Temporal UI decodes payloads through."""

from __future__ import annotations

import asyncio

from workers.cli.common import console, run_async, settings_or_exit
from workers.settings import OnexSettings


def codec_server() -> None:
    """Serve the Temporal UI's /encode and /decode endpoints until SIGTERM or SIGINT.

    Listens on ONEX_CODEC__HOST:ONEX_CODEC__PORT (127.0.0.1:8089 by default) and admits the
    UI's origin (ONEX_CODEC__UI_ORIGIN, by default the embedded UI) by CORS. The keys are the
    secret temporal.payload_key (key_id:base64-key entries, newest first); every request must
    carry the secret temporal.codec_token, as "Authorization: Bearer <token>" or as the path
    segment before the action (http://host:8089/<token>/decode). See docs/security.md.

    Example: ONEX_SECRET_TEMPORAL_PAYLOAD_KEY="k1:$(openssl rand -base64 32)"
    ONEX_SECRET_TEMPORAL_CODEC_TOKEN=$(openssl rand -hex 24) onex codec-server
    """
    settings = settings_or_exit(library_logs="live")
    run_async(lambda: _serve(settings), failing="cannot start the codec server")


async def _serve(settings: OnexSettings) -> None:
    from workers.codec_server import serve
    from workers.host import install_signal_handlers

    stop = asyncio.Event()
    install_signal_handlers(stop)
    console.print(
        f"codec server on http://{settings.codec.host}:{settings.codec.port} (POST .../decode, "
        ".../encode); Ctrl-C stops it",
        markup=False,
        highlight=False,
    )
    await serve(settings, stop)
