"""The liveness sweep end to end: nodes announced and heartbeating on Kafka, the Schedule's
sweeps on the Temporal dev server, the registry in PostgreSQL; short configured intervals."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import asyncpg
from temporalio.client import ScheduleHandle
from temporalio.testing import WorkflowEnvironment

from activities.liveness import Beat, read_nodes, upsert_heartbeats
from activities.resilience.breaker import BreakerRegistry
from contracts.fleet import FleetState, Liveness, LivenessSweepInput, LivenessSweepResult
from tests.fleet_support import with_ingress
from tests.stack import serving_stack
from tests.support import wait_until
from tests.workflows.scenarios import record
from workers.client import get_node_state
from workers.ingress import ingress_services
from workers.schedules import Applied, apply_schedules
from workers.simulate import NodeSimulator, simulated_fleet
from workflows.liveness import LivenessSweepWorkflow


async def test_a_node_that_stops_heartbeating_is_unhealthy_after_the_window(
    temporal_env: WorkflowEnvironment,
    backends: object,
    pg_dsn: str,
    topic_prefix: str,
    task_queue: str,
) -> None:
    """Three simulated nodes register through the ingress and heartbeat; one falls silent.
    The liveness Schedule (applied twice: created, then updated, never duplicated) sweeps every
    second with a 3 s window: the silent node becomes unhealthy, the others stay active. With
    the silence policy at 6 s, the silent node is then deregistered through the ingress and
    the per-node path (its node workflow accepted the register and one deregister)."""
    async with serving_stack(temporal_env, backends, pg_dsn, topic_prefix, task_queue) as stack:  # type: ignore[arg-type]
        settings = with_ingress(
            stack.settings,
            heartbeat_interval=0.5,
            liveness_window=3.0,
            jitter_limit=2.0,
            sweep_interval=1.0,
            deregister_after=6.0,
            schedule_id=f"liveness-{uuid.uuid4().hex[:8]}",
        )
        assert await apply_schedules(stack.client, settings) == {
            settings.ingress.schedule_id: Applied.CREATED
        }
        assert await apply_schedules(stack.client, settings) == {
            settings.ingress.schedule_id: Applied.UPDATED
        }, "applying the schedules again must update the existing one, not fail or duplicate"
        schedule: ScheduleHandle = stack.client.get_schedule_handle(settings.ingress.schedule_id)
        built = await ingress_services(settings, stack.client, BreakerRegistry())
        fleet = simulated_fleet(3, name="live")
        simulator = NodeSimulator(settings.kafka, fleet, silent=1, interval=0.5, silent_after=2)
        stop = asyncio.Event()
        tasks = [asyncio.create_task(service(stop)) for service in built.services.values()]
        tasks.append(asyncio.create_task(simulator.run(stop)))
        silent = simulator.silenced[0].node_id
        try:

            async def fleet_state() -> dict[uuid.UUID, FleetState]:
                connection = await asyncpg.connect(pg_dsn)
                try:
                    return {n.node_id: n.state for n in await read_nodes(connection)}
                finally:
                    await connection.close()

            async def silent_unhealthy() -> bool:
                states = await fleet_state()
                return len(states) == 3 and states[silent] is FleetState.UNHEALTHY

            await wait_until(silent_unhealthy, within=90, what="the silent node to be unhealthy")
            states = await fleet_state()

            async def silent_deregistered() -> bool:
                return (await fleet_state())[silent] is FleetState.INACTIVE

            await wait_until(
                silent_deregistered, within=90, what="the silence policy to deregister the node"
            )
            accepted = (await get_node_state(stack.client, silent)).accepted
        finally:
            stop.set()
            await asyncio.gather(*tasks, return_exceptions=True)
            await built.close()
            await schedule.delete()
    others = {node.node_id for node in fleet} - {silent}
    assert all(states[n] is FleetState.ACTIVE for n in others), (
        f"nodes still heartbeating must stay active: {states}"
    )
    assert built.dispatcher.stats.started == 4, "three registers and one deregister"
    assert accepted == 2, "the silent node: its register, then one deregister"


async def test_a_sweep_run_records_the_lost_node(
    temporal_env: WorkflowEnvironment,
    backends: object,
    pg_dsn: str,
    topic_prefix: str,
    task_queue: str,
) -> None:
    """One LivenessSweepWorkflow run marks a node silent past the window unhealthy and returns
    it as lost (the golden history ``liveness_sweep_lost`` comes from this run)."""
    node_id = uuid.uuid4()
    async with serving_stack(temporal_env, backends, pg_dsn, topic_prefix, task_queue) as stack:  # type: ignore[arg-type]
        connection = await asyncpg.connect(pg_dsn)
        try:
            await connection.execute(
                "INSERT INTO onex_nodes (node_id, node_type, node_version, service_name, address,"
                " port) VALUES ($1, 'effect', '1.0.0', 'svc', '127.0.0.1', 8080)",
                node_id,
            )
            old = datetime.now(UTC) - timedelta(seconds=300)
            await upsert_heartbeats(connection, [Beat(node_id, old, "ready")])
            handle = await stack.client.start_workflow(
                LivenessSweepWorkflow.run,
                LivenessSweepInput(),
                id=f"liveness-sweep-{uuid.uuid4().hex[:8]}",
                task_queue=task_queue,
            )
            result = await handle.result()
            await record(handle, "liveness_sweep_lost")
            views = await read_nodes(connection, node_id=node_id)
        finally:
            await connection.close()
    assert isinstance(result, LivenessSweepResult)
    assert result.lost == [node_id], f"the silent node must be reported lost: {result}"
    assert views[0].liveness is Liveness.UNHEALTHY
