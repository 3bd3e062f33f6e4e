"""A fake Consul agent: the HTTP API subset the orchestrator calls, in Consul's own JSON shapes.

It is a real HTTP server (aiohttp, 127.0.0.1, random port) meant to be driven by the real
``consul.aio.Consul`` client of python-consul2, so the client's URL building, headers, body
encoding and status-code mapping are all exercised. It serves on the caller's event loop
(``consul.aio`` is asynchronous); ``FakeConsulAgent(threaded=True)`` serves from a thread instead.

Served (anything else is a 404, as on a real agent)::

    PUT    /v1/agent/service/register            ID/Name/Tags/Address/Port/Meta/Check(s), any key
                                                 case (python-consul2 sends lower-case keys);
                                                 Meta checked as Consul does (400 "Invalid
                                                 Service Meta: ..."), served back as given
    PUT    /v1/agent/service/deregister/<id>     404 "Unknown service ID ..." when unknown
    GET    /v1/agent/services                    {id: service}
    GET    /v1/agent/self                        {"Config": ..., "Member": ...}
    GET    /v1/health/service/<name>             ?passing ?tag ?dc; [{"Node","Service","Checks"}]
    GET    /v1/catalog/datacenters               no token needed, as on Consul
    GET    /v1/status/leader                     no token needed, as on Consul
    GET    /v1/kv/<key>                          ?recurse ?keys ?separator ?raw; 404 when none
    PUT    /v1/kv/<key>                          raw body; ?flags ?cas; answers true/false
    DELETE /v1/kv/<key>                          ?recurse ?cas; answers true/false

Reads carry ``X-Consul-Index`` (a raft-like index bumped by every write), ``X-Consul-KnownLeader``
and ``X-Consul-LastContact``. Blocking queries (``?index=&wait=``) are answered at once, as if
the wait had elapsed with a change.

ACL: with ``token`` set, every request but the two above needs it, in ``X-Consul-Token`` (what
python-consul2 sends), ``Authorization: Bearer`` or ``?token=``; otherwise 403 ``Permission
denied``, which python-consul2 raises as ``consul.base.ACLPermissionDenied``.

Faults (see :class:`~tests.fakes.fault_proxy.FaultInjectingHTTPServer`): ``fail_next``,
``drop_next``, ``set_latency``; ``requests`` lists what was received, with the token redacted.

Note on the real client: python-consul2 0.1.5's ``consul.aio.HTTPClient.__del__`` *always* warns
``ResourceWarning("Unclosed connector in aio.Consul.HTTPClient")``, whatever the caller did (each
request already opens and closes its own ``aiohttp.ClientSession``), and ``close()`` fails if no
request was made. Under ``filterwarnings = error`` that warning surfaces as an unraisable
exception in whichever test the garbage collector happens to run in. :func:`consul_client` is the
way to get a client in tests: the real ``consul.aio.Consul``, whose HTTP adapter is a subclass that
changes nothing but that ``__del__``.
"""

from __future__ import annotations

import base64
import re
import uuid
import warnings
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from typing import Any, ClassVar

import consul.aio
from aiohttp import web

from tests.fakes.fault_proxy import FaultInjectingHTTPServer, HTTPReply, json_body

PASSING, WARNING, CRITICAL, MAINTENANCE = "passing", "warning", "critical", "maintenance"
CHECK_STATUSES = frozenset({PASSING, WARNING, CRITICAL, MAINTENANCE})

NODE_NAME = "fake-consul-agent"

# Consul decodes registration keys case-insensitively (and accepts snake_case): these are the
# canonical spellings it answers with, keyed by the lower-cased name without underscores.
_SERVICE_KEYS = {
    key.lower(): key
    for key in (
        "ID", "Name", "Tags", "Address", "Port", "Meta", "Check", "Checks", "EnableTagOverride",
        "Weights", "Kind", "TaggedAddresses", "Proxy", "Connect", "Namespace",
    )
}  # fmt: skip
_CHECK_KEYS = {
    key.lower(): key
    for key in (
        "CheckID", "Name", "Notes", "Status", "HTTP", "Method", "Header", "Body", "TCP", "UDP",
        "TTL", "Args", "Script", "GRPC", "GRPCUseTLS", "DockerContainerID", "Shell", "Interval",
        "Timeout", "DeregisterCriticalServiceAfter", "TLSSkipVerify", "TLSServerName",
        "OutputMaxSize", "SuccessBeforePassing", "FailuresBeforeCritical", "ServiceID", "H2PING",
    )
}  # fmt: skip
_CHECK_KEYS["id"] = "CheckID"
# Check kinds, in the order Consul picks a check's Type; all but TTL need an Interval.
_CHECK_TYPES = (
    ("HTTP", "http"),
    ("TCP", "tcp"),
    ("UDP", "udp"),
    ("GRPC", "grpc"),
    ("H2PING", "h2ping"),
    ("DockerContainerID", "docker"),
    ("Args", "script"),
    ("Script", "script"),
    ("TTL", "ttl"),
)
_DURATION = re.compile(r"(\d+(\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")


def _is_duration(value: Any) -> bool:
    """A Go duration string (``10s``, ``1m30s``, ``500ms``, ``0``) or a number of nanoseconds."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        return value >= 0
    if not isinstance(value, str) or not value:
        return False
    if value == "0":
        return True
    pos = 0
    while pos < len(value):
        match = _DURATION.match(value, pos)
        if match is None:
            return False
        pos = match.end()
    return True


def _canonical(body: Mapping[str, Any], keys: Mapping[str, str]) -> dict[str, Any]:
    return {keys.get(key.replace("_", "").lower(), key): value for key, value in body.items()}


def _flag(request: web.Request, name: str) -> bool:
    """A boolean query parameter: present (``?recurse``, ``?recurse=1``) and not false."""
    if name not in request.query:
        return False
    return request.query[name].lower() not in ("false", "0")


class FakeConsulAgent(FaultInjectingHTTPServer):
    """A Consul agent for one node in the first of :attr:`datacenters`.

    State for assertions: :attr:`services` (service ID -> canonical registration), :attr:`kv`
    (key -> bytes; tests may also seed it), :attr:`check_status` (service ID -> status of its
    checks), :attr:`index`.
    """

    secret_headers: ClassVar[frozenset[str]] = frozenset({"authorization", "x-consul-token"})
    thread_name: ClassVar[str] = "fake-consul-agent"
    # Endpoints that need no ACL token on a real agent.
    _OPEN_PATHS: ClassVar[frozenset[str]] = frozenset(
        {"/v1/catalog/datacenters", "/v1/status/leader"}
    )

    def __init__(
        self,
        token: str | None = None,
        *,
        datacenters: list[str] | None = None,
        initial_check_status: str = PASSING,
        threaded: bool = False,
    ) -> None:
        super().__init__(threaded=threaded)
        if initial_check_status not in CHECK_STATUSES:
            raise ValueError(f"unknown check status {initial_check_status!r}")
        self._token = token
        self.datacenters: list[str] = list(datacenters or ["dc1"])
        """``/v1/catalog/datacenters``; the agent's own datacenter is the first one."""
        self.initial_check_status = initial_check_status
        """The status a newly registered service's checks start in."""
        self.services: dict[str, dict[str, Any]] = {}
        self.refused_services: set[str] = set()
        """Service ids whose registration is answered 500 (an agent that cannot take them)."""
        self.check_status: dict[str, str] = {}
        self.kv: dict[str, bytes] = {}
        self._kv_meta: dict[str, dict[str, int]] = {}
        self._service_index: dict[str, tuple[int, int]] = {}
        self.index = 1
        """The agent's raft index (``X-Consul-Index``), bumped by every write."""
        self.node_id = str(uuid.uuid4())

    @property
    def datacenter(self) -> str:
        return self.datacenters[0]

    # -- helpers for tests ----------------------------------------------------------------------

    def rotate_token(self, new: str | None) -> None:
        """Require ``new`` from now on (None turns ACLs off)."""
        with self._lock:
            self._token = new

    def set_check_status(self, service_id: str, status: str) -> None:
        """Set the status of every check of a registered service (``passing``, ``critical``...)."""
        if status not in CHECK_STATUSES:
            raise ValueError(f"unknown check status {status!r}")
        with self._lock:
            if service_id not in self.services:
                raise KeyError(f"no service {service_id!r} is registered")
            if not self._checks_of(self.services[service_id]):
                raise ValueError(f"service {service_id!r} has no check")
            self.check_status[service_id] = status
            self._bump()

    # -- routes ---------------------------------------------------------------------------------

    def _add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_put("/v1/agent/service/register", self._register)
        router.add_put("/v1/agent/service/deregister/{service_id}", self._deregister)
        router.add_get("/v1/agent/services", self._agent_services)
        router.add_get("/v1/agent/self", self._agent_self)
        router.add_get("/v1/health/service/{name}", self._health_service)
        router.add_get("/v1/catalog/datacenters", self._datacenters)
        router.add_get("/v1/status/leader", self._leader)
        router.add_get("/v1/kv/{key:.*}", self._kv_get)
        router.add_put("/v1/kv/{key:.*}", self._kv_put)
        router.add_delete("/v1/kv/{key:.*}", self._kv_delete)

    async def _admit(self, request: web.Request) -> None:
        with self._lock:
            token = self._token
        if token is None or request.path in self._OPEN_PATHS:
            return
        bearer = request.headers.get("Authorization", "")
        presented = (
            request.headers.get("X-Consul-Token")
            or (bearer[7:] if bearer.lower().startswith("bearer ") else None)
            or request.query.get("token")
        )
        if presented != token:
            raise HTTPReply(_text(403, "Permission denied"))

    def _error_response(
        self, status: int, body: str | None, headers: Mapping[str, str]
    ) -> web.Response:
        text = body if body is not None else "rpc error making call: No cluster leader"
        return _text(status, text, headers)

    # -- agent ----------------------------------------------------------------------------------

    async def _register(self, request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except ValueError as exc:
            return _text(400, f"Request decode failed: {exc}")
        if not isinstance(body, dict):
            return _text(400, "Request decode failed: expected a JSON object")
        registration = _canonical(body, _SERVICE_KEYS)
        if not registration.get("Name"):
            return _text(400, "Missing service name")
        registration.setdefault("ID", registration["Name"])
        if "Port" in registration and not isinstance(registration["Port"], int):
            return _text(400, "Request decode failed: Port must be an integer")
        if (problem := _meta_problem(registration.get("Meta") or {})) is not None:
            return _text(400, f"Invalid Service Meta: {problem}")
        checks = []
        for raw in [registration.get("Check"), *(registration.get("Checks") or [])]:
            if not raw:
                continue
            if not isinstance(raw, dict):
                return _text(400, "Request decode failed: a check must be a JSON object")
            check = _canonical(raw, _CHECK_KEYS)
            problem = _check_problem(check)
            if problem:
                return _text(400, f"Invalid check: {problem}")
            checks.append(check)
        if registration.get("Check"):
            registration["Check"] = checks[0]
        if registration.get("Checks"):
            registration["Checks"] = checks[1:] if registration.get("Check") else checks
        service_id = str(registration["ID"])
        if service_id in self.refused_services:
            return _text(500, f"rpc error: failed to register service {service_id!r}")
        with self._lock:
            self._bump()
            created = self._service_index.get(service_id, (self.index, self.index))[0]
            self._service_index[service_id] = (created, self.index)
            self.services[service_id] = registration
            # Re-registering keeps the checks' current status, as the agent keeps a known check.
            self.check_status.setdefault(service_id, self.initial_check_status)
        return web.Response(status=200)

    async def _deregister(self, request: web.Request) -> web.Response:
        service_id = request.match_info["service_id"]
        with self._lock:
            if service_id not in self.services:
                return _text(
                    404,
                    f'Unknown service ID "{service_id}". Ensure that the service ID is passed, '
                    "not the service name.",
                )
            del self.services[service_id]
            self.check_status.pop(service_id, None)
            self._service_index.pop(service_id, None)
            self._bump()
        return web.Response(status=200)

    async def _agent_services(self, request: web.Request) -> web.Response:
        with self._lock:
            body = {sid: self._agent_service(sid) for sid in self.services}
        return _json(body)

    async def _agent_self(self, request: web.Request) -> web.Response:
        return _json(
            {
                "Config": {
                    "Datacenter": self.datacenter,
                    "NodeName": NODE_NAME,
                    "NodeID": self.node_id,
                    "Server": True,
                    "Version": "1.17.0",
                },
                "Member": {"Name": NODE_NAME, "Addr": self.host, "Port": 8301, "Status": 1},
            }
        )

    # -- health and catalog ---------------------------------------------------------------------

    async def _health_service(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        dc = request.query.get("dc") or self.datacenter
        if dc not in self.datacenters:
            return _text(500, "No path to datacenter")
        passing = _flag(request, "passing")
        tag = request.query.get("tag")
        entries = []
        with self._lock:
            if dc == self.datacenter:
                for sid, registration in sorted(self.services.items()):
                    if registration["Name"] != name:
                        continue
                    if tag is not None and tag not in (registration.get("Tags") or []):
                        continue
                    entry = self._health_entry(sid)
                    if passing and any(c["Status"] != PASSING for c in entry["Checks"]):
                        continue
                    entries.append(entry)
            index = self.index
        return _json(entries, index=index)

    async def _datacenters(self, request: web.Request) -> web.Response:
        return _json(list(self.datacenters))

    async def _leader(self, request: web.Request) -> web.Response:
        return _json(f"{self.host}:8300")

    # -- KV -------------------------------------------------------------------------------------

    async def _kv_get(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        if (problem := self._dc_problem(request)) is not None:
            return problem
        with self._lock:
            index = self.index
            if _flag(request, "keys"):
                separator = request.query.get("separator") or ""
                found: set[str] = set()
                for name in self.kv:
                    if name.startswith(key):
                        cut = name.find(separator, len(key)) if separator else -1
                        found.add(name if cut < 0 else name[: cut + len(separator)])
                if not found:
                    return _not_found(index)
                return _json(sorted(found), index=index)
            if _flag(request, "recurse"):
                names = sorted(name for name in self.kv if name.startswith(key))
            else:
                names = [key] if key in self.kv else []
            if not names:
                return _not_found(index)
            if _flag(request, "raw") and not _flag(request, "recurse"):
                return web.Response(
                    body=self.kv[key],
                    headers=_index_headers(index),
                    content_type="application/octet-stream",
                )
            return _json([self._kv_entry(name) for name in names], index=index)

    async def _kv_put(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        if (problem := self._dc_problem(request)) is not None:
            return problem
        for param in ("acquire", "release"):
            if param in request.query:
                return _text(400, f"the fake agent has no sessions: ?{param} is not supported")
        try:
            flags = int(request.query.get("flags", "0"))
            cas = int(request.query["cas"]) if "cas" in request.query else None
        except ValueError as exc:
            return _text(400, f"Request decode failed: {exc}")
        value = await request.read()
        with self._lock:
            current = self._kv_meta_of(key) if key in self.kv else None
            if cas is not None and not _cas_matches(cas, current):
                return _json(False)
            self._bump()
            created = current["CreateIndex"] if current else self.index
            self.kv[key] = value
            self._kv_meta[key] = {"CreateIndex": created, "ModifyIndex": self.index, "Flags": flags}
        return _json(True)

    async def _kv_delete(self, request: web.Request) -> web.Response:
        key = request.match_info["key"]
        if (problem := self._dc_problem(request)) is not None:
            return problem
        try:
            cas = int(request.query["cas"]) if "cas" in request.query else None
        except ValueError as exc:
            return _text(400, f"Request decode failed: {exc}")
        with self._lock:
            if _flag(request, "recurse"):
                names = [name for name in self.kv if name.startswith(key)]
            else:
                if cas is not None:
                    current = self._kv_meta_of(key) if key in self.kv else None
                    if current is None or not _cas_matches(cas, current):
                        return _json(False)
                names = [key] if key in self.kv else []
            for name in names:
                del self.kv[name]
                self._kv_meta.pop(name, None)
            self._bump()
        return _json(True)

    # -- internals ------------------------------------------------------------------------------

    def _bump(self) -> None:
        self.index += 1

    def _dc_problem(self, request: web.Request) -> web.Response | None:
        dc = request.query.get("dc")
        if dc is not None and dc not in self.datacenters:
            return _text(500, "No path to datacenter")
        if dc is not None and dc != self.datacenter:
            return _text(500, f"the fake agent only holds data for datacenter {self.datacenter}")
        return None

    def _kv_meta_of(self, key: str) -> dict[str, int]:
        # Tests may seed ``kv`` directly: such keys get indexes on first sight.
        return self._kv_meta.setdefault(
            key, {"CreateIndex": self.index, "ModifyIndex": self.index, "Flags": 0}
        )

    def _kv_entry(self, key: str) -> dict[str, Any]:
        meta = self._kv_meta_of(key)
        return {
            "LockIndex": 0,
            "Key": key,
            "Flags": meta["Flags"],
            "Value": base64.b64encode(self.kv[key]).decode() if self.kv[key] else None,
            "CreateIndex": meta["CreateIndex"],
            "ModifyIndex": meta["ModifyIndex"],
        }

    @staticmethod
    def _checks_of(registration: Mapping[str, Any]) -> list[dict[str, Any]]:
        checks = [registration["Check"]] if registration.get("Check") else []
        return checks + list(registration.get("Checks") or [])

    def _agent_service(self, service_id: str) -> dict[str, Any]:
        registration = self.services[service_id]
        return {
            "ID": service_id,
            "Service": registration["Name"],
            "Tags": list(registration.get("Tags") or []),
            "Meta": dict(registration.get("Meta") or {}),
            "Port": registration.get("Port", 0),
            "Address": registration.get("Address", ""),
            "Weights": registration.get("Weights") or {"Passing": 1, "Warning": 1},
            "EnableTagOverride": bool(registration.get("EnableTagOverride", False)),
            "Datacenter": self.datacenter,
        }

    def _health_entry(self, service_id: str) -> dict[str, Any]:
        registration = self.services[service_id]
        created, modified = self._service_index.get(service_id, (self.index, self.index))
        service = self._agent_service(service_id)
        del service["Datacenter"]
        service.update({"CreateIndex": created, "ModifyIndex": modified})
        checks: list[dict[str, Any]] = [
            {
                "Node": NODE_NAME,
                "CheckID": "serfHealth",
                "Name": "Serf Health Status",
                "Status": PASSING,
                "Notes": "",
                "Output": "Agent alive and reachable",
                "ServiceID": "",
                "ServiceName": "",
                "ServiceTags": [],
                "Type": "",
                "CreateIndex": 1,
                "ModifyIndex": 1,
            }
        ]
        defined = self._checks_of(registration)
        status = self.check_status.get(service_id, self.initial_check_status)
        for number, check in enumerate(defined, start=1):
            suffix = f":{number}" if len(defined) > 1 else ""
            checks.append(
                {
                    "Node": NODE_NAME,
                    "CheckID": check.get("CheckID") or f"service:{service_id}{suffix}",
                    "Name": check.get("Name") or f"Service '{registration['Name']}' check",
                    "Status": status,
                    "Notes": check.get("Notes", ""),
                    "Output": "" if status == PASSING else "fake agent: check set to " + status,
                    "ServiceID": service_id,
                    "ServiceName": registration["Name"],
                    "ServiceTags": service["Tags"],
                    "Type": _check_type(check),
                    "CreateIndex": created,
                    "ModifyIndex": modified,
                }
            )
        node = {
            "ID": self.node_id,
            "Node": NODE_NAME,
            "Address": self.host,
            "Datacenter": self.datacenter,
            "TaggedAddresses": {"lan": self.host, "wan": self.host},
            "Meta": {"consul-network-segment": ""},
            "CreateIndex": 1,
            "ModifyIndex": 1,
        }
        return {"Node": node, "Service": service, "Checks": checks}


def _check_type(check: Mapping[str, Any]) -> str:
    for key, kind in _CHECK_TYPES:
        if check.get(key):
            return kind
    return ""


def _check_problem(check: Mapping[str, Any]) -> str | None:
    """Why Consul would refuse this check definition, or None."""
    kind = _check_type(check)
    if not kind:
        return "one of Args, HTTP, TCP, UDP, GRPC, H2PING, DockerContainerID or TTL is required"
    if kind == "ttl":
        if not _is_duration(check["TTL"]):
            return f'time: invalid duration "{check["TTL"]}"'
    elif not check.get("Interval"):
        return f"Interval must be > 0 for {kind} checks"
    for key in ("Interval", "Timeout", "DeregisterCriticalServiceAfter"):
        if key in check and not _is_duration(check[key]):
            return f'time: invalid duration "{check[key]}"'
    status = check.get("Status")
    if status is not None and status not in CHECK_STATUSES:
        return f"Status must be one of {', '.join(sorted(CHECK_STATUSES))}"
    return None


# Consul's limits on service meta (agent/structs: ValidateServiceMetadata).
_META_KEY = re.compile(r"^[a-zA-Z0-9_-]+$")
_META_MAX_PAIRS, _META_KEY_MAX, _META_VALUE_MAX = 64, 128, 512


def _meta_problem(meta: Any) -> str | None:
    """Why Consul would refuse this service meta, or None."""
    if not isinstance(meta, dict):
        return "Meta must be a JSON object of strings"
    if len(meta) > _META_MAX_PAIRS:
        return f"Node metadata cannot contain more than {_META_MAX_PAIRS} key/value pairs"
    for key, value in meta.items():
        pair = f"Couldn't load metadata pair ('{key}', '{value}')"
        if not isinstance(value, str):
            return f"{pair}: Value must be a string"
        if not _META_KEY.match(key):
            return f"{pair}: Key contains invalid characters"
        if len(key) > _META_KEY_MAX:
            return f"{pair}: Key is too long (limit: {_META_KEY_MAX} characters)"
        if key.startswith("consul-"):
            return f"{pair}: Key prefix 'consul-' is reserved for internal use"
        if len(value) > _META_VALUE_MAX:
            return f"{pair}: Value is too long (limit: {_META_VALUE_MAX} characters)"
    return None


def _cas_matches(cas: int, current: Mapping[str, int] | None) -> bool:
    if cas == 0:
        return current is None
    return current is not None and current["ModifyIndex"] == cas


def _index_headers(index: int) -> dict[str, str]:
    return {
        "X-Consul-Index": str(index),
        "X-Consul-KnownLeader": "true",
        "X-Consul-LastContact": "0",
    }


def _json(data: Any, *, index: int | None = None) -> web.Response:
    headers = {"Content-Type": "application/json"}
    if index is not None:
        headers.update(_index_headers(index))
    return web.Response(body=json_body(data), headers=headers)


def _text(status: int, text: str, headers: Mapping[str, str] | None = None) -> web.Response:
    return web.Response(
        status=status,
        body=text.encode(),
        headers={"Content-Type": "text/plain; charset=utf-8", **(headers or {})},
    )


def _not_found(index: int) -> web.Response:
    return web.Response(status=404, headers=_index_headers(index))


# ---------------------------------------------------------------------------------------------
# The real client, for tests
# ---------------------------------------------------------------------------------------------


class _HTTPClient(consul.aio.HTTPClient):  # type: ignore[misc]
    """python-consul2's asyncio adapter, unchanged but for its always-warning ``__del__``."""

    def __del__(self) -> None:
        pass

    async def close(self) -> None:
        # Each request opens and closes its own session; there is nothing left to close.
        if self._session is not None and not self._session.closed:
            await self._session.close()


class _Consul(consul.aio.Consul):  # type: ignore[misc]
    def http_connect(
        self, host: str, port: int, scheme: str, verify: bool = True, cert: Any = None
    ) -> _HTTPClient:
        return _HTTPClient(host, port, scheme, loop=self._loop, verify=verify, cert=None)


@asynccontextmanager
async def consul_client(
    agent: FakeConsulAgent | None = None,
    *,
    host: str | None = None,
    port: int | None = None,
    token: str | None = None,
    **kwargs: Any,
) -> AsyncIterator[consul.aio.Consul]:
    """The real ``consul.aio.Consul`` client (see the module docstring), pointed at ``agent``.

    ``host``/``port`` override the agent's address (e.g. to go through a proxy); other keyword
    arguments (``dc``, ``consistency``, ...) go to the client.
    """
    with warnings.catch_warnings():
        # Every construction warns (legacy ACL API, discovery chain API...), used or not.
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"consul\.")
        client = _Consul(
            host=host or (agent.host if agent else "127.0.0.1"),
            port=port or (agent.port if agent else 8500),
            token=token,
            **kwargs,
        )
    try:
        yield client
    finally:
        await client.http.close()
