"""A handler whose operation takes a while: for drain-on-SIGTERM tests."""

from __future__ import annotations

import asyncio
from pathlib import Path

from pydantic import BaseModel

from activities.base import HandlerBase
from contracts.errors import Transport


class SlowRequest(BaseModel):
    text: str
    seconds: float
    started_marker: str  # a file the operation creates once it is running


class SlowResult(BaseModel):
    text: str


class SlowHandler(HandlerBase):
    transport = Transport.HTTP

    async def wait_then_echo(self, request: SlowRequest) -> SlowResult:
        Path(request.started_marker).write_text("started")
        await asyncio.sleep(request.seconds)  # the work itself: an in-flight activity
        return SlowResult(text=request.text.upper())


class DisabledHandler(HandlerBase):
    """Reports itself disabled, like Consul without an address."""

    transport = Transport.CONSUL

    @property
    def enabled(self) -> bool:
        return False

    @property
    def disabled_reason(self) -> str:
        return "no Consul address is configured (ONEX_CONSUL__ADDRESS)"

    async def register_service(self, request: SlowRequest) -> SlowResult:
        raise AssertionError("a disabled handler's operation must never run")
