"""A headless-browser check that the embedded Temporal UI shows encrypted input decoded through
``onex codec-server`` (``make ui-check``; needs a ``chromium`` on PATH, so it is not part of
``make test``: CI machines have only what the project installs).

It starts Temporal and the codec server on free ports under a temporary directory, with a fresh
key and token, starts a workflow whose input holds a marker, checks that the stored history
does not contain the marker, then has headless Chromium (through its DevTools protocol) render
the workflow's page and looks for the marker in the rendered text. Exit 0 when the UI shows
it, 1 otherwise.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

from temporalio.client import Client

from tests.conftest import isolated_settings
from tests.support import free_port
from workers.codec import PayloadKey, PayloadKeyring
from workers.converter import encrypted_converter
from workers.devstack import DevStack, ServiceName
from workers.settings import CodecSettings

MARKER = f"ui-check-{uuid.uuid4().hex[:10]}"


async def render(url: str, *, within: float = 90.0) -> str:
    """The page's rendered text once it shows the marker (or at the deadline), read through the
    DevTools protocol of a headless Chromium: the UI is a single-page app that fetches and
    decodes after loading, so the first DOM holds nothing yet."""
    import aiohttp

    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("ui-check needs chromium (Debian: apt-get install -y chromium)")
    port = free_port()
    with tempfile.TemporaryDirectory(prefix="onex-ui-check-profile-") as profile:
        process = subprocess.Popen(
            [
                browser,
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                f"--remote-debugging-port={port}",
                f"--user-data-dir={profile}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            async with aiohttp.ClientSession() as session:
                deadline = time.monotonic() + within
                pages: list[dict[str, str]] = []
                while not pages:
                    try:
                        async with session.get(f"http://127.0.0.1:{port}/json") as answer:
                            pages = [p for p in await answer.json() if p.get("type") == "page"]
                    except aiohttp.ClientError:
                        pass
                    if time.monotonic() > deadline:
                        return ""
                    await asyncio.sleep(0.2)
                async with session.ws_connect(pages[0]["webSocketDebuggerUrl"]) as ws:
                    ids = iter(range(1, 1_000_000))

                    async def call(method: str, **params: object) -> dict[str, object]:
                        ident = next(ids)
                        await ws.send_json({"id": ident, "method": method, "params": params})
                        while True:
                            message = await ws.receive_json()
                            if message.get("id") == ident:
                                return dict(message.get("result") or {})

                    await call("Page.navigate", url=url)
                    text = ""
                    while time.monotonic() < deadline:
                        result = await call(
                            "Runtime.evaluate",
                            expression="document.body ? document.body.innerText : ''",
                            returnByValue=True,
                        )
                        value = result.get("result")
                        text = str(value.get("value", "")) if isinstance(value, dict) else ""
                        if MARKER in text:
                            break
                        await asyncio.sleep(0.5)
                    return text
        finally:
            process.terminate()
            process.wait(timeout=30)


async def main() -> int:
    key = PayloadKey.generate("ui-check")
    os.environ["ONEX_SECRET_TEMPORAL_PAYLOAD_KEY"] = key.encoded()
    os.environ["ONEX_SECRET_TEMPORAL_CODEC_TOKEN"] = secrets.token_hex(24)
    with tempfile.TemporaryDirectory(prefix="onex-ui-check-") as state:
        settings = isolated_settings(Path(state)).model_copy(
            update={"codec": CodecSettings(enabled=True, port=free_port())}
        )
        stack = DevStack(settings, services=[ServiceName.TEMPORAL], codec=True)
        try:
            await stack.up()
            client = await Client.connect(
                settings.temporal.target,
                data_converter=encrypted_converter(PayloadKeyring((key,))),
            )
            handle = await client.start_workflow(
                "UiCheckWorkflow",
                {"address": MARKER},
                id=f"ui-check-{uuid.uuid4().hex[:8]}",
                task_queue="ui-check-no-worker",
            )
            history = (await handle.fetch_history()).to_json()
            if MARKER in history:
                print("FAIL: the marker is readable in the stored history")
                return 1
            url = (
                f"{settings.temporal.ui_url}/namespaces/{settings.temporal.namespace}"
                f"/workflows/{handle.id}/{handle.result_run_id}/history"
            )
            page = await render(url)
            shown = MARKER in page
            print(
                f"{'OK' if shown else 'FAIL'}: the UI page ({len(page)} bytes) "
                f"{'shows' if shown else 'does not show'} the decoded input"
            )
            return 0 if shown else 1
        finally:
            stack.down(purge=True)


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
