"""The chaos runner: real worker processes, a real Temporal dev server, PostgreSQL and a Kafka
broker behind fault proxies, and the Consul fake; it kills, cuts and storms them while
operations overlap on shared nodes, then waits for quiescence and checks what was lost.

``python -m tests.chaos [--profile short|full] [--seed N]`` (``make chaos`` runs the full
profile; the short one runs inside ``make test``). The seed fixes the injection schedule: the
order and kind of operations and faults. It prints one JSON object of figures and exits 1 if an
invariant broke, naming the node and the workflow.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import asyncpg
from aiokafka import AIOKafkaConsumer
from temporalio.client import (
    WorkflowExecutionStatus,
    WorkflowHistory,
    WorkflowQueryFailedError,
    WorkflowUpdateFailedError,
    WorkflowUpdateRPCTimeoutOrCancelledError,
)
from temporalio.service import RPCError

from activities.kafka_admin import create_topics
from activities.settings import ConsulSettings, KafkaSettings, PostgresSettings
from contracts.node import node_workflow_id
from contracts.operations_io import OperationResult, OperationStatus
from contracts.registry import DeregisterNodeRequest
from contracts.topics import TOPICS_BY_NAME, TopicName
from tests.builders import register_request
from tests.fakes import planted
from tests.fakes.consul_agent import FakeConsulAgent
from tests.fakes.fault_proxy import FaultProxy, start_proxied_broker
from tests.stack import fast_operations
from tests.support import free_port
from workers.client import (
    NodeBusy,
    OperationFinished,
    OperationNotFound,
    Operations,
    connect,
    get_node_state,
    get_status,
    retry_failed,
    start_operation,
)
from workers.devstack import DevStack, ServiceName, superuser_dsn
from workers.replay import replayer
from workers.settings import DevSettings, OnexSettings, TemporalSettings, WorkerSettings
from workflows.operation import OperationWorkflow

BIN = Path(sys.executable).parent
_WAITING = (OperationStatus.RUNNING, OperationStatus.QUEUED)
# The outcome events that say what a node's state is (a failed registration leaves it as it was).
_STATE_EVENTS = {
    TopicName.REGISTRY_NODE_REGISTERED.value: True,
    TopicName.REGISTRY_NODE_DEREGISTERED.value: False,
}
T = TypeVar("T")

# Planted in the workers' settings: none may appear in a history, a log or an event.
CONSUL_TOKEN = planted.CONSUL_TOKEN


@dataclass(frozen=True)
class Profile:
    operations: int
    nodes: int
    worker_kills: int
    temporal_restarts: int
    outages: int
    compensation_outages: int
    long_outage_seconds: float
    window_seconds: float
    quiescence_seconds: float
    # Whether a run that did not cut a backend during a compensation, or not for the long
    # duration, fails as not having proved what it is for.
    must_reach_compensations: bool = True


PROFILES = {
    "short": Profile(
        operations=40,
        nodes=8,
        worker_kills=6,
        temporal_restarts=1,
        outages=3,
        compensation_outages=2,
        long_outage_seconds=8.0,
        window_seconds=3.0,
        quiescence_seconds=150.0,
    ),
    "full": Profile(
        operations=170,
        nodes=24,
        worker_kills=24,
        temporal_restarts=5,
        outages=8,
        compensation_outages=6,
        long_outage_seconds=65.0,  # longer than the forward retry budget
        window_seconds=5.0,
        quiescence_seconds=600.0,
    ),
}


@dataclass
class Figures:
    seed: int
    profile: str
    injected: Counter[str] = field(default_factory=Counter)
    started: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    problems: list[str] = field(default_factory=list)
    events: dict[str, int] = field(default_factory=dict)
    outages: dict[str, dict[str, float]] = field(default_factory=dict)
    quiescence_seconds: float = 0.0
    duration_seconds: float = 0.0

    def as_json(self) -> str:
        return json.dumps(
            {
                "seed": self.seed,
                "profile": self.profile,
                "operations_started": dict(self.started),
                "operations_run": sum(self.statuses.values()),
                "operations_by_final_status": dict(self.statuses),
                "outages": self.outages,
                "injected": dict(self.injected),
                "lost_effects": sum("lost" in p for p in self.problems),
                "duplicated_effects": sum("duplicate row" in p for p in self.problems),
                "half_done_nodes": sum("disagree" in p for p in self.problems),
                "events": self.events,
                "problems": self.problems,
                "time_to_quiescence_seconds": round(self.quiescence_seconds, 1),
                "duration_seconds": round(self.duration_seconds, 1),
            },
            sort_keys=True,
        )


@dataclass
class Window:
    """A stretch during which a backend was cut, in UTC like the histories' event times."""

    backend: str
    started: datetime
    ended: datetime | None = None

    @property
    def seconds(self) -> float:
        return ((self.ended or datetime.now(UTC)) - self.started).total_seconds()

    def overlaps(self, span: tuple[datetime, datetime]) -> bool:
        return span[0] < (self.ended or datetime.now(UTC)) and span[1] > self.started


def phases(
    history: WorkflowHistory, compensations: set[str]
) -> tuple[list[tuple[datetime, datetime]], list[tuple[datetime, datetime]]]:
    """The forward and compensating stretches of one operation run, from its history: from
    its first activity to its first compensation, and from there to its last activity."""
    scheduled: dict[int, datetime] = {}
    spans: list[tuple[datetime, datetime, str]] = []
    names: dict[int, str] = {}
    for event in history.events:
        at = event.event_time.ToDatetime(tzinfo=UTC)
        kind = event.WhichOneof("attributes")
        if kind == "activity_task_scheduled_event_attributes":
            scheduled[event.event_id] = at
            names[event.event_id] = (
                event.activity_task_scheduled_event_attributes.activity_type.name
            )
        elif kind in _ACTIVITY_CLOSED:
            event_id = getattr(event, kind).scheduled_event_id
            spans.append((scheduled.pop(event_id), at, names[event_id]))
    spans += [(at, datetime.now(UTC), names[event_id]) for event_id, at in scheduled.items()]
    if not spans:
        return [], []
    first = min(start for start, _, _ in spans)
    last = max(end for _, end, _ in spans)
    undo = [start for start, _, name in spans if name in compensations]
    if not undo:
        return [(first, last)], []
    return [(first, min(undo))], [(min(undo), last)]


_ACTIVITY_CLOSED = (
    "activity_task_completed_event_attributes",
    "activity_task_failed_event_attributes",
    "activity_task_timed_out_event_attributes",
    "activity_task_canceled_event_attributes",
)


class Workers:
    """``onex worker`` processes, killed with SIGKILL on demand; :meth:`supervise` starts any
    that has exited again (a worker that starts while Temporal is away exits, as it should)."""

    def __init__(self, environment: dict[str, str], logs: Path, count: int) -> None:
        self.environment, self.logs, self.count = environment, logs, count
        self.processes: list[subprocess.Popen[bytes]] = []
        self.down_until = [0.0] * count
        self.restarts = 0

    def start(self, index: int) -> subprocess.Popen[bytes]:
        log = open(self.logs / f"worker-{index}.log", "ab")  # noqa: SIM115 (kept by the child)
        process = subprocess.Popen(
            [str(BIN / "onex"), "worker"],
            env={**self.environment, "ONEX_WORKER__IDENTITY": f"chaos-worker-{index}"},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        return process

    def start_all(self) -> None:
        self.processes = [self.start(index) for index in range(self.count)]

    def kill(self, index: int, *, down_for: float) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.processes[index].pid, signal.SIGKILL)
        self.processes[index].wait()
        self.down_until[index] = time.monotonic() + down_for

    async def supervise(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            for index, process in enumerate(self.processes):
                if process.poll() is not None and time.monotonic() >= self.down_until[index]:
                    self.processes[index] = self.start(index)
                    self.restarts += 1
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), timeout=0.5)

    def stop_all(self) -> None:
        for process in self.processes:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes:
            try:
                process.wait(timeout=40)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()

    def log_text(self) -> str:
        return "\n".join(path.read_text(errors="replace") for path in self.logs.glob("*.log"))


def progress(message: str) -> None:
    print(f"chaos: {message}", file=sys.stderr, flush=True)


async def _patient(call: Callable[[], Awaitable[T]], *, within: float = 120.0) -> T:
    """``call()``, tried again while Temporal is away (a restart takes a few seconds)."""
    deadline = time.monotonic() + within
    while True:
        try:
            return await call()
        except (RPCError, WorkflowUpdateRPCTimeoutOrCancelledError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.5)


class Chaos:
    def __init__(self, profile: Profile, seed: int, root: Path) -> None:
        self.profile, self.rng, self.root = profile, random.Random(seed), root
        self.figures = Figures(seed=seed, profile="")
        self.nodes = [uuid.uuid4() for _ in range(profile.nodes)]
        # Nodes of their own for the registrations stopped half-way: no storm operation on
        # the node supersedes one before its backend is cut. Checked like the others.
        self.halfway_nodes = [uuid.uuid4() for _ in range(profile.compensation_outages)]
        self.background: set[asyncio.Task[Any]] = set()
        self.windows: list[Window] = []
        self.histories: list[WorkflowHistory] = []
        self._cut_until: dict[str, float] = {}
        self._event_texts: list[str] = []
        self._last_outcome: dict[str, str] = {}

    @contextlib.asynccontextmanager
    async def stack(self) -> AsyncIterator[None]:
        """Temporal and PostgreSQL from the dev stack, Kafka and PostgreSQL behind proxies,
        the Consul fake; the workers' environment points at the proxies."""
        settings = OnexSettings(
            temporal=TemporalSettings(port=free_port(), ui_port=free_port()),
            postgres=PostgresSettings(port=free_port()),
            kafka=KafkaSettings(bootstrap_servers=f"127.0.0.1:{free_port()}"),
            dev=DevSettings(state_dir=self.root / "state"),
        )
        self.dev = DevStack(settings, services=[ServiceName.TEMPORAL, ServiceName.POSTGRES])
        progress("starting Temporal and PostgreSQL")
        await self.dev.up()
        try:
            async with (
                FaultProxy(settings.postgres.host, settings.postgres.port) as pg_proxy,
                start_proxied_broker() as (bootstrap, kafka_proxy),
                FakeConsulAgent(token=CONSUL_TOKEN) as agent,
            ):
                self.pg_proxy, self.kafka_proxy, self.agent = pg_proxy, kafka_proxy, agent
                self.proxies = {"postgres": pg_proxy, "kafka": kafka_proxy}
                self.bootstrap = bootstrap
                self.settings = settings.model_copy(
                    update={
                        "kafka": KafkaSettings(
                            bootstrap_servers=bootstrap, request_timeout_ms=5000
                        ),
                        "consul": ConsulSettings(address=agent.address, timeout=3),
                        "worker": WorkerSettings(task_queue="chaos"),
                    }
                )
                self.registry_dsn = superuser_dsn(settings, settings.postgres.database)
                await create_topics(bootstrap)
                progress("stack up: Temporal, PostgreSQL and Kafka behind proxies, Consul fake")
                yield
        finally:
            self.dev.down(purge=True)

    def worker_environment(self) -> dict[str, str]:
        settings = self.settings
        return {
            **{k: v for k, v in os.environ.items() if not k.startswith("ONEX_")},
            "ONEX_DEV__STATE_DIR": str(settings.dev.state_dir),
            "ONEX_TEMPORAL__PORT": str(settings.temporal.port),
            "ONEX_POSTGRES__PORT": str(self.pg_proxy.port),
            "ONEX_KAFKA__BOOTSTRAP_SERVERS": self.bootstrap,
            "ONEX_KAFKA__REQUEST_TIMEOUT_MS": "5000",
            "ONEX_CONSUL__ADDRESS": self.agent.address,
            "ONEX_CONSUL__TOKEN": CONSUL_TOKEN,
            "ONEX_CONSUL__TIMEOUT": "3",
            "ONEX_WORKER__TASK_QUEUE": "chaos",
            "ONEX_WORKER__GRACEFUL_SHUTDOWN_TIMEOUT": "5",
        }

    async def run(self) -> Figures:
        started = time.monotonic()
        async with self.stack():
            self.client = await connect(self.settings)
            self.operations = fast_operations(
                Operations.load(self.settings), window_seconds=self.profile.window_seconds
            )
            logs = self.root / "logs"
            logs.mkdir()
            self.workers = Workers(self.worker_environment(), logs, count=2)
            self.workers.start_all()
            stop_supervising = asyncio.Event()
            supervisor = asyncio.create_task(self.workers.supervise(stop_supervising))
            try:
                progress(f"2 workers started; storm of {self.profile.operations} operations")
                await self._storm()
                progress(f"storm over ({dict(self.figures.injected)}); waiting for quiescence")
                quiet_from = time.monotonic()
                results = await self._settle()
                progress("quiescent; checking the invariants")
                self.figures.quiescence_seconds = time.monotonic() - quiet_from
                await self._check(results)
            finally:
                stop_supervising.set()
                await supervisor
                self.figures.injected["worker_restarts"] = self.workers.restarts
                self.workers.stop_all()
        self.figures.duration_seconds = time.monotonic() - started
        return self.figures

    # -- the storm ------------------------------------------------------------------------

    def _schedule(self) -> list[str]:
        """Operations and faults, in a seeded order: the run's injection schedule."""
        profile = self.profile
        faults = (
            ["worker_kill"] * profile.worker_kills
            + ["temporal_restart"] * profile.temporal_restarts
            + ["postgres_outage", "kafka_outage"] * (profile.outages // 2)
            + ["compensation_outage"] * profile.compensation_outages
            + ["consul_errors", "consul_timeouts"] * max(1, profile.outages // 4)
        )
        operations = self.rng.choices(
            ["register", "deregister", "retry", "cancel"],
            weights=[6, 3, 2, 1],
            k=profile.operations,
        )
        steps = operations + faults
        self.rng.shuffle(steps)
        return steps

    async def _storm(self) -> None:
        for step in self._schedule():
            if step in ("register", "deregister", "retry", "cancel"):
                await self._operation(step)
            else:
                await self._fault(step)
            self.figures.injected["steps"] += 1
        self.figures.injected.pop("steps")

    async def _operation(self, kind: str) -> None:
        node = self.rng.choice(self.nodes)
        if kind == "register":
            # Mostly new ports, so that most registrations are operations of their own rather
            # than repeats that attach to a running one.
            request: Any = register_request(
                node_id=node, address="127.0.0.1", port=self.rng.randrange(8000, 8100)
            )
            await self._start("register_node", request)
        elif kind == "deregister":
            await self._start(
                "deregister_node", DeregisterNodeRequest(node_id=node, node_type="effect")
            )
        elif kind == "retry":
            task = asyncio.create_task(self._retry(f"onex-register-node-{node}"))
            self.background.add(task)
        else:
            with contextlib.suppress(RPCError):
                await self.client.get_workflow_handle(f"onex-register-node-{node}").cancel()
        self.figures.started[kind] += 1

    async def _start(self, operation: str, request: Any) -> Any:
        request_id = str(uuid.uuid4())  # a repeated send is the same Update: it attaches

        async def start() -> Any:
            return await start_operation(
                self.client,
                operation,
                request,
                settings=self.settings,
                operations=self.operations,
                request_id=request_id,
            )

        try:
            handle = await asyncio.wait_for(_patient(start, within=240), timeout=300)
        except TimeoutError:
            exits = [process.poll() for process in self.workers.processes]
            raise RuntimeError(
                f"no worker accepted {operation} within 300 s (worker exit codes: {exits}; "
                f"their logs: {self.workers.logs})"
            ) from None
        except (WorkflowUpdateFailedError, NodeBusy):  # the node is full: refused, nothing ran
            self.figures.started["refused"] += 1
            return None
        return handle

    async def _retry(self, workflow_id: str) -> None:
        with contextlib.suppress(
            OperationNotFound, OperationFinished, WorkflowUpdateFailedError, RPCError
        ):
            status = await get_status(self.client, workflow_id)
            if status.status is OperationStatus.PARTIAL:
                await retry_failed(self.client, workflow_id)

    async def _fault(self, kind: str) -> None:
        self.figures.injected[kind] += 1
        if kind == "worker_kill":
            index = self.rng.randrange(self.workers.count)
            self.workers.kill(index, down_for=self.rng.uniform(0.2, 2.0))
        elif kind == "temporal_restart":
            process = self.dev.running_process(ServiceName.TEMPORAL)
            if process is not None:
                process.kill()
                process.wait()
            await self.dev.up()  # on its SQLite state: nothing is lost
        elif kind in ("postgres_outage", "kafka_outage"):
            await self._outage(kind.removesuffix("_outage"))
        elif kind == "compensation_outage":
            backend = ("postgres", "kafka")[self.figures.injected[kind] % 2]
            node = self.halfway_nodes[self.figures.injected[kind] - 1]
            seconds = self.rng.uniform(3.0, 12.0)
            port = self.rng.randrange(9000, 9100)
            task = asyncio.create_task(self._compensation_outage(backend, node, port, seconds))
            self.background.add(task)
        elif kind == "consul_timeouts":
            self.agent.set_latency(4.0)  # longer than the workers' Consul timeout (3 s)
            self._later(self.rng.uniform(2.0, 6.0), functools.partial(self.agent.set_latency, 0))
        else:
            self.agent.fail_next(self.rng.randint(3, 12), status=self.rng.choice([500, 429]))

    async def _outage(self, backend: str) -> None:
        """Cut now, restore later; the last outage of each kind lasts the long duration."""
        long = self.figures.injected[f"{backend}_outage"] >= self.profile.outages // 2
        seconds = self.profile.long_outage_seconds if long else self.rng.uniform(1.0, 4.0)
        await self._cut(backend, seconds)

    async def _compensation_outage(
        self, backend: str, node: uuid.UUID, port: int, seconds: float
    ) -> None:
        """A registration stopped half-way (the Consul fake refuses its service), cancelled
        while ``backend`` is cut: its compensation runs into the outage. A registration that
        ends another way first (its node busy, a worker killed while it waited) is tried
        again, at most five times."""
        service_id = f"onex-effect-{node}"
        self.agent.refused_services.add(service_id)
        try:
            for attempt in range(5):
                request = register_request(node_id=node, address="127.0.0.1", port=port + attempt)
                handle = await self._start("register_node", request)
                outcome = "refused" if handle is None else await self._became_partial(handle.id)
                if outcome == OperationStatus.PARTIAL.value:
                    await self._cut(backend, seconds)
                    with contextlib.suppress(RPCError):
                        await self.client.get_workflow_handle(handle.id).cancel()
                    return
                progress(f"a registration meant to stop half-way on {node} ended {outcome}")
            self.figures.injected["compensation_outage_missed"] += 1
        finally:
            self.agent.refused_services.discard(service_id)

    async def _became_partial(self, workflow_id: str, within: float = 180.0) -> str:
        """``partial`` once the operation is, or the status it ended with instead."""
        deadline = time.monotonic() + within
        while time.monotonic() < deadline:
            status = await _patient(functools.partial(self._status, workflow_id))
            if status is not None and status.status not in _WAITING:
                return status.status.value
            await asyncio.sleep(0.1)
        return "still waiting after 180 s"

    async def _cut(self, backend: str, seconds: float) -> None:
        """Cut ``backend`` for at least ``seconds``; overlapping cuts make one window."""
        proxy = self.proxies[backend]
        self._cut_until[backend] = max(
            self._cut_until.get(backend, 0.0), time.monotonic() + seconds
        )
        if not proxy.is_cut:
            await proxy.cut()
            self.windows.append(Window(backend, datetime.now(UTC)))
        self._later(seconds, functools.partial(self._restore, backend))

    def _restore(self, backend: str, *, now: bool = False) -> None:
        if not now and time.monotonic() < self._cut_until[backend] - 0.05:
            return  # a later cut extends this window; its own restore ends it
        proxy = self.proxies[backend]
        if proxy.is_cut:
            proxy.restore()
            window = next(w for w in reversed(self.windows) if w.backend == backend)
            window.ended = datetime.now(UTC)

    def _later(self, seconds: float, action: Callable[[], object]) -> None:
        async def later() -> None:
            await asyncio.sleep(seconds)  # a scheduled fault, not a wait for a condition
            action()

        task = asyncio.create_task(later())
        self.background.add(task)

    # -- quiescence and invariants ----------------------------------------------------------

    async def _settle(self) -> list[OperationResult]:
        """Wait (with a deadline) until no operation runs or waits and the outbox is drained;
        then every run of every operation, with its final status."""
        # Scheduled faults schedule their own restores: wait until none is left.
        while unfinished := [task for task in self.background if not task.done()]:
            await asyncio.wait(unfinished)
        for task in self.background:
            if task.exception() is not None:
                self.figures.problems.append(f"the runner's own task failed: {task.exception()!r}")
        for backend in self.proxies:
            self._restore(backend, now=True)
        self.agent.clear_faults()
        deadline = time.monotonic() + self.profile.quiescence_seconds
        while True:
            open_ones = await self._open_operations()
            pending = await self._unpublished()
            if not open_ones and not pending:
                break
            if time.monotonic() > deadline:
                self.figures.problems.append(
                    f"not quiescent: still open {sorted(open_ones)}, {pending} unpublished events"
                )
                break
            await asyncio.sleep(1.0)
        return await self._runs()

    async def _unpublished(self) -> int:
        connection = await asyncpg.connect(self.registry_dsn)
        try:
            count: int = await connection.fetchval(
                "SELECT count(*) FROM onex_outbox WHERE published_at IS NULL"
            )
            return count
        finally:
            await connection.close()

    async def _runs(self) -> list[OperationResult]:
        """The final status of every run (a node's operations of one kind share a workflow
        id, one run each), and every history, node workflows' included."""
        results = []
        executions = [execution async for execution in self.client.list_workflows()]
        for execution in executions:
            handle = self.client.get_workflow_handle(
                execution.id, run_id=execution.run_id, result_type=OperationResult
            )
            self.histories.append(await _patient(handle.fetch_history))
            if execution.workflow_type != OperationWorkflow.__name__:
                continue
            try:
                result = await _patient(functools.partial(handle.query, OperationWorkflow.status))
            except WorkflowQueryFailedError as error:
                self.figures.problems.append(
                    f"{execution.id} (run {execution.run_id}) cannot be queried: {error}"
                )
                continue
            results.append(result)
            self.figures.statuses[result.status.value] += 1
            running = execution.status is WorkflowExecutionStatus.RUNNING
            if running and result.status is not OperationStatus.COMPENSATION_PAUSED:
                self.figures.problems.append(
                    f"{execution.id} (run {execution.run_id}) is still {result.status.value}"
                    " after quiescence: neither closed nor waiting for an operator"
                )
        return results

    async def _open_operations(self) -> set[str]:
        """Operations still running or queued without a reason an operator must act on."""
        still: set[str] = set()
        for node in [*self.nodes, *self.halfway_nodes]:
            try:
                state = await _patient(functools.partial(get_node_state, self.client, node))
            except OperationNotFound:
                continue
            for entry in [*([state.running] if state.running else []), *state.queued]:
                status = await _patient(functools.partial(self._status, entry.workflow_id))
                if status is None or status.status is not OperationStatus.COMPENSATION_PAUSED:
                    still.add(entry.workflow_id)
        return still

    async def _status(self, workflow_id: str) -> OperationResult | None:
        try:
            return await get_status(self.client, workflow_id)
        except OperationNotFound:
            return None

    async def _check(self, results: list[OperationResult]) -> None:
        connection = await asyncpg.connect(self.registry_dsn)
        try:
            pending = await connection.fetchval(
                "SELECT count(*) FROM onex_outbox WHERE published_at IS NULL"
            )
            dead = await connection.fetch("SELECT topic, reason FROM onex_dead_letters")
            queued_ids = {
                str(row["event_id"])
                for row in await connection.fetch("SELECT event_id FROM onex_outbox")
            }
            await self._check_events(queued_ids, len(dead))  # read after the outbox: no race
            for node in [*self.nodes, *self.halfway_nodes]:
                await self._check_node(connection, node)
        finally:
            await connection.close()
        if pending:
            self.figures.problems.append(f"outbox not drained: {pending} unpublished rows")
        for row in dead:
            if not row["reason"]:
                self.figures.problems.append(f"unexplained dead letter on {row['topic']}")
        self._check_outages()
        self._check_secrets(results)
        await self._check_replay()

    async def _check_replay(self) -> None:
        """Every history of the run replays with the current code: a worker that picks an
        execution up after a kill (or answers a query on a cold cache) must take the path the
        first one took. A history that does not is kept for the regression corpus."""
        kept = Path(tempfile.gettempdir()) / f"onex-chaos-{self.figures.seed}-nondeterministic"
        replaying = replayer()
        for index, history in enumerate(self.histories):
            result = await replaying.replay_workflow(history, raise_on_replay_failure=False)
            if result.replay_failure is None:
                continue
            kept.mkdir(exist_ok=True)
            name = f"{history.workflow_id}-{index}.json"  # one id can have several runs
            (kept / name).write_text(history.to_json())
            self.figures.problems.append(
                f"{history.workflow_id} does not replay ({result.replay_failure}); "
                f"history kept as {kept / name}"
            )

    def _check_outages(self) -> None:
        """How many cuts of each backend overlapped forward steps and compensations (from
        the histories); the full profile must have reached both, and its long outage."""
        compensations = {
            step.compensation_activity
            for plan in self.operations.plans.values()
            for step in plan.steps
            if step.compensation_activity
        }
        forward, undoing = [], []
        for history in self.histories:
            ahead, behind = phases(history, compensations)
            forward += ahead
            undoing += behind
        for backend in self.proxies:
            windows = [window for window in self.windows if window.backend == backend]
            figures = {
                "windows": len(windows),
                "seconds": round(sum(window.seconds for window in windows), 1),
                "longest_seconds": round(max((w.seconds for w in windows), default=0.0), 1),
                "during_forward_steps": sum(any(map(w.overlaps, forward)) for w in windows),
                "during_compensations": sum(any(map(w.overlaps, undoing)) for w in windows),
            }
            self.figures.outages[backend] = figures
            if not self.profile.must_reach_compensations:
                continue
            if not figures["during_compensations"]:
                self.figures.problems.append(
                    f"coverage: no {backend} outage overlapped a compensation; rerun with "
                    "another seed, or raise compensation_outages"
                )
            if figures["longest_seconds"] < self.profile.long_outage_seconds - 1:
                self.figures.problems.append(
                    f"coverage: the longest {backend} outage lasted "
                    f"{figures['longest_seconds']} s, under {self.profile.long_outage_seconds} s"
                )

    async def _check_node(self, connection: Any, node: uuid.UUID) -> None:
        rows = await connection.fetch("SELECT status FROM onex_nodes WHERE node_id = $1", node)
        if len(rows) > 1:
            self.figures.problems.append(f"node {node}: duplicate row ({len(rows)})")
        active = bool(rows) and rows[0]["status"] == "active"
        in_consul = f"onex-effect-{node}" in self.agent.services
        try:
            state = await get_node_state(self.client, node)
        except OperationNotFound:
            state = None
        last = state.last if state else None
        said = self._last_outcome.get(str(node))
        if (said is not None and _STATE_EVENTS[said] != active) or (said is None and active):
            self.figures.problems.append(
                f"node {node}: PostgreSQL and the last outcome event on Kafka disagree "
                f"(postgres active={active}, last event {said}); last operation {last} "
                f"({node_workflow_id(node)})"
            )
        if active != in_consul:
            self.figures.problems.append(
                f"node {node}: PostgreSQL and Consul disagree (postgres active={active}, "
                f"consul={in_consul}); last operation {last} ({node_workflow_id(node)})"
            )
        elif last and last["status"] == OperationStatus.SUCCESS.value:
            registered = last["workflow_id"].startswith("onex-register-node-")
            if registered != active:
                self.figures.problems.append(
                    f"node {node}: the last operation {last['workflow_id']} succeeded but the "
                    f"node is {'active' if active else 'absent'}: an effect was lost"
                )

    async def _check_events(self, queued_ids: set[str], dead_letters: int) -> None:
        topics = [self.settings.kafka.topic_prefix + name for name in TOPICS_BY_NAME]
        consumer = AIOKafkaConsumer(
            *topics,
            bootstrap_servers=self.bootstrap,
            auto_offset_reset="earliest",
            enable_auto_commit=False,
        )
        seen: Counter[str] = Counter()
        texts: list[str] = []
        latest: dict[str, tuple[str, str]] = {}  # node id -> (timestamp, event type)
        await consumer.start()
        try:
            idle = 0
            while idle < 3:
                batches = await consumer.getmany(timeout_ms=1000)
                messages = [m for ms in batches.values() for m in ms]
                idle = 0 if messages else idle + 1
                for message in messages:
                    text = message.value.decode(errors="replace")
                    texts.append(text)
                    event = json.loads(text)
                    seen[event.get("event_id", "")] += 1
                    if event.get("event_type") in _STATE_EVENTS:
                        node = str(event["payload"].get("node_id"))
                        # RFC 3339 UTC with a Z: the text orders as the time does.
                        moment = (event["timestamp"], event["event_type"])
                        latest[node] = max(latest.get(node, moment), moment)
        finally:
            await consumer.stop()
        lost = queued_ids - set(seen)
        self.figures.events = {
            "queued": len(queued_ids),
            "distinct_on_kafka": len(set(seen)),
            "duplicates": sum(count - 1 for count in seen.values()),
            "dead_letters": dead_letters,
        }
        if len(lost) > dead_letters:
            self.figures.problems.append(f"{len(lost)} queued events never reached Kafka (lost)")
        self._event_texts = texts
        self._last_outcome = {node: event_type for node, (_, event_type) in latest.items()}

    def _check_secrets(self, results: list[OperationResult]) -> None:
        """The planted secret is in no worker log, event, result or workflow history."""
        histories = [history.to_json() for history in self.histories]
        places = {
            "worker logs": self.workers.log_text(),
            "events": "\n".join(self._event_texts),
            "results": "\n".join(result.model_dump_json() for result in results),
            "histories": "\n".join(histories),
        }
        self.figures.injected["histories_searched"] = len(histories)
        for where, text in places.items():
            if CONSUL_TOKEN in text:
                self.figures.problems.append(f"the planted Consul token appears in {where}")


async def chaos(profile_name: str, seed: int) -> Figures:
    """One run; its directory (worker logs, the stack's logs) is kept when a check failed."""
    root = Path(tempfile.mkdtemp(prefix="onex-chaos-"))
    runner = Chaos(PROFILES[profile_name], seed, root)
    runner.figures.profile = profile_name
    figures = await runner.run()
    if figures.problems:
        progress(f"the worker logs are kept in {root / 'logs'}")
    else:
        shutil.rmtree(root, ignore_errors=True)
    return figures


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m tests.chaos", description=__doc__)
    parser.add_argument("--profile", choices=sorted(PROFILES), default="full")
    parser.add_argument("--seed", type=int, default=None, help="replay a run's schedule")
    args = parser.parse_args(argv)
    seed = args.seed or random.SystemRandom().randrange(1, 10**6)
    print(f"chaos: profile {args.profile}, seed {seed}", file=sys.stderr, flush=True)
    figures = asyncio.run(chaos(args.profile, seed))
    print(figures.as_json(), flush=True)
    return 1 if figures.problems else 0
