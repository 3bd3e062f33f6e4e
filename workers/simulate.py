"""``onex simulate-nodes``: a fleet of simulated nodes that announce themselves on Kafka.

Each simulated node publishes one introspection event (what the ingress registers), then a
heartbeat every ``interval`` seconds. ``silent`` of them stop heartbeating after the first
``silent_after`` rounds, which is what the liveness sweep should notice. The events are the
same envelopes real nodes send (:mod:`contracts.fleet`), published through an
:class:`~activities.kafka.EventPublisher`.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from activities.kafka import EventPublisher
from activities.resilience.breaker import BreakerRegistry
from activities.settings import KafkaSettings
from contracts.events import new_envelope
from contracts.fleet import SCHEMA_VERSION
from contracts.topics import TopicName

__all__ = ["NodeSimulator", "SimulatedNode", "simulated_fleet"]

SOURCE = "onex-simulator"
_TYPES = ("effect", "compute", "reducer", "orchestrator")


@dataclass(frozen=True)
class SimulatedNode:
    node_id: uuid.UUID
    service_name: str
    node_type: str
    port: int

    def introspection(self) -> dict[str, Any]:
        return {
            "schema_version": SCHEMA_VERSION,
            "node_id": str(self.node_id),
            "node_type": self.node_type,
            "node_version": "1.0.0",
            "service_name": self.service_name,
            "address": "127.0.0.1",
            "port": self.port,
            "tags": ["simulated"],
            "endpoints": {"health": f"http://127.0.0.1:{self.port}/health"},
            "metadata": {"simulated": "true"},
        }

    def heartbeat(self, state: str = "ready") -> dict[str, Any]:
        return {"schema_version": SCHEMA_VERSION, "node_id": str(self.node_id), "state": state}


def simulated_fleet(
    count: int, *, name: str = "sim", first_port: int = 20_000
) -> list[SimulatedNode]:
    """``count`` nodes with fresh ids, named ``<name>-<n>``, of every node type in turn."""
    return [
        SimulatedNode(uuid.uuid4(), f"{name}-{n}", _TYPES[n % len(_TYPES)], first_port + n)
        for n in range(count)
    ]


@dataclass
class NodeSimulator:
    """Publishes the fleet's introspection, then heartbeats; some nodes fall silent."""

    kafka: KafkaSettings
    nodes: Sequence[SimulatedNode]
    silent: int = 0
    interval: float = 30.0
    silent_after: int = 1
    rounds: int = 0
    heartbeats: int = 0
    _publisher: EventPublisher = field(init=False)

    def __post_init__(self) -> None:
        self._publisher = EventPublisher(self.kafka, BreakerRegistry())

    @property
    def silenced(self) -> list[SimulatedNode]:
        """The nodes that stop heartbeating (the last ``silent`` of the fleet)."""
        return list(self.nodes[len(self.nodes) - self.silent :]) if self.silent else []

    async def introduce(self) -> None:
        """Publish every node's introspection event."""
        await asyncio.gather(
            *(
                self._publish(TopicName.NODE_INTROSPECTION_PUBLISHED, node.introspection())
                for node in self.nodes
            )
        )

    async def beat(self) -> int:
        """One round of heartbeats (the silenced nodes skip it after ``silent_after``)."""
        quiet = (
            {node.node_id for node in self.silenced} if self.rounds >= self.silent_after else set()
        )
        speaking = [node for node in self.nodes if node.node_id not in quiet]
        await asyncio.gather(
            *(self._publish(TopicName.NODE_HEARTBEAT_PUBLISHED, n.heartbeat()) for n in speaking)
        )
        self.rounds += 1
        self.heartbeats += len(speaking)
        return len(speaking)

    async def run(self, stop: asyncio.Event, *, rounds: int | None = None) -> None:
        """Introduce the fleet, then heartbeat every ``interval`` until ``stop`` (or ``rounds``)."""
        try:
            await self.introduce()
            while not stop.is_set() and (rounds is None or self.rounds < rounds):
                await self.beat()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), self.interval)
        finally:
            await self._publisher.stop()

    async def close(self) -> None:
        await self._publisher.stop()

    async def _publish(self, topic: str, payload: dict[str, Any]) -> None:
        envelope = new_envelope(
            topic,
            payload,
            correlation_id=uuid.uuid4(),
            source=SOURCE,
            timestamp=datetime.now(UTC),
        )
        await self._publisher.publish_envelope(envelope)
