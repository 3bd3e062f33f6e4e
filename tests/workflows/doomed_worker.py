"""A worker process that stops answering while an event is being queued, to be SIGKILLed.

``python -m tests.workflows.doomed_worker TARGET TASK_QUEUE EVENT_NUMBER READY_FILE`` serves
the scripted backends on TASK_QUEUE; its EVENT_NUMBER-th event write writes READY_FILE and
never returns, so the workflow task that runs it (as a local activity) is lost with the
process, and times out on the server.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from temporalio.client import Client

from tests.workflows.scenarios import Backends, worker
from workers.converter import build_data_converter
from workers.settings import OnexSettings


async def main(target: str, task_queue: str, event_number: int, ready: Path) -> None:
    backends = Backends()

    async def hang(call: int) -> None:
        if call == event_number:
            ready.write_text("queuing\n")
            await asyncio.Event().wait()

    backends.script("postgres.enqueue_event", hang)
    client = await Client.connect(target, data_converter=await build_data_converter(OnexSettings()))
    async with worker(client, task_queue, backends):
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])))
