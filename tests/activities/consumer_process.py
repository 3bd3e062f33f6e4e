"""A :class:`~activities.kafka.DedupingConsumer` in a process of its own, for the kill test.

``python -m tests.activities.consumer_process --bootstrap HOST:PORT --prefix P --group G
--dsn DSN --mode stall|handle``

* ``stall``: the handler prints ``handling <event_id>`` and never returns, as a process that
  is killed in the middle of handling (before the message can be recorded as processed);
* ``handle``: the handler inserts ``<event_id>`` into ``consumer_effects`` (its effect) and
  prints ``handled <event_id>``; SIGTERM stops the consumer and the process exits 0.

Standard output carries only those lines; logs go to standard error.
"""

from __future__ import annotations

import argparse
import asyncio
import signal

import asyncpg

from activities.kafka import DedupingConsumer
from activities.postgres import PostgresIdempotencyStore
from activities.settings import KafkaSettings
from contracts.events import EventEnvelope
from tests.activities.kafka_support import REGISTERED
from workers.logging import configure_logging


async def main(arguments: argparse.Namespace) -> None:
    kafka = KafkaSettings(bootstrap_servers=arguments.bootstrap, topic_prefix=arguments.prefix)
    pool = await asyncpg.create_pool(arguments.dsn, min_size=1, max_size=2)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)

    async def stall(envelope: EventEnvelope) -> None:
        print(f"handling {envelope.event_id}", flush=True)
        await asyncio.Event().wait()  # killed here: handled in part, not recorded

    async def handle(envelope: EventEnvelope) -> None:
        await pool.execute("INSERT INTO consumer_effects (event_id) VALUES ($1)", envelope.event_id)
        print(f"handled {envelope.event_id}", flush=True)

    consumer = DedupingConsumer(
        kafka, [REGISTERED], group_id=arguments.group, store=PostgresIdempotencyStore(pool)
    )
    try:
        await consumer.run(stall if arguments.mode == "stall" else handle, stop=stop)
    finally:
        await consumer.stop()
        await pool.close()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    for option in ("--bootstrap", "--prefix", "--group", "--dsn"):
        parser.add_argument(option, required=True)
    parser.add_argument("--mode", choices=["stall", "handle"], required=True)
    configure_logging("warning", json=True)
    asyncio.run(main(parser.parse_args()))
