"""The liveness sweep: started by a Temporal Schedule every 30 s (``onex schedules apply``).

One run is one sweep: the ``postgres.sweep_liveness`` activity marks the active nodes silent for
longer than the window ``unhealthy`` and those heard from again ``healthy``, queues their
``liveness_lost`` / ``liveness_restored`` events in the outbox (same transaction), and counts
the nodes whose heartbeat jitter exceeds the limit. Under the optional silence policy
(``deregister_after_seconds``, ``ONEX_INGRESS__DEREGISTER_AFTER``) a node silent that long is
deregistered: the activity queues a shutdown event on its behalf, which the ingress hands to
the node's workflow like any other. The schedule overlaps nothing (a sweep
still running makes the next one skip), so two sweeps never race; the activity is idempotent
anyway (a repeat finds nothing left to mark).
"""

from __future__ import annotations

from temporalio import workflow

with workflow.unsafe.imports_passed_through():
    from contracts.errors import Transport
    from contracts.fleet import LivenessSweepInput, LivenessSweepResult
    from contracts.resilience import default_policy

SWEEP_ACTIVITY = "postgres.sweep_liveness"


@workflow.defn
class LivenessSweepWorkflow:
    """One sweep of the fleet's heartbeats; see the module docstring."""

    @workflow.run
    async def run(self, sweep: LivenessSweepInput) -> LivenessSweepResult:
        result: LivenessSweepResult = await workflow.execute_activity(
            SWEEP_ACTIVITY,
            sweep,
            result_type=LivenessSweepResult,
            **default_policy(Transport.DATABASE).activity_options(),
        )
        if result.lost or result.restored or result.jittery or result.deregistering:
            workflow.logger.info(
                "liveness: %d lost, %d restored, %d unhealthy, %d jittery of %d",
                len(result.lost),
                len(result.restored),
                result.unhealthy,
                result.jittery,
                result.tracked,
            )
        return result
