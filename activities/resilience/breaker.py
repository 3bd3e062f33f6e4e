"""Circuit breakers: fail fast while a dependency is down, probe it carefully when it may be back.

::

    closed ──(N consecutive failures, or failure rate over the window)──▶ open
    open ──(open_seconds passed; next call)──▶ half_open
    half_open ──(M consecutive probe successes)──▶ closed
    half_open ──(any probe failure)──▶ open

A breaker guards one dependency inside one worker process (one per Kafka topic, one per Consul
datacenter). With a :class:`FleetCoordinator` attached (the Valkey one, :mod:`.fleet`), the
workers share what they learn: failures count fleet-wide, an open reaches every worker, the fleet
sends one half-open probe at a time, and an operator can force a breaker open for a while
(:meth:`CircuitBreaker.open_for`). The coordinator is told of failures and probes, never of a
closed breaker's successes: that path stays free of I/O. Only transport failures are recorded as
failures (the caller decides, see :mod:`.boundary`); a business outcome is a call the dependency
answered, so it counts as a success. A success slower than ``slow_call_seconds`` counts as a
failure.

The lock guards the breaker's counters, never the call: ``acquire`` and ``record_*`` take it for
a few attribute updates, and the guarded call runs without it. Listeners run after the lock is
released. Time comes from an injectable monotonic clock, so tests drive every transition
without sleeping.

A rejection says when to come back (``retry_after``): the time left in the open window, or,
while half-open with its probes in flight, the time until the last of them must have ended
(its caller's bound on the call, ``probe_seconds``). Callers that retry after that long do not
spend their attempts against a breaker that cannot admit them yet.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from enum import StrEnum
from types import TracebackType
from typing import ParamSpec, Protocol, TypeVar

import structlog
from temporalio.common import MetricMeter

from contracts.errors import InfraError, InfraUnavailableError
from contracts.resilience import BreakerSettings

Clock = Callable[[], float]
P = ParamSpec("P")
R = TypeVar("R")


class BreakerState(StrEnum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


# Enum member lookups through the class cost more than the rest of the hot path together.
_CLOSED = BreakerState.CLOSED
_OPEN = BreakerState.OPEN
_HALF_OPEN = BreakerState.HALF_OPEN


class Origin(StrEnum):
    """Who caused a transition: this process's calls, another worker, or an operator."""

    LOCAL = "local"
    FLEET = "fleet"
    OPERATOR = "operator"


class CircuitOpenError(InfraUnavailableError):
    """The breaker rejected the call; ``retry_after`` is when it will admit a probe."""

    def __init__(self, name: str, retry_after: float) -> None:
        super().__init__(
            f"circuit breaker {name} is open; retry in {retry_after:.3f}s", retry_after=retry_after
        )
        self.name = name
        self.retry_after: float = retry_after


@dataclass(frozen=True, slots=True)
class StateChange:
    """One transition; its fields are the payload of onex.infra.circuit_breaker.state_changed.v1."""

    service_name: str
    previous_state: BreakerState
    new_state: BreakerState
    failure_count: int
    reset_timeout_seconds: float
    reason: str | None = None
    """Why, when someone said: an operator's ``--reason`` (``onex breakers open``)."""
    origin: Origin = Origin.LOCAL

    def payload(self) -> dict[str, object]:
        """The event payload, JSON-ready; ``reason`` only when a transition has one."""
        payload: dict[str, object] = {
            "service_name": self.service_name,
            "previous_state": self.previous_state.value,
            "new_state": self.new_state.value,
            "failure_count": self.failure_count,
            "reset_timeout_seconds": self.reset_timeout_seconds,
        }
        if self.reason is not None:
            payload["reason"] = self.reason
        return payload


@dataclass(frozen=True, slots=True)
class BreakerSnapshot:
    """A consistent view of a breaker, for status commands and metrics."""

    name: str
    state: BreakerState
    consecutive_failures: int
    window_calls: int
    window_failures: int
    half_open_in_flight: int
    open_remaining_seconds: float
    total_successes: int
    total_failures: int
    total_rejections: int
    reason: str | None = None
    """The reason given for the current open, when it was forced (or heard from the fleet)."""


Listener = Callable[[StateChange], None]
FailurePredicate = Callable[[Exception], bool]
"""Whether an exception raised by a guarded call says the dependency is unhealthy."""


class FleetCoordinator(Protocol):
    """What a breaker tells the fleet and asks it (:class:`~.fleet.FleetBreakers`).

    The synchronous hooks only queue work (the caller never waits on I/O); ``admit_probe``
    is awaited, on the half-open path only, and raises :class:`CircuitOpenError` when the fleet
    says no (another worker is probing, or the fleet's open window has time left).
    """

    def failed(self, breaker: CircuitBreaker) -> None:
        """A transport failure was recorded while closed (it counts fleet-wide)."""

    def recovered(self, breaker: CircuitBreaker) -> None:
        """A success followed failures while closed (the fleet's count starts again)."""

    async def admit_probe(self, breaker: CircuitBreaker, probe_seconds: float) -> None:
        """May this half-open breaker send its probe? Raise CircuitOpenError if not."""

    def probe_ended(self, breaker: CircuitBreaker) -> None:
        """The probe admitted by :meth:`admit_probe` has its outcome (or was cancelled)."""


def is_transport_failure(exc: Exception) -> bool:
    """The predicate for calls that raise classified errors: an :class:`InfraError` whose kind
    says the dependency is unhealthy (connection, timeout, unavailable). A native exception
    must be classified first (:func:`activities.resilience.classify.classify`)."""
    return isinstance(exc, InfraError) and exc.transport_failure


class CircuitBreaker:
    """An asyncio-friendly circuit breaker with consecutive-failure and failure-rate rules."""

    __slots__ = (
        "_calls",
        "_consecutive_failures",
        "_coordinator",
        "_half_open_in_flight",
        "_half_open_successes",
        "_listeners",
        "_lock",
        "_open_until",
        "_probe_ends",
        "_reason",
        "_slow_call_seconds",
        "_state",
        "_total_failures",
        "_total_rejections",
        "_total_successes",
        "_window_failures",
        "_window_start",
        "clock",
        "name",
        "settings",
    )

    def __init__(
        self,
        name: str,
        settings: BreakerSettings,
        *,
        clock: Clock = time.monotonic,
        listeners: Iterable[Listener] = (),
        coordinator: FleetCoordinator | None = None,
    ) -> None:
        self.name = name
        self.settings = settings
        self.clock = clock
        self._listeners = list(listeners)
        self._coordinator = coordinator
        self._reason: str | None = None
        self._lock = threading.Lock()
        self._slow_call_seconds = settings.slow_call_seconds
        self._state = _CLOSED
        self._open_until = 0.0
        self._consecutive_failures = 0
        self._half_open_in_flight = 0
        self._half_open_successes = 0
        self._probe_ends = 0.0  # clock time by which the probes in flight must have ended
        # The sliding window over the last N calls made while closed is kept as the sequence
        # numbers of its failures, so that a success (the common case) only bumps a counter.
        self._calls = 0
        self._window_start = 0
        self._window_failures: deque[int] = deque()
        self._total_successes = 0
        self._total_failures = 0
        self._total_rejections = 0

    # -- reading -----------------------------------------------------------------------------

    @property
    def state(self) -> BreakerState:
        """The state the next call would meet (an expired open state reads as half_open)."""
        if self._state is _OPEN and self.clock() >= self._open_until:
            return _HALF_OPEN
        return self._state

    @property
    def open_until(self) -> float | None:
        """Clock time at which an open breaker admits a probe; None unless open."""
        return self._open_until if self._state is _OPEN else None

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    def attach(self, coordinator: FleetCoordinator | None) -> None:
        """Share this breaker's state through ``coordinator`` (None: per-process only)."""
        self._coordinator = coordinator

    def snapshot(self) -> BreakerSnapshot:
        with self._lock:
            remaining = 0.0
            if self._state is _OPEN:
                remaining = max(0.0, self._open_until - self.clock())
            return BreakerSnapshot(
                name=self.name,
                state=self._state,
                consecutive_failures=self._consecutive_failures,
                window_calls=self._window_calls(),
                window_failures=self._failures_in_window(),
                half_open_in_flight=self._half_open_in_flight,
                open_remaining_seconds=remaining,
                total_successes=self._total_successes,
                total_failures=self._total_failures,
                total_rejections=self._total_rejections,
                reason=self._reason if self._state is _OPEN else None,
            )

    # -- the protocol around one call --------------------------------------------------------

    def acquire(self, probe_seconds: float | None = None) -> bool:
        """Admit a call or raise :class:`CircuitOpenError`; True means the call is a probe.

        ``probe_seconds`` bounds how long the call can take (its activity's start-to-close):
        while it is the probe in flight, rejections wait that long. Without it, a probe is
        given one open window. Pass the returned flag to :meth:`record_success` or
        :meth:`record_failure`.
        """
        if self._state is _CLOSED:  # the hot path: one attribute read, no lock
            return False
        changes: list[StateChange] = []
        with self._lock:
            if self._state is _OPEN:
                now = self.clock()
                if now < self._open_until:
                    self._total_rejections += 1
                    raise CircuitOpenError(self.name, self._open_until - now)
                changes.append(self._transition(_HALF_OPEN))
            if self._state is _HALF_OPEN:
                now = self.clock()
                if self._half_open_in_flight >= self.settings.half_open_max_calls:
                    self._total_rejections += 1
                    # The probes' outcome decides, and it is known by the time they must have
                    # ended; coming back sooner would only spend an attempt on another refusal.
                    # A probe past its bound is about to end: look again shortly.
                    floor = min(1.0, self.settings.open_seconds)
                    raise CircuitOpenError(self.name, max(self._probe_ends - now, floor))
                bound = self.settings.open_seconds if probe_seconds is None else probe_seconds
                self._probe_ends = max(self._probe_ends, now + bound)
                self._half_open_in_flight += 1
                probe = True
            else:
                probe = False
        self._notify(changes)
        return probe

    async def admit(self, probe_seconds: float | None = None) -> bool:
        """:meth:`acquire`, then, for a probe, the fleet's consent (one probe fleet-wide).

        Only a breaker that is not closed comes here: a closed one is admitted without I/O.
        """
        probe = self.acquire(probe_seconds)
        coordinator = self._coordinator
        if probe and coordinator is not None:
            bound = self.settings.open_seconds if probe_seconds is None else probe_seconds
            try:
                await coordinator.admit_probe(self, bound)
            except BaseException:
                self._release_slot()
                raise
        return probe

    def record_success(self, probe: bool = False, duration: float = 0.0) -> None:
        """The dependency answered. Too slow an answer is a failure (``slow_call_seconds``)."""
        slow = self._slow_call_seconds
        if slow is not None and duration > slow:
            self.record_failure(probe)
            return
        lock = self._lock
        lock.acquire()
        try:
            self._total_successes += 1
            closed = self._state is _CLOSED
            if closed:  # the hot path: no transition is possible
                self._calls += 1
                if not self._consecutive_failures and not probe:
                    return
                recovered = self._consecutive_failures > 0
                self._consecutive_failures = 0
        finally:
            lock.release()
        coordinator = self._coordinator
        if not closed:
            recovered = False
            changes: list[StateChange] = []
            with self._lock:
                if probe and self._state is _HALF_OPEN:
                    self._half_open_in_flight -= 1
                    self._half_open_successes += 1
                    if self._half_open_successes >= self.settings.success_threshold:
                        changes.append(self._transition(_CLOSED))
                # A call admitted while closed that ends after the breaker opened changes
                # nothing.
            self._notify(changes)
        if coordinator is not None:
            if recovered:
                coordinator.recovered(self)
            if probe:
                coordinator.probe_ended(self)

    def record_failure(self, probe: bool = False) -> None:
        """The dependency failed as a transport (connection, timeout, unavailable, too slow)."""
        changes: list[StateChange] = []
        counted = False
        with self._lock:
            self._total_failures += 1
            if self._state is _CLOSED:
                self._calls += 1
                self._consecutive_failures += 1
                self._window_failures.append(self._calls)
                if self._should_trip():
                    changes.append(self._transition(_OPEN))
                else:
                    counted = True
            elif probe and self._state is _HALF_OPEN:
                self._half_open_in_flight -= 1
                changes.append(self._transition(_OPEN))
        # Listeners first: an open is announced to the fleet before the probe's lock is freed.
        self._notify(changes)
        coordinator = self._coordinator
        if coordinator is not None:
            if counted:
                coordinator.failed(self)
            elif probe:
                coordinator.probe_ended(self)

    def release(self, probe: bool) -> None:
        """The call ended without an outcome (it was cancelled): free its probe slot, if any."""
        if probe:
            self._release_slot()
            if self._coordinator is not None:
                self._coordinator.probe_ended(self)

    def _release_slot(self) -> None:
        with self._lock:
            if self._state is _HALF_OPEN and self._half_open_in_flight > 0:
                self._half_open_in_flight -= 1

    def guard(
        self, is_failure: FailurePredicate | None = None, probe_seconds: float | None = None
    ) -> BreakerGuard:
        """The one guarded call: ``async with breaker.guard(is_failure=...): <the call>``.

        Entering admits the call or raises :class:`CircuitOpenError` (``probe_seconds``: see
        :meth:`acquire`). Leaving records the
        outcome: a normal exit is a success (timed against ``slow_call_seconds``); an
        ``Exception`` for which ``is_failure`` is true is a failure, any other one a success
        (the dependency answered, say with a refusal: pybreaker's ``exclude``); a cancellation
        (or any other ``BaseException``) is no outcome, and frees a probe slot. Without
        ``is_failure`` every exception counts as a failure. The exception propagates as it is.
        """
        return BreakerGuard(self, is_failure, probe_seconds)

    async def call(
        self,
        function: Callable[P, Awaitable[R]],
        *args: P.args,
        **kwargs: P.kwargs,
    ) -> R:
        """``await function(*args, **kwargs)`` as in :meth:`guard`, every exception a failure.

        The same protocol as the guard (:meth:`_settle` decides the outcome), inlined: this is
        the path a closed breaker takes millions of times, and a context manager costs two
        coroutine frames per call.
        """
        probe = False if self._state is _CLOSED else await self.admit()
        started = 0.0 if self._slow_call_seconds is None else self.clock()
        try:
            result = await function(*args, **kwargs)
        except BaseException as exc:
            self._settle(probe, started, exc, None)
            raise
        self._settle(probe, started, None, None)
        return result

    def _settle(
        self,
        probe: bool,
        started: float,
        exc: BaseException | None,
        is_failure: FailurePredicate | None,
    ) -> None:
        """Record how a guarded call ended (the rules are in :meth:`guard`)."""
        if exc is None or isinstance(exc, Exception):
            if exc is not None and (is_failure is None or is_failure(exc)):
                self.record_failure(probe)
            elif self._slow_call_seconds is None:
                self.record_success(probe)
            else:
                self.record_success(probe, self.clock() - started)
        else:
            self.release(probe)  # cancelled (or interrupted): no outcome

    def reset(self, *, reason: str | None = None, origin: Origin = Origin.LOCAL) -> None:
        """Close the breaker and forget its history (an operator's override, or the fleet's)."""
        with self._lock:
            change = self._transition(_CLOSED, reason=reason, origin=origin)
        self._notify([change])

    def open_for(
        self, seconds: float, *, reason: str | None = None, origin: Origin = Origin.OPERATOR
    ) -> None:
        """Open now, for ``seconds``: the fleet heard of an open, or an operator forced one.

        Every call is then rejected with the time left as ``retry_after``; when the window
        ends the breaker is half-open as after any open. An operator's open is always
        announced to the listeners (with its reason); the fleet's only when it changes state.
        """
        changes: list[StateChange] = []
        with self._lock:
            until = self.clock() + seconds
            if self._state is not _OPEN or origin is Origin.OPERATOR:
                changes.append(self._transition(_OPEN, reason=reason, origin=origin))
            elif reason is not None:
                self._reason = reason
            self._open_until = until
        self._notify(changes)

    # -- internals (called with the lock held) -----------------------------------------------

    def _window_calls(self) -> int:
        return min(self._calls - self._window_start, self.settings.window_size)

    def _failures_in_window(self) -> int:
        oldest = self._calls - self.settings.window_size
        failures = self._window_failures
        while failures and failures[0] <= oldest:
            failures.popleft()
        return len(failures)

    def _should_trip(self) -> bool:
        settings = self.settings
        if self._consecutive_failures >= settings.failure_threshold:
            return True
        rate = settings.failure_rate_threshold
        if rate is None:
            return False
        calls = self._window_calls()
        return calls >= settings.minimum_calls and self._failures_in_window() >= rate * calls

    def _transition(
        self, new_state: BreakerState, *, reason: str | None = None, origin: Origin = Origin.LOCAL
    ) -> StateChange:
        change = StateChange(
            service_name=self.name,
            previous_state=self._state,
            new_state=new_state,
            failure_count=self._consecutive_failures,
            reset_timeout_seconds=self.settings.open_seconds,
            reason=reason,
            origin=origin,
        )
        self._state = new_state
        self._reason = reason
        self._half_open_in_flight = 0
        self._half_open_successes = 0
        self._probe_ends = 0.0
        if new_state is _OPEN:
            self._open_until = self.clock() + self.settings.open_seconds
        elif new_state is _CLOSED:
            self._consecutive_failures = 0
            self._window_start = self._calls
            self._window_failures.clear()
        return change

    def _notify(self, changes: list[StateChange]) -> None:
        for change in changes:
            for listener in self._listeners:
                try:
                    listener(change)
                except Exception:  # a listener's bug must not fail the guarded call
                    structlog.get_logger("onex.breaker").exception(
                        "circuit_breaker_listener_failed", breaker=self.name
                    )


class BreakerGuard:
    """One call through a breaker, as an async context manager (see :meth:`CircuitBreaker.guard`).

    The closed-breaker path is a few attribute reads: no lock on entry, one short lock on exit.
    """

    __slots__ = ("_breaker", "_is_failure", "_probe", "_probe_seconds", "_started")

    def __init__(
        self,
        breaker: CircuitBreaker,
        is_failure: FailurePredicate | None,
        probe_seconds: float | None = None,
    ) -> None:
        self._breaker = breaker
        self._is_failure = is_failure
        self._probe_seconds = probe_seconds
        self._probe = False
        self._started = 0.0

    async def __aenter__(self) -> BreakerGuard:
        breaker = self._breaker
        if breaker._state is not _CLOSED:
            self._probe = await breaker.admit(self._probe_seconds)
        if breaker._slow_call_seconds is not None:  # the clock is read only when it matters
            self._started = breaker.clock()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self._breaker._settle(self._probe, self._started, exc, self._is_failure)


class BreakerRegistry:
    """The breakers of one worker process, one per dependency key (e.g. ``kafka:<topic>``).

    With a coordinator attached (:meth:`attach`), every breaker shares its state with the
    fleet; opens heard from the fleet for a breaker this process has not used yet are kept and
    applied when it is created.
    """

    def __init__(self, *, clock: Clock = time.monotonic, listeners: Iterable[Listener] = ()):
        self._clock = clock
        self._listeners = list(listeners)
        self._breakers: dict[str, CircuitBreaker] = {}
        self._lock = threading.Lock()
        self._coordinator: FleetCoordinator | None = None
        # name -> (clock time the open ends, reason, origin), for breakers not created yet.
        self._pending_opens: dict[str, tuple[float, str | None, Origin]] = {}

    def get(self, name: str, settings: BreakerSettings) -> CircuitBreaker:
        """The breaker for ``name``, created with ``settings`` on first use."""
        breaker = self._breakers.get(name)
        if breaker is None:
            with self._lock:
                breaker = self._breakers.get(name)
                if breaker is None:
                    breaker = CircuitBreaker(
                        name,
                        settings,
                        clock=self._clock,
                        listeners=self._listeners,
                        coordinator=self._coordinator,
                    )
                    self._breakers[name] = breaker
                    pending = self._pending_opens.pop(name, None)
                else:
                    pending = None
            if pending is not None:
                until, reason, origin = pending
                left = until - self._clock()
                if left > 0:
                    breaker.open_for(left, reason=reason, origin=origin)
        return breaker

    def find(self, name: str) -> CircuitBreaker | None:
        """The breaker for ``name`` if this process has created it."""
        return self._breakers.get(name)

    def attach(self, coordinator: FleetCoordinator | None) -> None:
        """Share every breaker's state, present and future, through ``coordinator``."""
        with self._lock:
            self._coordinator = coordinator
            for breaker in self._breakers.values():
                breaker.attach(coordinator)

    def apply_open(self, name: str, seconds: float, *, reason: str | None, origin: Origin) -> None:
        """The fleet (or an operator) opened ``name`` for ``seconds`` more."""
        breaker = self._breakers.get(name)
        if breaker is None:
            with self._lock:
                breaker = self._breakers.get(name)
                if breaker is None:
                    self._pending_opens[name] = (self._clock() + seconds, reason, origin)
                    return
        breaker.open_for(seconds, reason=reason, origin=origin)

    def apply_close(self, name: str, *, reason: str | None, origin: Origin) -> None:
        """The fleet (or an operator) closed ``name``."""
        with self._lock:
            self._pending_opens.pop(name, None)
        breaker = self._breakers.get(name)
        if breaker is not None:
            breaker.reset(reason=reason, origin=origin)

    def add_listener(self, listener: Listener) -> None:
        """Hear the transitions of every breaker, present and future."""
        with self._lock:
            self._listeners.append(listener)
            for breaker in self._breakers.values():
                breaker.add_listener(listener)

    def snapshot(self) -> list[BreakerSnapshot]:
        return [breaker.snapshot() for breaker in sorted(self._breakers.values(), key=_name)]

    def reset(self, name: str | None = None) -> None:
        """Reset one breaker, or all of them."""
        for breaker_name, breaker in list(self._breakers.items()):
            if name is None or breaker_name == name:
                breaker.reset()


def _name(breaker: CircuitBreaker) -> str:
    return breaker.name


def log_state_change(change: StateChange) -> None:
    """A listener that logs every transition (warning when a breaker opens)."""
    log = structlog.get_logger("onex.breaker")
    level = log.warning if change.new_state is _OPEN else log.info
    level(
        "circuit_breaker_state_changed",
        breaker=change.service_name,
        previous_state=change.previous_state.value,
        new_state=change.new_state.value,
        failure_count=change.failure_count,
        reset_timeout_seconds=change.reset_timeout_seconds,
        reason=change.reason,
        origin=change.origin.value,
    )


_STATE_VALUE = {_CLOSED: 0, _HALF_OPEN: 1, _OPEN: 2}


class MetricsListener:
    """A listener that exports transitions and the current state through a Temporal meter.

    With the worker's runtime configured for Prometheus, these appear beside the SDK's own
    metrics: ``onex_circuit_breaker_transitions`` (counter) and ``onex_circuit_breaker_state``
    (gauge: 0 closed, 1 half-open, 2 open), both labelled by breaker.
    """

    def __init__(self, meter: MetricMeter) -> None:
        self._transitions = meter.create_counter(
            "onex_circuit_breaker_transitions", "Circuit breaker state changes"
        )
        self._state = meter.create_gauge(
            "onex_circuit_breaker_state", "Circuit breaker state: 0 closed, 1 half-open, 2 open"
        )

    def __call__(self, change: StateChange) -> None:
        labels = {"breaker": change.service_name}
        self._transitions.add(
            1, {**labels, "from": change.previous_state.value, "to": change.new_state.value}
        )
        self._state.set(_STATE_VALUE[change.new_state], labels)
