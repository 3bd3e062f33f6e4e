"""The shared fixtures start real servers that work, and isolate what tests share."""

from __future__ import annotations

import uuid

import asyncpg
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from aiokafka.admin import AIOKafkaAdminClient
from temporalio.api.operatorservice.v1 import ListSearchAttributesRequest
from temporalio.testing import WorkflowEnvironment
from temporalio.worker import Worker

from contracts.search_attributes import SEARCH_ATTRIBUTES
from contracts.topics import CATALOG
from tests.sample_workflows import SleepThenEchoWorkflow, echo
from tests.support import wait_until
from workers.settings import OnexSettings


async def _run_workflow(env: WorkflowEnvironment, task_queue: str) -> str:
    async with Worker(
        env.client, task_queue=task_queue, workflows=[SleepThenEchoWorkflow], activities=[echo]
    ):
        return await env.client.execute_workflow(
            SleepThenEchoWorkflow.run, "hello", id=f"wf-{uuid.uuid4()}", task_queue=task_queue
        )


async def test_time_skipping_server_skips_an_hour(
    time_skipping_env: WorkflowEnvironment, task_queue: str
) -> None:
    """A workflow sleeping an hour completes at once on the time-skipping server."""
    assert await _run_workflow(time_skipping_env, task_queue) == "HELLO"


async def test_dev_server_runs_workflows_and_has_the_search_attributes(
    temporal_env: WorkflowEnvironment, task_queue: str
) -> None:
    """The dev server runs a worker's workflow and knows the project's search attributes."""
    listed = await temporal_env.client.operator_service.list_search_attributes(
        ListSearchAttributesRequest(namespace=temporal_env.client.namespace)
    )
    assert set(SEARCH_ATTRIBUTES) <= set(listed.custom_attributes)
    async with Worker(
        temporal_env.client,
        task_queue=task_queue,
        workflows=[SleepThenEchoWorkflow],
        activities=[echo],
    ):
        handle = await temporal_env.client.start_workflow(
            SleepThenEchoWorkflow.run, "hi", id=f"wf-{uuid.uuid4()}", task_queue=task_queue
        )

        async def timer_started() -> bool:
            events = [event async for event in handle.fetch_history_events()]
            return any(event.HasField("timer_started_event_attributes") for event in events)

        await wait_until(timer_started, within=20, what="the workflow to start its timer")
        await handle.terminate("the hour-long timer is not worth waiting for on a real clock")


async def test_each_test_gets_its_own_database(backends: OnexSettings, pg_dsn: str) -> None:
    """pg_dsn is a fresh, empty database owned by the orchestrator's role."""
    connection = await asyncpg.connect(pg_dsn)
    try:
        tables = await connection.fetchval(
            "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
        )
        owner = await connection.fetchval(
            "SELECT pg_get_userbyid(datdba) FROM pg_database WHERE datname = current_database()"
        )
    finally:
        await connection.close()
    assert tables == 0
    assert owner == backends.postgres.user


async def test_topic_prefix_creates_the_catalog_with_three_partitions(
    backends: OnexSettings, topic_prefix: str
) -> None:
    """Every catalog topic exists under the test's prefix, with 3 partitions, and carries events."""
    bootstrap = backends.kafka.bootstrap_servers
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        names = [topic_prefix + topic.name for topic in CATALOG]
        described = await admin.describe_topics(names)
    finally:
        await admin.close()
    assert {d["topic"]: len(d["partitions"]) for d in described} == dict.fromkeys(names, 3)

    topic = names[0]
    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks="all")
    await producer.start()
    try:
        await producer.send_and_wait(topic, b"event", key=b"node-1")
    finally:
        await producer.stop()
    consumer = AIOKafkaConsumer(topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest")
    await consumer.start()
    try:
        assert (await consumer.getone()).value == b"event"
    finally:
        await consumer.stop()
