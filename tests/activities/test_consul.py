"""The Consul handler against the fake Consul agent, driven by the real ``consul.aio`` client.

Operations are checked for their effect on the agent's state and for their idempotency;
failures are run through the real activity boundary to see the error class Temporal would see.
"""

from __future__ import annotations

import gc
import json
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from typing import Any

import consul.aio
import pytest
import structlog
from pydantic import SecretStr
from temporalio.exceptions import ApplicationError

from activities.base import HandlerConfig, HandlerResources
from activities.consul import (
    CLIENT_FACTORY,
    DISABLED_REASON,
    TOKEN_SECRET,
    ConsulHandler,
    KvGetRequest,
    KvPutRequest,
    ServiceHealthRequest,
)
from activities.resilience.boundary import ActivityBoundary
from activities.resilience.breaker import BreakerRegistry, BreakerState
from activities.resilience.correlation import correlation_scope
from activities.settings import ConsulSettings
from contracts.errors import (
    ConfigurationError,
    InfraConnectionError,
    InfraDataIntegrityError,
    Transport,
)
from contracts.registry import (
    CompensationInput,
    DeregisterNodeRequest,
    RegisterServiceResult,
)
from contracts.resilience import default_policy
from tests.activities.runs import Run, ambiguous, deregister_run, register_run
from tests.builders import compensation, deregister_request, register_request
from tests.fakes import planted
from tests.fakes.consul_agent import CRITICAL, FakeConsulAgent, consul_client
from tests.support import free_port

TOKEN = planted.CONSUL_TOKEN
ROTATED = "consul-acl-token-rotated-9876"
OPERATIONS = (
    "register_service",
    "undo_register_service",
    "deregister_service",
    "undo_deregister_service",
    "service_health",
    "kv_get",
    "kv_put",
)
CHECK_SETTINGS: dict[str, Any] = {
    "check_interval": "7s",
    "check_timeout": "3s",
    "deregister_critical_after": "2m",
}


class RecordingFactory:
    """``consul.client_factory``: the fake's ``consul_client`` helper, counting the clients built
    (and remembering the tokens they were given, to check which one a rebuild used)."""

    def __init__(self) -> None:
        self.tokens: list[str | None] = []

    def __call__(self, **options: Any) -> AbstractAsyncContextManager[consul.aio.Consul]:
        self.tokens.append(options.get("token"))
        return consul_client(**options)


class CachingSecrets:
    """A secret source with a cache: ``refresh`` picks up what the store holds now."""

    def __init__(self, cached: str, stored: str | None = None) -> None:
        self.cached = cached
        self.stored = cached if stored is None else stored
        self.refreshed: list[str] = []

    async def get_secret(self, name: str, *, required: bool = True) -> SecretStr:
        assert name == TOKEN_SECRET
        return SecretStr(self.cached)

    async def refresh(self, name: str) -> None:
        self.refreshed.append(name)
        self.cached = self.stored


class FakeClock:
    """The breakers' monotonic clock, moved by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def handler_config() -> HandlerConfig:
    return HandlerConfig(
        handler_name="consul",
        transport=Transport.CONSUL,
        operations=OPERATIONS,
        policy=default_policy(Transport.CONSUL),
    )


def make_handler(
    address: str | None,
    *,
    token: str | None = TOKEN,
    factory: RecordingFactory | bool | None = None,
    breakers: BreakerRegistry | None = None,
    secrets: CachingSecrets | None = None,
    **consul_settings: Any,
) -> ConsulHandler:
    settings = ConsulSettings(
        address=address,
        token=None if token is None else SecretStr(token),
        **{**CHECK_SETTINGS, **consul_settings},
    )
    return ConsulHandler(
        HandlerResources(
            settings=settings,
            breakers=breakers or BreakerRegistry(),
            secrets=secrets,
            # factory=False: the production client, as the worker builds it.
            clients={} if factory is False else {CLIENT_FACTORY: factory or RecordingFactory()},
        )
    )


def boundary(handler: ConsulHandler, breakers: BreakerRegistry | None = None) -> ActivityBoundary:
    """The real activity boundary, as the worker builds it for this handler."""
    return ActivityBoundary(
        transport=Transport.CONSUL,
        target=handler.target,
        policy=default_policy(Transport.CONSUL),
        breakers=breakers or BreakerRegistry(),
        breaker_key=handler.breaker_key,
    )


async def failure_through_boundary(
    handler: ConsulHandler, operation: Callable[[Any], Awaitable[Any]], argument: Any
) -> ApplicationError:
    with pytest.raises(ApplicationError) as failed:
        await boundary(handler).wrap("register_service", operation)(argument)
    return failed.value


@pytest.fixture
async def agent() -> AsyncIterator[FakeConsulAgent]:
    async with FakeConsulAgent(token=TOKEN, datacenters=["dc1", "dc2"]) as agent:
        yield agent


@pytest.fixture
async def handler(agent: FakeConsulAgent) -> AsyncIterator[ConsulHandler]:
    """An initialized handler on the agent, with the right token, shut down afterwards."""
    handler = make_handler(agent.address)
    await handler.initialize(handler_config())
    try:
        yield handler
    finally:
        await handler.shutdown(5)


# -- registration --------------------------------------------------------------------------------


async def test_register_service_with_tags_meta_and_http_check(
    agent: FakeConsulAgent, handler: ConsulHandler
) -> None:
    """The node is registered as onex-<type>-<id> / onex-<type> with its address and port, the
    onex tags before its own, meta with node_id, node_version, correlation_id, the health URL and
    the writer (outside an activity: the correlation id), and an HTTP check on its health
    endpoint timed by the settings; nothing was there before."""
    request = register_request()
    service_id = f"onex-effect-{request.node_id}"

    result = await handler.register_service(request)

    assert result == RegisterServiceResult(
        service_id=service_id, service_name="onex-effect", previous=None
    )
    registration = agent.services[service_id]
    assert registration["Name"] == "onex-effect"
    assert (registration["Address"], registration["Port"]) == ("10.0.0.7", 8080)
    assert registration["Tags"] == ["onex", "node-type:effect", "blue", "eu-west-1"]
    assert registration["Meta"] == {
        "node_id": str(request.node_id),
        "node_version": "1.2.3",
        "correlation_id": str(request.correlation_id),
        "health_url": "http://10.0.0.7:8080/health",
        "onex_writer": f"correlation:{request.correlation_id}",
    }
    assert registration["Check"] == {
        "HTTP": "http://10.0.0.7:8080/health",
        "Interval": "7s",
        "Timeout": "3s",
        "DeregisterCriticalServiceAfter": "2m",
    }


async def test_correlation_id_comes_from_the_context_when_the_request_has_none(
    agent: FakeConsulAgent, handler: ConsulHandler
) -> None:
    """A request without a correlation id gets the one bound to the current task."""
    request = register_request(correlation_id=None)
    correlation_id = uuid.uuid4()

    with correlation_scope(correlation_id):
        result = await handler.register_service(request)

    assert agent.services[result.service_id]["Meta"]["correlation_id"] == str(correlation_id)


async def test_register_again_is_idempotent(agent: FakeConsulAgent, handler: ConsulHandler) -> None:
    """Registering the same node again (a retry: same correlation id) succeeds, leaves one
    registration unchanged, and reports the first attempt's pre-image (nothing), not the
    registration that attempt wrote."""
    request = register_request()
    first = await handler.register_service(request)
    registered = dict(agent.services[first.service_id])

    again = await handler.register_service(request)

    assert list(agent.services) == [first.service_id]
    assert agent.services[first.service_id] == registered
    assert first.previous is None
    assert again.previous is None


async def test_undo_register_after_a_fresh_register_removes_it(
    agent: FakeConsulAgent, handler: ConsulHandler
) -> None:
    """Undoing a registration that replaced nothing deregisters the service; undoing it again
    finds it gone, which is a success that changes nothing."""
    request = register_request()
    result = await handler.register_service(request)

    undone = await handler.undo_register_service(compensation(request, result))
    assert undone.action == "deregistered"
    assert agent.services == {}

    again = await handler.undo_register_service(compensation(request, result))
    assert again.action == "unchanged"
    assert agent.services == {}


async def test_undo_register_after_a_re_register_restores_the_previous_definition(
    agent: FakeConsulAgent, handler: ConsulHandler
) -> None:
    """A registration that replaced another is undone by registering the replaced definition
    again, exactly (address, port, tags, meta and HTTP check); a second undo finds it so and
    changes nothing."""
    node_id = uuid.uuid4()
    original = register_request(node_id)
    await handler.register_service(original)
    original_registration = dict(agent.services[f"onex-effect-{node_id}"])
    update = register_request(
        node_id,
        node_version="1.3.0",
        port=9090,
        tags=("green",),
        endpoints={"health": "http://10.0.0.7:9090/healthz"},
    )
    result = await handler.register_service(update)
    assert agent.services[result.service_id]["Port"] == 9090

    undone = await handler.undo_register_service(compensation(update, result))

    assert undone.action == "restored"
    assert agent.services[result.service_id] == original_registration
    again = await handler.undo_register_service(compensation(update, result))
    assert again.action == "unchanged"
    assert agent.services[result.service_id] == original_registration


async def test_undo_register_rejects_a_foreign_forward_result(handler: ConsulHandler) -> None:
    """A forward_result that is not a register_service result is a ConfigurationError."""
    request = register_request()
    bad = CompensationInput(request=request.model_dump(mode="json"), forward_result={"x": 1})
    with pytest.raises(ConfigurationError, match="forward_result"):
        await handler.undo_register_service(bad)


# -- retries after a lost reply (pre-images) -----------------------------------------------------


def preimage_key(service_id: str, correlation_id: uuid.UUID | None, operation: str) -> str:
    """Outside an activity the writer is the request's correlation id (activities.writer)."""
    return f"onex/preimages/{service_id}/correlation:{correlation_id}/{operation}"


def preimage_keys(agent: FakeConsulAgent) -> list[str]:
    return sorted(key for key in agent.kv if key.startswith("onex/preimages/"))


async def test_retried_register_of_a_new_service_lets_undo_deregister_it(
    agent: FakeConsulAgent, handler: ConsulHandler
) -> None:
    """A register_service retried after a lost reply reports the true pre-image (no
    registration) both times, stored once under onex/preimages/ with the "absent" sentinel, so
    the undo deregisters the service instead of "restoring" the first attempt's write."""
    request = register_request()
    lost = await handler.register_service(request)  # registered; Temporal never saw this

    retried = await handler.register_service(request)

    assert lost.previous is None
    assert retried.previous is None
    key = preimage_key(retried.service_id, request.correlation_id, "register_service")
    assert preimage_keys(agent) == [key]
    assert json.loads(agent.kv[key]) == {"state": "absent"}
    undone = await handler.undo_register_service(compensation(request, retried))
    assert undone.action == "deregistered"
    assert agent.services == {}


async def test_retried_register_over_an_existing_service_reports_the_original(
    agent: FakeConsulAgent, handler: ConsulHandler
) -> None:
    """A registration that replaced another, retried after a lost reply, reports the original
    registration as previous both times, so its undo puts the original back exactly."""
    node_id = uuid.uuid4()
    await handler.register_service(register_request(node_id))
    service_id = f"onex-effect-{node_id}"
    original = dict(agent.services[service_id])
    update = register_request(node_id, port=9090, tags=("green",))

    lost = await handler.register_service(update)
    retried = await handler.register_service(update)

    assert lost.previous is not None
    assert retried.previous == lost.previous
    assert retried.previous["Port"] == 8080
    assert retried.previous["Meta"] == original["Meta"]
    assert agent.services[service_id]["Port"] == 9090
    undone = await handler.undo_register_service(compensation(update, retried))
    assert undone.action == "restored"
    assert agent.services[service_id] == original


async def test_retried_deregister_reports_the_registration_so_undo_restores_it(
    agent: FakeConsulAgent, handler: ConsulHandler
) -> None:
    """A deregistration retried after a lost reply reports the removed registration and
    existed=True both times (not "already gone"), so its undo registers the service again."""
    node_id = uuid.uuid4()
    await handler.register_service(register_request(node_id))
    registration = dict(agent.services[f"onex-effect-{node_id}"])
    request = deregister_request(node_id)

    lost = await handler.deregister_service(request)
    retried = await handler.deregister_service(request)

    assert agent.services == {}
    assert lost.existed is True
    assert retried.existed is True
    assert retried.previous is not None
    assert retried.previous == lost.previous
    undone = await handler.undo_deregister_service(compensation(request, retried))
    assert undone.action == "restored"
    assert agent.services[retried.service_id] == registration


async def test_a_different_correlation_id_is_a_new_operation(
    agent: FakeConsulAgent, handler: ConsulHandler
) -> None:
    """Another correlation id names another operation: it stores and reports the registration as
    it is then (the first operation's write)."""
    node_id = uuid.uuid4()
    first = await handler.register_service(register_request(node_id))
    written = dict(agent.services[first.service_id])

    second = await handler.register_service(register_request(node_id, port=7000))

    assert first.previous is None
    assert second.previous is not None
    assert (second.previous["Port"], second.previous["Meta"]) == (8080, written["Meta"])
    removed = await handler.deregister_service(deregister_request(node_id))
    assert removed.previous is not None
    assert removed.previous["Port"] == 7000
    assert len(preimage_keys(agent)) == 3


async def test_requests_without_a_correlation_id_store_no_pre_image(
    agent: FakeConsulAgent, handler: ConsulHandler
) -> None:
    """Without a correlation id there is no operation to key a pre-image on: nothing is stored
    and a repeat reports the registration as it is now (the behaviour before pre-images)."""
    request = register_request(correlation_id=None)
    first = await handler.register_service(request)

    again = await handler.register_service(request)

    assert first.previous is None
    assert again.previous is not None
    assert again.previous["ID"] == first.service_id
    deregister = DeregisterNodeRequest(node_id=request.node_id, node_type="effect")
    assert (await handler.deregister_service(deregister)).existed is True
    assert (await handler.deregister_service(deregister)).existed is False
    assert preimage_keys(agent) == []


async def test_a_pre_image_key_holding_something_else_is_a_configuration_error(
    agent: FakeConsulAgent, handler: ConsulHandler
) -> None:
    """A pre-image key this handler did not write (not its JSON) is refused as a
    ConfigurationError, and nothing is registered."""
    request = register_request()
    agent.kv[
        preimage_key(request.consul_service_id, request.correlation_id, "register_service")
    ] = b"not json"

    with pytest.raises(ConfigurationError, match="pre-image"):
        await handler.register_service(request)
    assert agent.services == {}


# -- deregistration ------------------------------------------------------------------------------


async def test_deregister_existing_returns_the_previous_registration(
    agent: FakeConsulAgent, handler: ConsulHandler
) -> None:
    """Deregistering a registered node removes it: existed True, previous its registration."""
    node_id = uuid.uuid4()
    registered = await handler.register_service(register_request(node_id))

    result = await handler.deregister_service(deregister_request(node_id))

    assert result.service_id == registered.service_id
    assert result.existed is True
    assert result.previous is not None
    assert result.previous["Meta"]["node_id"] == str(node_id)
    assert agent.services == {}


async def test_deregister_missing_is_a_success(
    agent: FakeConsulAgent, handler: ConsulHandler
) -> None:
    """Deregistering a node Consul does not know succeeds with existed False (already gone)."""
    node_id = uuid.uuid4()

    result = await handler.deregister_service(deregister_request(node_id))

    assert result.service_id == f"onex-effect-{node_id}"
    assert result.existed is False
    assert result.previous is None
    assert ("PUT", f"/v1/agent/service/deregister/{result.service_id}") in [
        (method, path) for method, path, _ in agent.requests
    ]


async def test_undo_deregister_registers_the_service_again(
    agent: FakeConsulAgent, handler: ConsulHandler
) -> None:
    """Undoing a deregistration registers the removed definition again (check included);
    undoing one that found nothing changes nothing."""
    node_id = uuid.uuid4()
    await handler.register_service(register_request(node_id))
    registration = dict(agent.services[f"onex-effect-{node_id}"])
    request = deregister_request(node_id)
    removed = await handler.deregister_service(request)

    undone = await handler.undo_deregister_service(compensation(request, removed))

    assert undone.action == "restored"
    assert agent.services[removed.service_id] == registration

    missing_request = deregister_request(uuid.uuid4())
    missing = await handler.deregister_service(missing_request)
    nothing = await handler.undo_deregister_service(compensation(missing_request, missing))
    assert nothing.action == "unchanged"
    assert list(agent.services) == [removed.service_id]


# -- health and KV -------------------------------------------------------------------------------


# -- fenced undo: an undo never destroys newer work ------------------------------------------


async def test_register_records_its_run_in_the_service_meta(
    agent: FakeConsulAgent, handler: ConsulHandler
) -> None:
    """In an activity, the writer is the workflow id and run id: it goes in the service Meta
    and names the pre-image key (a run of its own, whatever the correlation id)."""
    request = register_request()
    run = register_run(request.node_id)

    result = await run(handler.register_service, request)

    assert agent.services[result.service_id]["Meta"]["onex_writer"] == run.writer
    assert preimage_keys(agent) == [
        f"onex/preimages/{result.service_id}/{run.writer}/register_service"
    ]


async def test_undo_register_leaves_a_newer_registration_alone(
    agent: FakeConsulAgent, handler: ConsulHandler
) -> None:
    """Run A registered the node, run B registered it again since: A's undo neither removes
    nor overwrites B's definition: superseded, naming B's workflow id, twice the same."""
    node_id = uuid.uuid4()
    first, newer = register_run(node_id), Run(f"onex-register-node-{node_id}-again")
    request = register_request(node_id)
    result = await first(handler.register_service, request)
    await newer(handler.register_service, register_request(node_id, port=9999))
    registration = dict(agent.services[result.service_id])

    for _ in range(2):
        undone = await first(handler.undo_register_service, compensation(request, result))

        assert undone.action == "superseded", "the undo must not destroy a newer registration"
        assert undone.reason is not None
        assert newer.workflow_id in undone.reason
        assert newer.run_id not in undone.reason
        assert agent.services[result.service_id] == registration


async def test_undo_register_after_a_deregister_is_superseded_and_registers_nothing(
    agent: FakeConsulAgent, handler: ConsulHandler
) -> None:
    """Scenario 1 on Consul: run A re-registered a node over an older definition, run B
    deregistered it since; A's undo does not bring the old definition back."""
    node_id = uuid.uuid4()
    await register_run(node_id)(handler.register_service, register_request(node_id))
    first = register_run(node_id)
    update = register_request(node_id, port=9999)
    result = await first(handler.register_service, update)
    await deregister_run(node_id)(handler.deregister_service, deregister_request(node_id))

    undone = await first(handler.undo_register_service, compensation(update, result))

    assert undone.action == "superseded"
    assert undone.reason == "the service was deregistered since"
    assert agent.services == {}, "the undo resurrected a deregistered service"


async def test_undo_register_of_our_own_registration_acts_once(
    agent: FakeConsulAgent, handler: ConsulHandler
) -> None:
    """While the service is still this run's registration, the undo restores what it replaced
    (or removes it); a replay finds it so and changes nothing."""
    node_id = uuid.uuid4()
    await register_run(node_id)(handler.register_service, register_request(node_id))
    original = dict(agent.services[f"onex-effect-{node_id}"])
    run = register_run(node_id)
    update = register_request(node_id, port=9999)
    result = await run(handler.register_service, update)
    undo = compensation(update, result)

    assert (await run(handler.undo_register_service, undo)).action == "restored"
    assert agent.services[result.service_id] == original
    assert (await run(handler.undo_register_service, undo)).action == "unchanged"
    assert agent.services[result.service_id] == original


async def test_undo_deregister_only_while_the_service_is_still_absent(
    agent: FakeConsulAgent, handler: ConsulHandler
) -> None:
    """A deregister's undo registers the removed definition again while the service is absent
    (then a replay is unchanged); after another run registered the node, it is superseded and
    leaves that registration as it is."""
    node_id = uuid.uuid4()
    await register_run(node_id)(handler.register_service, register_request(node_id))
    original = dict(agent.services[f"onex-effect-{node_id}"])
    run = deregister_run(node_id)
    request = deregister_request(node_id)
    removed = await run(handler.deregister_service, request)
    undo = compensation(request, removed)

    assert (await run(handler.undo_deregister_service, undo)).action == "restored"
    assert agent.services[removed.service_id] == original
    assert (await run(handler.undo_deregister_service, undo)).action == "unchanged"

    again = deregister_run(node_id)
    request = deregister_request(node_id)
    removed = await again(handler.deregister_service, request)
    newer = register_run(node_id)
    await newer(handler.register_service, register_request(node_id, port=7000))
    newer_registration = dict(agent.services[removed.service_id])

    undone = await again(handler.undo_deregister_service, compensation(request, removed))
    assert undone.action == "superseded"
    assert undone.reason is not None
    assert newer.workflow_id in undone.reason
    assert agent.services[removed.service_id] == newer_registration


async def test_ambiguous_undo_uses_the_pre_image_this_run_stored(
    agent: FakeConsulAgent, handler: ConsulHandler
) -> None:
    """Scenario 5 on Consul: a register whose reply was lost (the agent applied it) is undone
    from the run's stored pre-image (deregistered, then unchanged on a replay); a run that
    never got to write finds no pre-image and leaves another run's service as it is; an
    ambiguous deregister is undone the same way."""
    request = register_request()
    run = register_run(request.node_id)
    await run(handler.register_service, request)  # applied; the reply was lost
    undo = ambiguous(request, "consul.register_service")

    assert (await run(handler.undo_register_service, undo)).action == "deregistered"
    assert (await run(handler.undo_register_service, undo)).action == "unchanged"
    assert agent.services == {}

    await register_run(request.node_id)(handler.register_service, request)
    registration = dict(agent.services[request.consul_service_id])
    never = register_run(request.node_id)
    assert (await never(handler.undo_register_service, undo)).action == "unchanged"
    assert agent.services[request.consul_service_id] == registration

    removal = deregister_request(request.node_id)
    deregister = deregister_run(request.node_id)
    await deregister(handler.deregister_service, removal)
    undo_removal = ambiguous(removal, "consul.deregister_service")
    assert (await deregister(handler.undo_deregister_service, undo_removal)).action == "restored"
    assert agent.services[request.consul_service_id] == registration


async def test_a_pre_image_rewritten_after_it_was_stored_is_not_trusted(
    agent: FakeConsulAgent, handler: ConsulHandler
) -> None:
    """Pre-image keys are create-only: one whose ModifyIndex moved past its CreateIndex was
    rewritten by someone else, and an undo from it is refused (InfraDataIntegrityError)
    rather than restoring a definition nobody recorded."""
    request = register_request()
    run = register_run(request.node_id)
    await run(handler.register_service, request)
    key = f"onex/preimages/{request.consul_service_id}/{run.writer}/register_service"
    await handler.kv_put(KvPutRequest(key=key, value='{"state": "absent"}'))

    with pytest.raises(InfraDataIntegrityError, match="rewritten"):
        await run(handler.undo_register_service, ambiguous(request, "consul.register_service"))
    assert request.consul_service_id in agent.services


async def test_service_health_counts_passing_instances_only(
    agent: FakeConsulAgent, handler: ConsulHandler
) -> None:
    """Two registered instances pass; with one's check critical only the other is counted."""
    first = await handler.register_service(register_request(address="10.0.0.1", port=8001))
    second = await handler.register_service(register_request(address="10.0.0.2", port=8002))
    request = ServiceHealthRequest(service_name="onex-effect")

    healthy = await handler.service_health(request)
    assert healthy.passing == 2
    assert {(i.service_id, i.address, i.port) for i in healthy.instances} == {
        (first.service_id, "10.0.0.1", 8001),
        (second.service_id, "10.0.0.2", 8002),
    }

    agent.set_check_status(first.service_id, CRITICAL)
    degraded = await handler.service_health(request)
    assert degraded.passing == 1
    assert [i.service_id for i in degraded.instances] == [second.service_id]

    nobody = await handler.service_health(ServiceHealthRequest(service_name="onex-compute"))
    assert (nobody.passing, nobody.instances) == (0, ())


async def test_kv_put_get_recurse_and_missing(
    agent: FakeConsulAgent, handler: ConsulHandler
) -> None:
    """Values round-trip as UTF-8 text; recurse reads a prefix; a missing key or prefix reads as
    None; an empty value is ""; bytes that are not UTF-8 are a ConfigurationError."""
    put = await handler.kv_put(KvPutRequest(key="onex/nodes/a", value="alpha ✓"))
    assert (put.key, put.ok) == ("onex/nodes/a", True)
    assert (await handler.kv_put(KvPutRequest(key="onex/nodes/b", value=""))).ok
    assert agent.kv["onex/nodes/a"] == "alpha ✓".encode()

    single = await handler.kv_get(KvGetRequest(key="onex/nodes/a"))
    assert (single.key, single.value, single.values) == ("onex/nodes/a", "alpha ✓", None)
    assert (await handler.kv_get(KvGetRequest(key="onex/nodes/b"))).value == ""

    prefix = await handler.kv_get(KvGetRequest(key="onex/nodes/", recurse=True))
    assert prefix.values == {"onex/nodes/a": "alpha ✓", "onex/nodes/b": ""}
    assert prefix.value is None

    assert (await handler.kv_get(KvGetRequest(key="onex/missing"))).value is None
    assert (await handler.kv_get(KvGetRequest(key="nothing/", recurse=True))).values is None

    agent.kv["onex/binary"] = b"\xff\xfe"
    with pytest.raises(ConfigurationError, match="UTF-8"):
        await handler.kv_get(KvGetRequest(key="onex/binary"))
    with pytest.raises(ValueError, match="key"):
        KvGetRequest(key="/leading-slash")


# -- lifecycle -----------------------------------------------------------------------------------


async def test_start_up_checks_the_configured_datacenter(agent: FakeConsulAgent) -> None:
    """A datacenter the agent knows is accepted (and keys the target and breaker); an unknown
    one fails initialize with a ConfigurationError naming it and the available ones."""
    known = make_handler(agent.address, datacenter="dc2")
    await known.initialize(handler_config())
    try:
        assert (known.target, known.breaker_key()) == ("consul-dc2", "dc2")
        assert known.describe().details["datacenters"] == ["dc1", "dc2"]
    finally:
        await known.shutdown(5)

    unknown = make_handler(agent.address, datacenter="dc9")
    with pytest.raises(ConfigurationError) as failed:
        await unknown.initialize(handler_config())
    assert "'dc9'" in str(failed.value)
    assert "dc1, dc2" in str(failed.value)
    assert unknown.describe().details["initialized"] is False


async def test_start_up_fails_when_the_agent_is_unreachable() -> None:
    """Nothing listening at the address: initialize raises a (retryable) InfraConnectionError."""
    handler = make_handler(f"127.0.0.1:{free_port()}")
    with pytest.raises(InfraConnectionError, match="initialize on consul-default"):
        await handler.initialize(handler_config())


async def test_disabled_without_an_address() -> None:
    """No address: enabled False with the reason; initialize builds nothing."""
    factory = RecordingFactory()
    handler = make_handler(None, factory=factory)

    await handler.initialize(handler_config())

    assert handler.enabled is False
    assert handler.disabled_reason == DISABLED_REASON
    description = handler.describe()
    assert (description.enabled, description.disabled_reason) == (False, DISABLED_REASON)
    assert factory.tokens == []
    await handler.shutdown(5)


async def test_production_client_works_and_is_discarded_quietly(agent: FakeConsulAgent) -> None:
    """Without an injected factory the handler builds python-consul2's client itself: it
    registers, and neither its construction (DeprecationWarnings) nor its disposal after
    shutdown (ResourceWarning from HTTPClient.__del__) warns, with warnings as errors."""
    handler = make_handler(agent.address, factory=False)
    await handler.initialize(handler_config())
    result = await handler.register_service(register_request())
    await handler.shutdown(5)
    del handler
    gc.collect()
    assert result.service_id in agent.services


async def test_an_address_that_is_not_host_port_is_a_configuration_error() -> None:
    """ONEX_CONSUL__ADDRESS with a scheme or a bad port fails initialize before any request."""
    for address in ("http://127.0.0.1:8500", "127.0.0.1:port", "127.0.0.1:70000", ":8500"):
        factory = RecordingFactory()
        handler = make_handler(address, factory=factory)
        with pytest.raises(ConfigurationError, match=r"must be host:port"):
            await handler.initialize(handler_config())
        assert factory.tokens == []


async def test_describe_never_shows_the_token(handler: ConsulHandler) -> None:
    """describe() reports the address, datacenter and timeouts but never the token."""
    description = handler.describe()
    assert description.target == "consul-default"
    assert description.details["acl_origin"] == "settings"
    assert TOKEN not in description.model_dump_json()


# -- failures through the real boundary ---------------------------------------------------------


async def test_refused_connection_is_a_retryable_connection_error(
    agent: FakeConsulAgent, handler: ConsulHandler
) -> None:
    """The agent went away after start-up: InfraConnectionError, retryable."""
    await agent.stop()

    failure = await failure_through_boundary(handler, handler.register_service, register_request())

    assert failure.type == "InfraConnectionError"
    assert not failure.non_retryable


async def test_slow_agent_is_a_timeout(agent: FakeConsulAgent) -> None:
    """The agent answers later than ConsulSettings.timeout: the handler gives up at its own
    deadline (consul.aio has none) with InfraTimeoutError, retryable."""
    handler = make_handler(agent.address, timeout=0.3)
    await handler.initialize(handler_config())
    try:
        agent.set_latency(10)
        failure = await failure_through_boundary(
            handler, handler.register_service, register_request()
        )
        assert failure.type == "InfraTimeoutError"
        assert not failure.non_retryable
    finally:
        agent.set_latency(0)
        await handler.shutdown(5)


async def test_server_error_is_retryable_unavailable(
    agent: FakeConsulAgent, handler: ConsulHandler
) -> None:
    """A 500 from the agent is InfraUnavailableError, retryable; the next call works."""
    agent.fail_next(1, 500)

    failure = await failure_through_boundary(handler, handler.register_service, register_request())

    assert failure.type == "InfraUnavailableError"
    assert not failure.non_retryable
    assert "HTTP 500" in str(failure)
    assert (await handler.register_service(register_request())).previous is None


async def test_refused_token_without_a_secret_store_is_not_retried(
    agent: FakeConsulAgent,
) -> None:
    """A settings token cannot be refreshed: one attempt, InfraAuthenticationError."""
    factory = RecordingFactory()
    handler = make_handler(agent.address, token="wrong-token-value", factory=factory)
    await handler.initialize(handler_config())
    try:
        failure = await failure_through_boundary(
            handler, handler.register_service, register_request()
        )
        assert failure.type == "InfraAuthenticationError"
        assert failure.non_retryable
        assert len(factory.tokens) == 1
    finally:
        await handler.shutdown(5)


async def test_bad_token_is_refreshed_once_then_fails_as_authentication(
    agent: FakeConsulAgent,
) -> None:
    """The store holds a wrong token and refreshing brings back the same one: exactly one
    refresh and one rebuilt client, then a non-retryable InfraAuthenticationError. The token is
    in no request record, no log line and no error."""
    bad = "bad-consul-token-42"
    secrets = CachingSecrets(bad)
    factory = RecordingFactory()
    handler = make_handler(agent.address, token=None, factory=factory, secrets=secrets)
    await handler.initialize(handler_config())
    try:
        before = len(agent.requests)
        with structlog.testing.capture_logs() as logs:
            failure = await failure_through_boundary(
                handler, handler.register_service, register_request()
            )

        assert failure.type == "InfraAuthenticationError"
        assert failure.non_retryable
        assert secrets.refreshed == [TOKEN_SECRET]
        assert factory.tokens == [bad, bad]
        assert len(agent.requests) - before == 2  # one services() read per client
        assert any(log["event"] == "consul_token_refused" for log in logs)
        for text in (repr(agent.requests), repr(logs), str(failure), repr(failure.details)):
            assert bad not in text
            assert TOKEN not in text
    finally:
        await handler.shutdown(5)


async def test_rotated_token_is_refreshed_once_within_the_call(agent: FakeConsulAgent) -> None:
    """The agent's token rotated and the secret cache is stale: the call refreshes once,
    rebuilds the client with the new token and succeeds in the same invocation; the next call
    needs no refresh. Neither token shows in requests or logs."""
    secrets = CachingSecrets(TOKEN, stored=ROTATED)
    factory = RecordingFactory()
    handler = make_handler(agent.address, token=None, factory=factory, secrets=secrets)
    await handler.initialize(handler_config())
    try:
        agent.rotate_token(ROTATED)
        register = boundary(handler).wrap("register_service", handler.register_service)
        with structlog.testing.capture_logs() as logs:
            request = register_request()
            result = await register(request)
            await handler.kv_put(KvPutRequest(key="k", value="v"))

        assert result.service_id in agent.services
        assert secrets.refreshed == [TOKEN_SECRET]
        assert factory.tokens == [TOKEN, ROTATED]
        assert agent.kv["k"] == b"v"
        assert preimage_keys(agent) == [
            preimage_key(result.service_id, request.correlation_id, "register_service")
        ]
        assert all(h.get("X-Consul-Token") == "<redacted>" for _, _, h in agent.requests[1:])
        for text in (repr(agent.requests), repr(logs)):
            assert TOKEN not in text
            assert ROTATED not in text
    finally:
        await handler.shutdown(5)


async def test_breaker_per_datacenter_opens_and_recovers(agent: FakeConsulAgent) -> None:
    """Three 500s open the datacenter's breaker (consul:dc1, failure_threshold 3), which then
    rejects without reaching the agent. Healthy again and the clock past open_seconds: two
    probe successes close it."""
    policy = default_policy(Transport.CONSUL)
    clock = FakeClock()
    breakers = BreakerRegistry(clock=clock)
    handler = make_handler(agent.address, datacenter="dc1", breakers=breakers)
    await handler.initialize(handler_config())
    try:
        register = boundary(handler, breakers).wrap("register_service", handler.register_service)
        threshold = policy.circuit_breaker.failure_threshold
        assert threshold == 3
        agent.fail_next(threshold, 500)

        for _ in range(threshold):
            with pytest.raises(ApplicationError) as failed:
                await register(register_request())
            assert failed.value.type == "InfraUnavailableError"
        breaker = breakers.get("consul:dc1", policy.circuit_breaker)
        assert breaker.state is BreakerState.OPEN

        seen = len(agent.requests)
        with pytest.raises(ApplicationError) as rejected:
            await register(register_request())
        assert rejected.value.type == "InfraUnavailableError"
        assert not rejected.value.non_retryable
        assert "not attempted" in str(rejected.value)
        assert len(agent.requests) == seen

        clock.now += policy.circuit_breaker.open_seconds + 1
        assert breaker.state is BreakerState.HALF_OPEN
        assert (await register(register_request())).previous is None
        assert breaker.state is BreakerState.HALF_OPEN  # one probe success of the two needed
        assert (await register(register_request())).previous is None
        assert breaker.state is BreakerState.CLOSED
    finally:
        await handler.shutdown(5)
