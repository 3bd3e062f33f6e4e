"""The fake Consul agent driven by the real python-consul2 asyncio client (``consul.aio``)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import consul
import consul.aio
import pytest
from consul import base as consul_errors

from tests.fakes import planted
from tests.fakes.consul_agent import FakeConsulAgent, consul_client

TOKEN = planted.CONSUL_TOKEN


@pytest.fixture
async def agent() -> AsyncIterator[FakeConsulAgent]:
    async with FakeConsulAgent(token=TOKEN) as agent:
        yield agent


@pytest.fixture
async def client(agent: FakeConsulAgent) -> AsyncIterator[consul.aio.Consul]:
    async with consul_client(agent, token=TOKEN) as client:
        yield client


async def _register(client: consul.aio.Consul, service_id: str = "node-1") -> bool:
    registered: bool = await client.agent.service.register(
        "onex-node",
        service_id=service_id,
        address="10.0.0.7",
        port=8080,
        tags=["onex", "v1"],
        meta={"node_id": service_id},
        check=consul.Check.http(
            "http://10.0.0.7:8080/health", "10s", timeout="2s", deregister="1m"
        ),
    )
    return registered


async def test_register_is_served_by_agent_services_and_health(
    agent: FakeConsulAgent, client: consul.aio.Consul
) -> None:
    """A registration with an HTTP check shows in /v1/agent/services and, its check passing, in
    /v1/health/service?passing; the fake keeps it with Consul's canonical key names."""
    assert isinstance(client, consul.aio.Consul)
    assert await _register(client) is True

    services = await client.agent.services()
    assert services["node-1"]["Service"] == "onex-node"
    assert services["node-1"]["Port"] == 8080
    assert services["node-1"]["Tags"] == ["onex", "v1"]
    assert services["node-1"]["Meta"] == {"node_id": "node-1"}

    assert agent.services["node-1"]["Check"] == {
        "HTTP": "http://10.0.0.7:8080/health",
        "Interval": "10s",
        "Timeout": "2s",
        "DeregisterCriticalServiceAfter": "1m",
    }

    index, nodes = await client.health.service("onex-node", passing=True)
    assert int(index) == agent.index
    assert [entry["Service"]["ID"] for entry in nodes] == ["node-1"]
    service_check = nodes[0]["Checks"][-1]
    assert service_check["CheckID"] == "service:node-1"
    assert service_check["Type"] == "http"
    assert service_check["Status"] == "passing"
    assert nodes[0]["Node"]["Datacenter"] == "dc1"


async def test_re_registering_replaces_the_service(
    agent: FakeConsulAgent, client: consul.aio.Consul
) -> None:
    """Registering the same ID again succeeds and replaces the registration (idempotent)."""
    assert await _register(client)
    assert await client.agent.service.register("onex-node", service_id="node-1", port=9090)
    assert list(agent.services) == ["node-1"]
    assert agent.services["node-1"]["Port"] == 9090
    assert (await client.agent.services())["node-1"]["Port"] == 9090


async def test_a_critical_check_is_not_passing(
    agent: FakeConsulAgent, client: consul.aio.Consul
) -> None:
    """With its check set critical, the service leaves ?passing results but stays listed
    without the filter, with the critical status."""
    await _register(client)
    agent.set_check_status("node-1", "critical")

    _, passing = await client.health.service("onex-node", passing=True)
    assert passing == []
    _, every = await client.health.service("onex-node")
    assert every[0]["Checks"][-1]["Status"] == "critical"


async def test_deregister_then_deregister_again(
    agent: FakeConsulAgent, client: consul.aio.Consul
) -> None:
    """Deregistering removes the service; deregistering an unknown ID gets Consul's 404, which
    python-consul2 turns into False (CB.bool allows 404), not into NotFound."""
    await _register(client)
    assert await client.agent.service.deregister("node-1") is True
    assert agent.services == {}
    assert await client.agent.service.deregister("node-1") is False
    method, path, _ = agent.requests[-1]
    assert (method, path) == ("PUT", "/v1/agent/service/deregister/node-1")


async def test_kv_put_get_recurse_delete(agent: FakeConsulAgent, client: consul.aio.Consul) -> None:
    """KV values round-trip as bytes with their indexes; recurse lists a prefix; a missing key
    reads as None; delete removes a key."""
    assert await client.kv.put("onex/nodes/a", "alpha") is True
    assert await client.kv.put("onex/nodes/b", b"beta", flags=7) is True
    assert agent.kv == {"onex/nodes/a": b"alpha", "onex/nodes/b": b"beta"}

    index, item = await client.kv.get("onex/nodes/a")
    assert item["Value"] == b"alpha"
    assert item["Key"] == "onex/nodes/a"
    assert int(index) == agent.index

    _, items = await client.kv.get("onex/nodes/", recurse=True)
    assert [(i["Key"], i["Value"], i["Flags"]) for i in items] == [
        ("onex/nodes/a", b"alpha", 0),
        ("onex/nodes/b", b"beta", 7),
    ]
    _, keys = await client.kv.get("onex/", keys=True, separator="/")
    assert keys == ["onex/nodes/"]

    assert await client.kv.get("onex/missing") == (str(agent.index), None)
    assert await client.kv.delete("onex/nodes/a") is True
    assert await client.kv.get("onex/nodes/a") == (str(agent.index), None)
    assert agent.kv == {"onex/nodes/b": b"beta"}


async def test_kv_check_and_set(agent: FakeConsulAgent, client: consul.aio.Consul) -> None:
    """?cas=0 writes only a new key; ?cas=N writes only if N is the key's ModifyIndex."""
    assert await client.kv.put("lock", "one", cas=0) is True
    assert await client.kv.put("lock", "two", cas=0) is False
    _, item = await client.kv.get("lock")
    assert await client.kv.put("lock", "three", cas=item["ModifyIndex"] + 1) is False
    assert await client.kv.put("lock", "three", cas=item["ModifyIndex"]) is True
    assert agent.kv["lock"] == b"three"


async def test_kv_indexes_tell_a_created_key_from_a_rewritten_one(
    agent: FakeConsulAgent, client: consul.aio.Consul
) -> None:
    """As on Consul, a key created once reads back with ModifyIndex == CreateIndex; a rewrite
    moves ModifyIndex on and keeps CreateIndex (what the pre-image reader relies on)."""
    assert await client.kv.put("onex/preimages/x", "one", cas=0) is True
    _, created = await client.kv.get("onex/preimages/x")
    assert created["ModifyIndex"] == created["CreateIndex"]

    assert await client.kv.put("onex/preimages/x", "two") is True
    _, rewritten = await client.kv.get("onex/preimages/x")
    assert rewritten["CreateIndex"] == created["CreateIndex"]
    assert rewritten["ModifyIndex"] > created["ModifyIndex"]


async def test_service_meta_is_checked_as_consul_does(
    agent: FakeConsulAgent, client: consul.aio.Consul
) -> None:
    """Meta keys of letters, digits, '_' and '-' with values up to 512 characters are kept and
    served back as given; an invalid key, the reserved 'consul-' prefix or a longer value is
    Consul's 400 "Invalid Service Meta" (python-consul2 raises BadRequest)."""
    meta = {"onex_writer": "onex-register-node-1/5f0c-run", "node-id": "n" * 512}
    assert await client.agent.service.register("onex-node", service_id="ok", meta=meta)
    assert (await client.agent.services())["ok"]["Meta"] == meta

    for bad in ({"has space": "x"}, {"consul-version": "x"}, {"k": "v" * 513}):
        with pytest.raises(consul_errors.BadRequest, match="Invalid Service Meta"):
            await client.agent.service.register("onex-node", service_id="bad", meta=bad)
    assert "bad" not in agent.services


async def test_catalog_datacenters_and_dc_parameter(
    agent: FakeConsulAgent, client: consul.aio.Consul
) -> None:
    """/v1/catalog/datacenters lists the configured datacenters; ?dc= of another known datacenter
    has no instances, an unknown one is Consul's 500 "No path to datacenter"."""
    assert await client.catalog.datacenters() == ["dc1"]
    agent.datacenters.append("dc2")
    assert await client.catalog.datacenters() == ["dc1", "dc2"]

    await _register(client)
    _, local = await client.health.service("onex-node", dc="dc1")
    assert len(local) == 1
    _, remote = await client.health.service("onex-node", dc="dc2")
    assert remote == []
    with pytest.raises(consul_errors.ConsulException, match="No path to datacenter"):
        await client.health.service("onex-node", dc="nowhere")


async def test_a_wrong_or_missing_token_is_permission_denied(agent: FakeConsulAgent) -> None:
    """Without the agent's token every call but datacenters is 403, which python-consul2 raises as
    ACLPermissionDenied; after rotate_token only the new token works."""
    async with consul_client(agent, token="not-the-token") as wrong:
        with pytest.raises(consul_errors.ACLPermissionDenied, match="Permission denied"):
            await wrong.agent.services()
        assert await wrong.catalog.datacenters() == ["dc1"]  # no ACL on this endpoint
    async with consul_client(agent) as anonymous:
        with pytest.raises(consul_errors.ACLPermissionDenied):
            await anonymous.kv.put("x", "y")
    assert agent.kv == {}

    agent.rotate_token("rotated-token-abcdef")
    async with (
        consul_client(agent, token=TOKEN) as old,
        consul_client(agent, token="rotated-token-abcdef") as new,
    ):
        with pytest.raises(consul_errors.ACLPermissionDenied):
            await old.agent.services()
        assert await new.agent.services() == {}


async def test_injected_5xx_then_recovery(
    agent: FakeConsulAgent, client: consul.aio.Consul
) -> None:
    """fail_next(1, 500) makes exactly one call raise ConsulException("500 <body>"); a 429 is a
    ClientError("429 ..."); the next call works."""
    agent.fail_next(1, 500)
    with pytest.raises(consul_errors.ConsulException) as caught:
        await client.agent.services()
    assert type(caught.value) is consul_errors.ConsulException
    assert str(caught.value).startswith("500 ")

    agent.fail_next(1, 429, "Too Many Requests", headers={"Retry-After": "3"})
    with pytest.raises(consul_errors.ClientError, match=r"^429 Too Many Requests"):
        await client.kv.get("anything")

    assert await client.agent.services() == {}


async def test_latency_with_a_caller_timeout(
    agent: FakeConsulAgent, client: consul.aio.Consul
) -> None:
    """consul.aio has no per-call timeout: a 2 s latency under asyncio.wait_for(0.5) raises
    TimeoutError (the client's session is closed by the cancellation)."""
    agent.set_latency(2)
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(client.agent.services(), 0.5)
    agent.set_latency(0)
    assert await client.agent.services() == {}


async def test_dropped_connections(agent: FakeConsulAgent, client: consul.aio.Consul) -> None:
    """aiohttp retries an idempotent request (GET, PUT, DELETE: every Consul call) once when the
    server closes the connection without answering, so one drop goes unnoticed and two drops raise
    aiohttp.ServerDisconnectedError."""
    agent.drop_next(1)
    assert await client.agent.services() == {}
    assert [path for _, path, _ in agent.requests] == ["/v1/agent/services"] * 2

    agent.drop_next(2)
    with pytest.raises(aiohttp.ServerDisconnectedError):
        await client.kv.put("k", "v")
    assert agent.kv == {}


async def test_agent_down_is_a_connector_error() -> None:
    """A stopped agent refuses connections: aiohttp.ClientConnectorError, an OSError."""
    agent = FakeConsulAgent()
    await agent.start()
    await agent.stop()
    async with consul_client(agent) as client:
        with pytest.raises(aiohttp.ClientConnectorError) as caught:
            await client.agent.services()
    assert isinstance(caught.value, OSError)


async def test_request_log_never_holds_the_token(
    agent: FakeConsulAgent, client: consul.aio.Consul
) -> None:
    """The request log has method, path and headers; the token header is "<redacted>" and the
    token appears nowhere in it."""
    await _register(client)
    await client.kv.put("k", "v")
    await client.kv.get("k")
    assert [(m, p) for m, p, _ in agent.requests] == [
        ("PUT", "/v1/agent/service/register"),
        ("PUT", "/v1/kv/k"),
        ("GET", "/v1/kv/k"),
    ]
    assert all(h["X-Consul-Token"] == "<redacted>" for _, _, h in agent.requests)
    assert TOKEN not in repr(agent.requests)


async def test_threaded_mode_serves_the_same_api() -> None:
    """FakeConsulAgent(threaded=True) serves from its own thread, for synchronous callers."""
    async with FakeConsulAgent(threaded=True) as agent, consul_client(agent) as client:
        assert await client.kv.put("k", "v") is True
        assert agent.kv == {"k": b"v"}
