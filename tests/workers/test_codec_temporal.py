"""Encrypted payloads on a real Temporal server: what the history holds, key rotation with a
workflow in flight, and replay of an encrypted golden history with and without its keys."""

from __future__ import annotations

import json
import os
from typing import Any

from temporalio.client import Client, WorkflowHistory
from temporalio.testing import WorkflowEnvironment

from contracts.operations_io import OperationStatus
from contracts.search_attributes import NODE_ID, ONEX_OPERATION
from tests.support import readable_history, wait_until
from tests.workflows.scenarios import HISTORIES, Backends, plan, refused, start, worker
from workers.client import retry_failed
from workers.codec import KEY_ID_HEADER, PayloadKey, PayloadKeyring
from workers.converter import DATA_CONVERTER, encrypted_converter
from workers.replay import replay_files
from workflows.operation import OperationWorkflow

# Test keys, committed with the encrypted golden history they opened: never use them elsewhere.
OLD = PayloadKey("test-2025", bytes(range(32)))
NEW = PayloadKey("test-2026", bytes(range(32, 64)))
ENCRYPTED = HISTORIES / "encrypted"
ROTATION = ENCRYPTED / "register_key_rotation.json"
# Request fields of scenarios.request(): none may be readable in an encrypted history.
REQUEST_FIELDS = ("10.0.0.7", "billing", "http://10.0.0.7:8080/health", "1.2.3")


def client_with(env: WorkflowEnvironment, *keys: PayloadKey) -> Client:
    config: dict[str, Any] = dict(env.client.config())
    config["data_converter"] = encrypted_converter(PayloadKeyring(keys))
    return Client(**config)


def key_ids(history: WorkflowHistory) -> set[str]:
    found: set[str] = set()

    def walk(node: object) -> None:
        if isinstance(node, dict):
            metadata = node.get("metadata")
            if isinstance(metadata, dict) and KEY_ID_HEADER in metadata:
                import base64

                found.add(base64.b64decode(metadata[KEY_ID_HEADER]).decode())
            for child in node.values():
                walk(child)
        elif isinstance(node, list):
            for child in node:
                walk(child)

    walk(json.loads(history.to_json()))
    return found


async def test_keys_rotate_with_a_workflow_in_flight_and_the_history_hides_the_request(
    temporal_env: WorkflowEnvironment, task_queue: str
) -> None:
    """A workflow started under key test-2025 waits in partial; the worker restarts with
    test-2026 prepended and the retry completes it. Its history holds payloads of both keys,
    no request field is readable in it (the secret sweep), search attributes are plaintext,
    and the memo's per-backend summary is plain status words."""
    backends = Backends()
    backends.script("postgres.upsert_node", lambda n: refused(n) if n <= 3 else None)
    before = client_with(temporal_env, OLD)
    async with worker(before, task_queue, backends):
        handle = await start(before, task_queue, plan())

        async def partial() -> bool:
            status = await handle.query(OperationWorkflow.status)
            return status.status is OperationStatus.PARTIAL

        await wait_until(partial, within=60, what="the operation to become partial")

    after = client_with(temporal_env, NEW, OLD)
    async with worker(after, task_queue, backends):
        retried = await retry_failed(after, handle.id, "postgres")
        assert retried.status is OperationStatus.SUCCESS
        await after.get_workflow_handle(handle.id).result()

    history = await after.get_workflow_handle(handle.id).fetch_history()
    assert key_ids(history) == {OLD.key_id, NEW.key_id}, (
        "payloads written before the rotation keep the old key id, later ones the new: "
        "HOW TO FIX: the codec must encrypt with keyring.current and decrypt by key id"
    )
    sweep = readable_history(json.loads(history.to_json()))
    leaked = [field for field in REQUEST_FIELDS if field in sweep]
    assert leaked == [], f"request fields readable in the encrypted history: {leaked}"

    description = await after.get_workflow_handle(handle.id).describe()
    attributes = description.typed_search_attributes
    assert attributes.get(ONEX_OPERATION) == "register_node"
    assert attributes.get(NODE_ID) == "7d7f3c1e-4f7b-4c59-9a2e-1f0c2b3a4d5e", (
        "search attributes are never encrypted: they are for search, so nothing sensitive "
        "may be put there"
    )
    raw = description.raw_description.workflow_execution_info.memo.fields["backends"]
    assert raw.metadata["encoding"] == b"json/plain", "the memo summary must stay plaintext"
    assert json.loads(raw.data) == {"consul": "succeeded", "postgres": "succeeded"}

    if os.environ.get("ONEX_RECORD_HISTORIES") == "1" and not ROTATION.exists():
        ENCRYPTED.mkdir(exist_ok=True)
        ROTATION.write_text(history.to_json() + "\n")


async def test_the_encrypted_golden_history_replays_with_its_keys_only() -> None:
    """The committed encrypted history replays with both keys; without the old key the replay
    fails naming test-2025 (never a key); plaintext golden histories still replay with the
    encrypting converter."""
    assert ROTATION.exists(), "HOW TO FIX: run this file with ONEX_RECORD_HISTORIES=1 once"
    both = encrypted_converter(PayloadKeyring((NEW, OLD)))
    (ok,) = await replay_files(ROTATION, data_converter=both)
    assert ok.ok, ok.error

    (missing,) = await replay_files(
        ROTATION, data_converter=encrypted_converter(PayloadKeyring((NEW,)))
    )
    assert not missing.ok
    assert OLD.key_id in (missing.error or ""), (
        f"the failure must name the missing key id: {missing.error}"
    )
    assert OLD.key.hex() not in (missing.error or "")

    plaintext = await replay_files(HISTORIES, data_converter=both)
    assert plaintext, "the plaintext golden histories are missing"
    assert [o.error for o in plaintext if not o.ok] == [], "plaintext histories must replay"
    (unreadable,) = await replay_files(ROTATION, data_converter=DATA_CONVERTER)
    assert not unreadable.ok, "an encrypted history cannot replay without the codec"


def test_the_encrypted_golden_history_holds_no_request_field() -> None:
    """The committed encrypted history, swept like any other, shows no request field."""
    sweep = readable_history(json.loads(ROTATION.read_text()))
    assert [field for field in REQUEST_FIELDS if field in sweep] == []
