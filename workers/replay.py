"""Replay recorded workflow histories against the current code (``onex replay``).

A history that no longer replays means a code change is not deterministic for workflows that
are already running: deploy it behind ``workflow.patched`` or as a new workflow version.

Encrypted histories replay with the converter of :func:`workers.converter.build_data_converter`
(the keys that wrote them); plaintext histories replay with either converter. A payload whose key
is not configured fails its replay with a message naming the missing key id.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from google.protobuf import json_format
from temporalio.api.common.v1 import Payload
from temporalio.client import Client, WorkflowHistory
from temporalio.converter import DataConverter
from temporalio.worker import Replayer

from workers.codec import ENCODING, PayloadCodecError
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
        undecodable = await _undecodable(history, data_converter)
        if undecodable is not None:
            outcomes.append(ReplayOutcome(history.workflow_id, False, undecodable))
            continue
        result = await replayer(workflows, data_converter=data_converter).replay_workflow(
            history, raise_on_replay_failure=False
        )
        outcomes.append(_outcome(history.workflow_id, result.replay_failure))
    return outcomes


async def _undecodable(history: WorkflowHistory, data_converter: DataConverter) -> str | None:
    """Why the history's encrypted payloads cannot be decrypted (the missing key id...), or None.

    Checked before replaying because a replay that meets such a payload reports only that the
    workflow task failed, not why.
    """
    encrypted = list(_encrypted_payloads(json.loads(history.to_json())))
    if not encrypted:
        return None
    codec = data_converter.payload_codec
    if codec is None:
        return (
            "the history holds encrypted payloads: replay it with ONEX_CODEC__ENABLED=true and "
            "the keys of the secret temporal.payload_key"
        )
    try:
        await codec.decode(encrypted)
    except PayloadCodecError as error:
        return str(error)
    return None


def _encrypted_payloads(node: Any) -> Iterator[Payload]:
    if isinstance(node, dict):
        metadata = node.get("metadata")
        if isinstance(metadata, dict) and metadata.get("encoding") == _ENCRYPTED:
            yield json_format.ParseDict(node, Payload(), ignore_unknown_fields=True)
            return
        for child in node.values():
            yield from _encrypted_payloads(child)
    elif isinstance(node, list):
        for child in node:
            yield from _encrypted_payloads(child)


_ENCRYPTED = base64.b64encode(ENCODING).decode()


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
