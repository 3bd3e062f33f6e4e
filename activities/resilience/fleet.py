"""Circuit breakers the whole fleet shares, through Valkey (graceful degradation without it).

Every worker keeps its own breakers (:mod:`.breaker`); this coordinator makes them agree::

    failure while closed   INCR <p>breaker:<name>:failures (TTL one open window); the worker
                           whose failure reaches the threshold sets <p>breaker:<name> (TTL the
                           open window) and PUBLISHes the open on <p>breakers, in one script
    open heard             every worker opens its breaker for the time left (within a second:
                           pub/sub, and a SCAN of the open keys on every (re)connect)
    half-open              SET <p>breaker:<name>:probe NX PX <probe bound>: one probe for the
                           fleet; the others are rejected until it ends (retry_after = its TTL)
    probe failed           the prober re-opens the key and publishes, then frees the lock
    closed again           the prober deletes the keys and publishes the close
    operator               ``onex breakers open|close`` writes the same key (marked forced,
                           with the reason) and publishes; a forced open is never shortened
                           by a worker

Each worker also writes what its breakers look like to <p>breakers:worker:<id> every couple of
seconds (TTL a few seconds), which is the fleet view of ``onex breakers list``.

A closed breaker's successes never reach this module. Failures and probe ends are queued and
written by one task, in order (an open is announced before a probe's lock is freed), so a
caller never waits on Valkey, except a half-open breaker asking for the probe lock.

When Valkey is down (or slow past its timeout), the breakers fall back to per-process state:
this is logged once (``breaker_fleet_degraded``, and ``breaker_fleet_restored`` when it is
back) and shown by the gauge ``onex_circuit_breaker_fleet_degraded`` (1 while degraded). The
subscriber tries again every second; nothing is queued while degraded.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Final

import structlog
from temporalio.common import MetricMeter
from valkey.asyncio import Valkey
from valkey.exceptions import ValkeyError

from activities.resilience.breaker import (
    BreakerRegistry,
    BreakerState,
    CircuitBreaker,
    CircuitOpenError,
    Origin,
    StateChange,
)
from activities.resilience.sanitize import sanitize_exception
from contracts.errors import ConfigurationError

__all__ = [
    "CHANNEL",
    "REPORT_TTL_SECONDS",
    "BreakerNotFound",
    "FleetBreakers",
    "FleetView",
    "OpenRecord",
    "fleet_keys",
    "read_fleet",
]

logger = structlog.get_logger("onex.breaker.fleet")

CHANNEL: Final = "breakers"
"""The pub/sub channel (after the key prefix) on which opens and closes are announced."""
REPORT_INTERVAL_SECONDS: Final = 2.0
REPORT_TTL_SECONDS: Final = 10
RECONNECT_SECONDS: Final = 1.0
MAX_QUEUED: Final = 10_000
"""Writes queued beyond this are dropped (and logged once): Valkey is too slow to matter."""

# A failure counted fleet-wide; the worker whose failure reaches the threshold opens the key
# (unless it is already open) and announces it. Returns -1 when this call opened it, else the
# count.
_COUNT_FAILURE = """
local n = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
if n >= tonumber(ARGV[1]) then
  if redis.call('SET', KEYS[2], ARGV[3], 'NX', 'PX', ARGV[2]) then
    redis.call('DEL', KEYS[1])
    redis.call('PUBLISH', ARGV[4], ARGV[5])
    return -1
  end
end
return n
"""

# Open (or re-open) a breaker for the fleet, unless an operator's forced open is in force.
# Returns 1 when written, 0 when a forced open was kept.
_OPEN = """
local current = redis.call('GET', KEYS[1])
if current and ARGV[4] ~= '1' then
  local ok, record = pcall(cjson.decode, current)
  if ok and record['forced'] then return 0 end
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
redis.call('PUBLISH', ARGV[3], ARGV[5])
return 1
"""

# May this worker probe? {1, pttl, record} while the fleet's open has time left; {0} when the
# lock is ours; {2, pttl} while another worker's probe holds it.
_ADMIT_PROBE = """
local open = redis.call('PTTL', KEYS[1])
if open > 0 then return {1, open, redis.call('GET', KEYS[1])} end
if redis.call('SET', KEYS[2], ARGV[1], 'NX', 'PX', ARGV[2]) then return {0} end
return {2, redis.call('PTTL', KEYS[2])}
"""

# Close a breaker for the fleet (its keys deleted, the close announced), unless a worker's own
# close meets an operator's forced open (ARGV[3] '0'). Returns 1 when closed.
_CLOSE = """
local current = redis.call('GET', KEYS[1])
if current and ARGV[3] ~= '1' then
  local ok, record = pcall(cjson.decode, current)
  if ok and record['forced'] then return 0 end
end
redis.call('DEL', KEYS[1], KEYS[2], KEYS[3])
redis.call('PUBLISH', ARGV[1], ARGV[2])
return 1
"""

_RELEASE_PROBE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


@dataclass(frozen=True)
class _Keys:
    open: str
    failures: str
    probe: str


def fleet_keys(prefix: str, name: str) -> _Keys:
    base = f"{prefix}breaker:{name}"
    return _Keys(open=base, failures=f"{base}:failures", probe=f"{base}:probe")


@dataclass(frozen=True, kw_only=True)
class OpenRecord:
    """What the open key holds and the channel announces."""

    name: str
    action: str  # "open" or "close"
    seconds: float = 0.0
    reason: str | None = None
    origin: Origin = Origin.FLEET
    forced: bool = False
    worker: str = ""
    sent_at: float = 0.0  # wall clock, for the propagation figures of the benchmark

    def dumps(self) -> str:
        return json.dumps(
            {
                "name": self.name,
                "action": self.action,
                "seconds": self.seconds,
                "reason": self.reason,
                "origin": self.origin.value,
                "forced": self.forced,
                "worker": self.worker,
                "sent_at": self.sent_at,
            }
        )

    @classmethod
    def loads(cls, text: str) -> OpenRecord:
        data = json.loads(text)
        return cls(
            name=str(data["name"]),
            action=str(data["action"]),
            seconds=float(data.get("seconds", 0.0)),
            reason=data.get("reason"),
            origin=Origin(data.get("origin", Origin.FLEET.value)),
            forced=bool(data.get("forced", False)),
            worker=str(data.get("worker", "")),
            sent_at=float(data.get("sent_at", 0.0)),
        )


class FleetBreakers:
    """The Valkey coordinator of one worker's :class:`BreakerRegistry` (see the module doc).

    Attach it with :meth:`attach`, then run :meth:`run` as a background service (the worker
    host supervises it). ``heard`` is called with every announcement applied (the benchmark
    measures propagation with it).
    """

    def __init__(
        self,
        client: Valkey,
        registry: BreakerRegistry,
        *,
        worker_id: str,
        prefix: str = "onex:",
        meter: MetricMeter | None = None,
        heard: Callable[[OpenRecord], None] | None = None,
    ) -> None:
        self.client = client
        self.registry = registry
        self.worker_id = worker_id
        self.prefix = prefix
        self.channel = f"{prefix}{CHANNEL}"
        self._heard = heard
        self._degraded = False
        self._degraded_gauge = (
            None
            if meter is None
            else meter.create_gauge(
                "onex_circuit_breaker_fleet_degraded",
                "1 while breakers fall back to per-process state (Valkey unreachable)",
            )
        )
        self._queue: asyncio.Queue[Callable[[], Awaitable[object]]] = asyncio.Queue()
        self._dropping = False
        self._count_failure = client.register_script(_COUNT_FAILURE)
        self._open = client.register_script(_OPEN)
        self._admit_probe = client.register_script(_ADMIT_PROBE)
        self._close = client.register_script(_CLOSE)
        self._release_probe = client.register_script(_RELEASE_PROBE)
        self._connected = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    # -- wiring ------------------------------------------------------------------------------

    def attach(self) -> None:
        """Share the registry's breakers: hear their transitions and their failures."""
        self.registry.add_listener(self._on_change)
        self.registry.attach(self)

    @property
    def degraded(self) -> bool:
        """True while the breakers run on per-process state only."""
        return self._degraded

    @property
    def connected(self) -> asyncio.Event:
        """Set while subscribed (tests and the benchmark start from a shared state)."""
        return self._connected

    # -- the breaker's hooks (synchronous: they only queue) ----------------------------------

    def failed(self, breaker: CircuitBreaker) -> None:
        settings = breaker.settings
        keys = fleet_keys(self.prefix, breaker.name)
        record = self._record(breaker.name, "open", settings.open_seconds)

        async def count() -> None:
            opened = await self._count_failure(
                keys=[keys.failures, keys.open],
                args=[
                    settings.failure_threshold,
                    _ms(settings.open_seconds),
                    record.dumps(),
                    self.channel,
                    record.dumps(),
                ],
            )
            if opened == -1:  # this failure opened the fleet's breaker: no need to wait to hear
                self.registry.apply_open(
                    breaker.name, settings.open_seconds, reason=None, origin=Origin.FLEET
                )

        self._enqueue(count)

    def recovered(self, breaker: CircuitBreaker) -> None:
        failures = fleet_keys(self.prefix, breaker.name).failures
        self._enqueue(lambda: self.client.delete(failures))

    async def admit_probe(self, breaker: CircuitBreaker, probe_seconds: float) -> None:
        if self._degraded:
            return  # per-process state: the local breaker's probe goes ahead
        keys = fleet_keys(self.prefix, breaker.name)
        try:
            answer = await self._admit_probe(
                keys=[keys.open, keys.probe], args=[self.worker_id, _ms(probe_seconds)]
            )
        except (ValkeyError, OSError) as exc:
            self._degrade(exc)
            return
        verdict = int(answer[0])
        if verdict == 0:
            return
        left = max(int(answer[1]), 1) / 1000
        if verdict == 1:  # the fleet's open window is longer than this worker knew
            reason = _reason_of(answer[2] if len(answer) > 2 else None)
            breaker.open_for(left, reason=reason, origin=Origin.FLEET)
        raise CircuitOpenError(breaker.name, left)

    def probe_ended(self, breaker: CircuitBreaker) -> None:
        probe = fleet_keys(self.prefix, breaker.name).probe
        self._enqueue(lambda: self._release_probe(keys=[probe], args=[self.worker_id]))

    def _on_change(self, change: StateChange) -> None:
        """Announce this worker's own opens and closes (the fleet's are already known)."""
        if change.origin is not Origin.LOCAL:
            return
        name = change.service_name
        if change.new_state is BreakerState.OPEN:
            self._enqueue(lambda: self.publish_open(name, change.reset_timeout_seconds))
        elif change.new_state is BreakerState.CLOSED:
            self._enqueue(lambda: self.publish_close(name))

    # -- announcements -----------------------------------------------------------------------

    async def publish_open(
        self,
        name: str,
        seconds: float,
        *,
        reason: str | None = None,
        origin: Origin = Origin.FLEET,
        forced: bool = False,
    ) -> bool:
        """Open ``name`` for the fleet; False if an operator's forced open was kept instead."""
        record = self._record(name, "open", seconds, reason=reason, origin=origin, forced=forced)
        keys = fleet_keys(self.prefix, name)
        written = await self._open(
            keys=[keys.open],
            args=[
                record.dumps(),
                _ms(seconds),
                self.channel,
                "1" if forced else "0",
                record.dumps(),
            ],
        )
        return bool(written)

    async def publish_close(
        self, name: str, *, reason: str | None = None, origin: Origin = Origin.FLEET
    ) -> bool:
        """Close ``name`` for the fleet; a worker's close (not an operator's) keeps a forced
        open and returns False."""
        keys = fleet_keys(self.prefix, name)
        record = self._record(name, "close", 0.0, reason=reason, origin=origin)
        operator = "1" if origin is Origin.OPERATOR else "0"
        closed = await self._close(
            keys=[keys.open, keys.failures, keys.probe],
            args=[self.channel, record.dumps(), operator],
        )
        return bool(closed)

    def _record(
        self,
        name: str,
        action: str,
        seconds: float,
        *,
        reason: str | None = None,
        origin: Origin = Origin.FLEET,
        forced: bool = False,
    ) -> OpenRecord:
        return OpenRecord(
            name=name,
            action=action,
            seconds=seconds,
            reason=reason,
            origin=origin,
            forced=forced,
            worker=self.worker_id,
            sent_at=time.time(),
        )

    # -- the background service --------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Subscribe, resynchronize, apply announcements, report, write the queue; until
        ``stop``. Valkey going away degrades to per-process state and is retried every second.
        """
        self._loop = asyncio.get_running_loop()
        writer = asyncio.create_task(self._write_queue(stop))
        try:
            while not stop.is_set():
                try:
                    await self._serve(stop)
                except (ValkeyError, OSError) as exc:
                    self._degrade(exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), RECONNECT_SECONDS)
        finally:
            writer.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await writer

    async def _serve(self, stop: asyncio.Event) -> None:
        pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self.channel)
            await self._resynchronize()
            self._restore()
            self._connected.set()
            next_report = 0.0
            while not stop.is_set():
                now = time.monotonic()
                if now >= next_report:
                    await self._report()
                    next_report = now + REPORT_INTERVAL_SECONDS
                    if self._degraded:  # a write failed, yet Valkey answers again
                        await self._resynchronize()
                        self._restore()
                message = await pubsub.get_message(timeout=0.5)
                if message is not None and message.get("type") == "message":
                    self._apply_text(message["data"])
        finally:
            self._connected.clear()
            with contextlib.suppress(Exception):
                await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def _resynchronize(self) -> None:
        """Apply every open the fleet has now (this worker may have missed announcements)."""
        async for record, seconds_left in _open_records(self.client, self.prefix):
            self.registry.apply_open(
                record.name, seconds_left, reason=record.reason, origin=record.origin
            )

    def _apply_text(self, text: object) -> None:
        try:
            record = OpenRecord.loads(str(text))
        except (ValueError, KeyError, TypeError):
            logger.warning("breaker_fleet_message_ignored")
            return
        origin = record.origin if record.origin is not Origin.LOCAL else Origin.FLEET
        if record.action == "open":
            self.registry.apply_open(
                record.name, record.seconds, reason=record.reason, origin=origin
            )
        elif record.action == "close":
            self.registry.apply_close(record.name, reason=record.reason, origin=origin)
        if self._heard is not None:
            self._heard(record)

    async def _report(self) -> None:
        snapshots = [
            {
                "name": snapshot.name,
                "state": snapshot.state.value,
                "open_remaining_seconds": round(snapshot.open_remaining_seconds, 3),
                "consecutive_failures": snapshot.consecutive_failures,
                "reason": snapshot.reason,
            }
            for snapshot in self.registry.snapshot()
        ]
        report = {"worker": self.worker_id, "at": time.time(), "breakers": snapshots}
        await self.client.set(
            f"{self.prefix}breakers:worker:{self.worker_id}",
            json.dumps(report),
            ex=REPORT_TTL_SECONDS,
        )

    async def _write_queue(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            write = await self._queue.get()
            if self._degraded:
                continue
            try:
                await write()
            except (ValkeyError, OSError) as exc:
                self._degrade(exc)

    def _enqueue(self, write: Callable[[], Awaitable[object]]) -> None:
        if self._degraded:
            return
        if self._queue.qsize() >= MAX_QUEUED:
            if not self._dropping:
                self._dropping = True
                logger.warning("breaker_fleet_queue_full", queued=MAX_QUEUED)
            return
        self._dropping = False
        try:
            asyncio.get_running_loop()
        except RuntimeError:  # a breaker used from a thread: hand the write to the loop
            if self._loop is not None:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, write)
            return
        self._queue.put_nowait(write)

    # -- degradation ---------------------------------------------------------------------------

    def _degrade(self, exc: BaseException) -> None:
        if self._degraded:
            return
        self._degraded = True
        # What was queued is stale by the time Valkey is back: the resync starts afresh.
        while not self._queue.empty():
            self._queue.get_nowait()
        logger.warning(
            "breaker_fleet_degraded",
            error=sanitize_exception(exc),
            detail="Valkey is unreachable: circuit breakers fall back to per-process state",
        )
        if self._degraded_gauge is not None:
            self._degraded_gauge.set(1)

    def _restore(self) -> None:
        if not self._degraded:
            return
        self._degraded = False
        logger.info("breaker_fleet_restored", detail="circuit breakers share state again")
        if self._degraded_gauge is not None:
            self._degraded_gauge.set(0)


async def _open_records(client: Valkey, prefix: str) -> AsyncIterator[tuple[OpenRecord, float]]:
    """Each open key of the fleet with its seconds left (unreadable ones are skipped)."""
    async for key in client.scan_iter(match=f"{prefix}breaker:*", count=500):
        if key.endswith((":failures", ":probe")):
            continue
        async with client.pipeline(transaction=False) as pipe:
            pipe.get(key)
            pipe.pttl(key)
            text, pttl = await pipe.execute()
        if text is None or pttl is None or pttl <= 0:
            continue  # expired between the scan and the read
        try:
            record = OpenRecord.loads(text)
        except (ValueError, KeyError, TypeError):
            continue
        yield record, pttl / 1000


def _ms(seconds: float) -> int:
    return max(int(seconds * 1000), 1)


def _reason_of(text: Any) -> str | None:
    if not isinstance(text, str):
        return None
    try:
        reason = json.loads(text).get("reason")
    except (ValueError, AttributeError):
        return None
    return reason if isinstance(reason, str) else None


# -- the operator's view --------------------------------------------------------------------


class BreakerNotFound(ConfigurationError):
    """No worker reported a breaker of that name, and the fleet has no state for it."""


@dataclass(frozen=True, kw_only=True)
class FleetView:
    """What ``onex breakers list`` shows: each worker's breakers, and the fleet's opens."""

    workers: list[dict[str, Any]]
    """One report per live worker: ``worker``, ``at`` and its ``breakers`` (name, state,
    open_remaining_seconds, consecutive_failures, reason)."""
    opens: list[dict[str, Any]]
    """The fleet's open keys: ``name``, ``seconds_left``, ``reason``, ``forced``, ``worker``."""

    @property
    def names(self) -> list[str]:
        """Every breaker the fleet knows of, sorted."""
        found = {entry["name"] for entry in self.opens}
        for report in self.workers:
            found.update(breaker["name"] for breaker in report.get("breakers", []))
        return sorted(found)

    def require(self, name: str) -> None:
        """Raise :class:`BreakerNotFound`, naming the known breakers, if ``name`` is unknown."""
        if name in self.names:
            return
        if self.names:
            known = "known breakers: " + ", ".join(self.names)
        else:
            known = (
                "no worker has reported a breaker yet (workers report within "
                f"{REPORT_INTERVAL_SECONDS:g}s of starting with ONEX_VALKEY__ADDRESS set)"
            )
        raise BreakerNotFound(f"no breaker named {name!r}; {known}")


async def read_fleet(client: Valkey, prefix: str) -> FleetView:
    """The live workers' reports and the fleet's open keys, as they are in Valkey now."""
    workers: list[dict[str, Any]] = []
    async for key in client.scan_iter(match=f"{prefix}breakers:worker:*", count=500):
        text = await client.get(key)
        if text is None:
            continue  # expired between the scan and the read: that worker is gone
        with contextlib.suppress(ValueError):
            workers.append(json.loads(text))
    opens = [
        {
            "name": record.name,
            "seconds_left": round(seconds_left, 3),
            "reason": record.reason,
            "forced": record.forced,
            "worker": record.worker,
        }
        async for record, seconds_left in _open_records(client, prefix)
    ]
    workers.sort(key=lambda report: str(report.get("worker", "")))
    opens.sort(key=lambda entry: str(entry["name"]))
    return FleetView(workers=workers, opens=opens)
