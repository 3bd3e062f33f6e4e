"""A minimal handler plugin: one operation, no I/O."""

from __future__ import annotations

from pydantic import BaseModel

from activities.base import HandlerBase
from contracts.errors import Transport


class EchoRequest(BaseModel):
    text: str


class EchoResult(BaseModel):
    text: str


class EchoHandler(HandlerBase):
    transport = Transport.HTTP

    async def echo(self, request: EchoRequest) -> EchoResult:
        return EchoResult(text=request.text.upper())


class NotAHandler:
    """Has an echo method but none of the lifecycle."""

    async def echo(self, request: EchoRequest) -> EchoResult:
        return EchoResult(text=request.text)


class SyncLifecycle(EchoHandler):
    def initialize(self, config: object) -> None:  # type: ignore[override]
        """Not a coroutine: refused."""


NOT_A_CLASS = "echo"


class _RaisingMeta(type):
    def __getattr__(cls, name: str) -> object:
        raise RuntimeError(f"no {name} for you")


class HostileClass(metaclass=_RaisingMeta):
    """Any missing attribute raises RuntimeError rather than AttributeError."""
