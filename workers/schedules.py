"""The project's Temporal Schedules, created idempotently (``onex worker``, ``onex schedules
apply``).

One schedule so far: the liveness sweep (``ONEX_INGRESS__SCHEDULE_ID``, every
``ONEX_INGRESS__SWEEP_INTERVAL`` seconds) starts a
:class:`~workflows.liveness.LivenessSweepWorkflow` with the configured window, expected
interval and jitter limit. Applying creates it, or, when it exists, updates it to the current
settings, so a second apply (or every worker start) changes nothing but what the settings
changed. A sweep still running when the next is due makes that one skip (no overlap).
"""

from __future__ import annotations

from datetime import timedelta
from enum import StrEnum

from temporalio.client import (
    Client,
    Schedule,
    ScheduleActionStartWorkflow,
    ScheduleAlreadyRunningError,
    ScheduleIntervalSpec,
    ScheduleOverlapPolicy,
    SchedulePolicy,
    ScheduleSpec,
    ScheduleUpdate,
    ScheduleUpdateInput,
)

from contracts.fleet import LivenessSweepInput
from workers.settings import OnexSettings
from workflows.liveness import LivenessSweepWorkflow

__all__ = ["Applied", "apply_schedules", "liveness_schedule"]


class Applied(StrEnum):
    CREATED = "created"
    UPDATED = "updated"


def liveness_schedule(settings: OnexSettings) -> Schedule:
    """The liveness sweep's schedule, as the settings describe it."""
    ingress = settings.ingress
    return Schedule(
        action=ScheduleActionStartWorkflow(
            LivenessSweepWorkflow.run,
            LivenessSweepInput(
                window_seconds=ingress.liveness_window,
                expected_interval_seconds=ingress.heartbeat_interval,
                jitter_seconds=ingress.jitter_limit,
                deregister_after_seconds=ingress.deregister_after,
            ),
            id=f"{ingress.schedule_id}-run",
            task_queue=settings.worker.task_queue,
            execution_timeout=timedelta(seconds=max(ingress.sweep_interval * 10, 60)),
        ),
        spec=ScheduleSpec(
            intervals=[ScheduleIntervalSpec(every=timedelta(seconds=ingress.sweep_interval))]
        ),
        policy=SchedulePolicy(overlap=ScheduleOverlapPolicy.SKIP),
    )


async def apply_schedules(client: Client, settings: OnexSettings) -> dict[str, Applied]:
    """Create each schedule, or update it to the settings if it exists; what was done, by id."""
    schedule_id = settings.ingress.schedule_id
    schedule = liveness_schedule(settings)
    try:
        await client.create_schedule(schedule_id, schedule)
    except ScheduleAlreadyRunningError:

        def replace(_current: ScheduleUpdateInput) -> ScheduleUpdate:
            return ScheduleUpdate(schedule=schedule)

        await client.get_schedule_handle(schedule_id).update(replace)
        return {schedule_id: Applied.UPDATED}
    return {schedule_id: Applied.CREATED}
