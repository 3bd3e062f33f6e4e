"""Helpers shared by the tests: free ports and waiting on a condition with a deadline."""

from __future__ import annotations

import asyncio
import base64
import json
import socket
import time
from collections.abc import Awaitable, Callable


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind((host, 0))
        port: int = probe.getsockname()[1]
        return port


async def wait_until(
    condition: Callable[[], Awaitable[bool]],
    *,
    within: float,
    what: str,
    interval: float = 0.05,
) -> None:
    """Poll ``condition`` until it is true; fail naming ``what`` after ``within`` seconds."""
    deadline = time.monotonic() + within
    while not await condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {within}s waiting for {what}")
        await asyncio.sleep(interval)


def readable_history(value: object) -> str:
    """A history's JSON with every payload's base64 ``data`` decoded next to it, so that a
    search for a secret also looks inside inputs, results and failure details."""
    decoded: list[str] = []

    def walk(node: object) -> None:
        if isinstance(node, dict):
            for key, child in node.items():
                if key == "data" and isinstance(child, str):
                    decoded.append(base64.b64decode(child).decode(errors="replace"))
                walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk(value)
    return json.dumps(value) + "\n" + "\n".join(decoded)
