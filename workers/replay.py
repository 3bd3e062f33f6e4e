"""Replay recorded workflow histories against the current code (``onex replay``).

A history that no longer replays means a code change is not deterministic for workflows that
are already running: deploy it behind ``workflow.patched`` or as a new workflow version.

Encrypted histories replay with the converter of :func:`workers.converter.build_data_converter`
(the keys that wrote them); plaintext histories replay with either converter. A payload whose key
is not configured fails its replay with a message naming the missing key id.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from temporalio.client import Client, WorkflowHistory
from temporalio.converter import DataConverter
from temporalio.worker import Replayer

from workers.converter import DATA_CONVERTER
from workers.interceptors import CorrelationInterceptor
from workflows import WORKFLOWS


@dataclass(frozen=True)
class ReplayOutcome:
    name: str
    ok: bool
    error: str | None = None


def replayer(
    workflows: list[type] | None = None, *, data_converter: DataConverter = DATA_CONVERTER
) -> Replayer:
    return Replayer(
        workflows=workflows or WORKFLOWS,
        data_converter=data_converter,
        interceptors=[CorrelationInterceptor()],
    )


def load_histories(path: Path) -> list[WorkflowHistory]:
    """One history JSON file, or every ``*.json`` in a directory (sorted by name)."""
    files = sorted(path.glob("*.json")) if path.is_dir() else [path]
    return [WorkflowHistory.from_json(file.name, file.read_text()) for file in files]


def _outcome(name: str, error: Exception | None) -> ReplayOutcome:
    return ReplayOutcome(name, error is None, None if error is None else str(error))


async def replay_files(
    path: Path,
    *,
    workflows: list[type] | None = None,
    data_converter: DataConverter = DATA_CONVERTER,
) -> list[ReplayOutcome]:
    """Replay the histories of :func:`load_histories`; a failure is reported, not raised."""
    outcomes = []
    for history in load_histories(path):
        result = await replayer(workflows, data_converter=data_converter).replay_workflow(
            history, raise_on_replay_failure=False
        )
        outcomes.append(_outcome(history.workflow_id, result.replay_failure))
    return outcomes


async def replay_query(client: Client, query: str) -> list[ReplayOutcome]:
    """Replay the histories of the (closed or running) workflows a visibility query lists,
    with the client's data converter."""
    outcomes = []
    histories = client.list_workflows(query).map_histories()
    replaying = replayer(data_converter=client.data_converter)
    async with replaying.workflow_replay_iterator(histories) as results:
        async for result in results:
            outcomes.append(_outcome(result.history.workflow_id, result.replay_failure))
    return outcomes
