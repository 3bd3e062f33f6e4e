"""A fake Vault server: the HTTP API subset hvac calls, in Vault's own JSON shapes.

Threading: hvac is synchronous (``requests``). A synchronous call made on the event loop's thread
would block the loop, and with it a server running on that loop: a deadlock. So this fake serves
from **a thread of its own with its own event loop** (``threaded=True``, the default), and tests
may call hvac directly, even from an ``async def`` test::

    async with FakeVaultServer(root_token="root") as vault:      # or: with FakeVaultServer() as v
        client = hvac.Client(url=vault.url, token="root")
        try:
            client.secrets.kv.v2.read_secret_version("db", raise_on_deleted_version=True)
        finally:
            client.adapter.close()

Code under test that runs hvac through ``asyncio.to_thread`` works the same way. Helpers
(``put_secret``, ``set_sealed``, ``fail_next``...) may be called from any thread.

Served (Vault answers ``application/json``; errors are ``{"errors": [...]}``)::

    GET  /v1/sys/health                  200, or 503 when sealed (``?sealedcode=`` etc. honoured)
    GET  /v1/sys/seal-status
    GET  /v1/auth/token/lookup-self      {"data": {"id", "accessor", "ttl", "expire_time",
                                          "renewable", "policies", ...}}
    POST /v1/auth/token/renew-self       {"auth": {"client_token", "lease_duration", ...}}
    POST /v1/auth/approle/login          {"auth": {"client_token", ...}}; 400 "invalid role or
                                          secret ID"
    GET  /v1/<mount>/data/<path>         ?version; 404 {"errors": []} when missing
    POST /v1/<mount>/data/<path>         {"data": {...}, "options": {"cas": N}}: a new version
    DELETE /v1/<mount>/data/<path>       soft-deletes the latest version
    anything else                        404 "no handler for route" (after the token check)

hvac maps the statuses: 400 InvalidRequest, 403 Forbidden, 404 InvalidPath, 429
RateLimitExceeded, 500 InternalServerError, 502 BadGateway, 503 VaultDown. A missing, unknown,
revoked or expired token gets 403 ``permission denied``. Every valid token may do everything
(no policies are enforced). Unlike a real root token, the root token here has a TTL
(``token_ttl``) and is renewable, so that renewal logic can be tested with it.

Reading with hvac: pass ``raise_on_deleted_version=True`` (or False) to ``read_secret_version``;
without it hvac 2.x warns (``DeprecationWarning``), which ``filterwarnings = error`` turns into
a failure.
"""

from __future__ import annotations

import json
import math
import re
import secrets
import time
import uuid
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, ClassVar

from aiohttp import web

from tests.fakes.fault_proxy import FaultInjectingHTTPServer, HTTPReply, iter_strings, json_body

VERSION = "1.17.0"
_DURATION = re.compile(r"(\d+)(s|m|h|d)?")
_UNIT_SECONDS = {None: 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def _now() -> datetime:
    return datetime.now(UTC)


def _timestamp(moment: datetime) -> str:
    """RFC 3339 with nanoseconds and a Z, as Vault writes it."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f") + "000Z"


def _seconds(value: Any) -> int | None:
    """A TTL as Vault accepts it: an integer number of seconds or ``30s``/``5m``/``1h``/``1d``."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    if isinstance(value, str) and (match := _DURATION.fullmatch(value)):
        return int(match.group(1)) * _UNIT_SECONDS[match.group(2)]
    return None


# Every secret value any FakeVaultServer served in this process: the test session checks that
# none of them appears in any log line captured during the whole suite (tests/conftest.py).
SERVED_DURING_SESSION: set[str] = set()


@dataclass
class _Token:
    value: str
    accessor: str
    policies: list[str]
    creation_ttl: int
    renewable: bool
    path: str
    display_name: str
    issue_time: datetime = field(default_factory=_now)
    expires_at: float | None = None  # time.monotonic(); None: never
    expire_wall: datetime | None = None

    def remaining(self) -> int:
        if self.expires_at is None:
            return 0
        return max(0, math.ceil(self.expires_at - time.monotonic()))

    def expired(self) -> bool:
        return self.expires_at is not None and time.monotonic() >= self.expires_at

    def extend(self, ttl: int) -> None:
        if ttl <= 0:
            self.expires_at = self.expire_wall = None
        else:
            self.expires_at = time.monotonic() + ttl
            self.expire_wall = _now() + timedelta(seconds=ttl)


@dataclass
class _Version:
    data: dict[str, Any]
    created: datetime = field(default_factory=_now)
    deleted: datetime | None = None

    def metadata(self, number: int) -> dict[str, Any]:
        return {
            "created_time": _timestamp(self.created),
            "custom_metadata": None,
            "deletion_time": _timestamp(self.deleted) if self.deleted else "",
            "destroyed": False,
            "version": number,
        }


@dataclass(frozen=True)
class _AppRole:
    secret_id: str
    policies: list[str]
    token_ttl: int | None
    renewable: bool


class FakeVaultServer(FaultInjectingHTTPServer):
    """A Vault server with token and AppRole auth and one KV v2 mount (``secret`` by default).

    State for assertions: :attr:`renewals` (successful ``renew-self`` calls), :attr:`reads`
    (KV reads per path, misses included), :attr:`secrets` (path -> latest data),
    :meth:`served_secret_values`, :attr:`requests` (``X-Vault-Token`` redacted).
    """

    secret_headers: ClassVar[frozenset[str]] = frozenset({"authorization", "x-vault-token"})
    thread_name: ClassVar[str] = "fake-vault-server"

    def __init__(
        self,
        root_token: str = "root",  # noqa: S107 - the default of `vault server -dev`
        *,
        token_ttl: int = 3600,
        kv_mount: str = "secret",
        threaded: bool = True,
    ) -> None:
        super().__init__(threaded=threaded)
        self.kv_mount = kv_mount.strip("/")
        self.token_ttl = token_ttl
        """TTL (seconds) of tokens issued from now on and of renewals without an increment;
        0 means tokens never expire."""
        self.renewals = 0
        self.reads: Counter[str] = Counter()
        self.cluster_id = str(uuid.uuid4())
        self._sealed = False
        self._tokens: dict[str, _Token] = {}
        self._approles: dict[str, _AppRole] = {}
        self._kv: dict[str, list[_Version]] = {}
        self._served: set[str] = set()
        self.root_token = root_token
        self._issue(
            policies=["root"],
            ttl=token_ttl,
            renewable=True,
            path="auth/token/root",
            value=root_token,
        )

    # -- helpers for tests ----------------------------------------------------------------------

    def set_sealed(self, sealed: bool) -> None:
        """Seal (every request but health and seal-status gets 503) or unseal."""
        with self._lock:
            self._sealed = sealed

    def create_token(
        self, *, policies: list[str] | None = None, ttl: int | None = None, renewable: bool = True
    ) -> str:
        """Issue a token as ``vault token create`` would (not counted as served)."""
        with self._lock:
            token = self._issue(
                policies=policies or ["default"],
                ttl=self.token_ttl if ttl is None else ttl,
                renewable=renewable,
                path="auth/token/create",
            )
        return token.value

    def revoke(self, token: str) -> None:
        """Revoke ``token``: it is unknown from now on (403)."""
        with self._lock:
            self._tokens.pop(token, None)

    def expire(self, token: str) -> None:
        """Make ``token`` expire now (403 from now on, renewal included)."""
        with self._lock:
            self._tokens[token].expires_at = time.monotonic()
            self._tokens[token].expire_wall = _now()

    def token_ttl_of(self, token: str) -> int:
        """Seconds ``token`` has left (0 for none-expiring tokens)."""
        with self._lock:
            return self._tokens[token].remaining()

    def add_approle(
        self,
        role_id: str,
        secret_id: str,
        *,
        policies: list[str] | None = None,
        token_ttl: int | None = None,
        renewable: bool = True,
    ) -> None:
        """Accept ``role_id``/``secret_id`` at ``auth/approle/login``."""
        with self._lock:
            self._approles[role_id] = _AppRole(
                secret_id, policies or ["default"], token_ttl, renewable
            )

    def put_secret(self, path: str, data: Mapping[str, Any]) -> int:
        """Write a new version of the secret at ``path``; returns its version number."""
        with self._lock:
            versions = self._kv.setdefault(path.strip("/"), [])
            versions.append(_Version(dict(data)))
            return len(versions)

    def rotate_secret(self, path: str, field: str, new_value: Any) -> int:
        """A new version of ``path`` with ``field`` set to ``new_value``; returns its number."""
        with self._lock:
            current = self.secrets.get(path.strip("/"))
            if current is None:
                raise KeyError(f"no secret at {path!r}")
            return self.put_secret(path, {**current, field: new_value})

    @property
    def secrets(self) -> dict[str, dict[str, Any]]:
        """Path -> data of the latest version (deleted ones left out)."""
        with self._lock:
            return {
                path: dict(versions[-1].data)
                for path, versions in self._kv.items()
                if versions and versions[-1].deleted is None
            }

    def served_secret_values(self) -> set[str]:
        """Every secret string this fake has put in a response: KV values (string leaves) read
        by a client and tokens issued, renewed or looked up."""
        with self._lock:
            return set(self._served)

    def _remember_served(self, value: str) -> None:
        """Remember a value this fake handed out (the caller holds the lock)."""
        self._served.add(value)
        SERVED_DURING_SESSION.add(value)

    # -- routes ---------------------------------------------------------------------------------

    def _add_routes(self, router: web.UrlDispatcher) -> None:
        router.add_get("/v1/sys/health", self._health)
        router.add_get("/v1/sys/seal-status", self._seal_status)
        router.add_get("/v1/auth/token/lookup-self", self._lookup_self)
        router.add_post("/v1/auth/token/renew-self", self._renew_self)
        router.add_put("/v1/auth/token/renew-self", self._renew_self)
        router.add_post("/v1/auth/approle/login", self._approle_login)
        router.add_put("/v1/auth/approle/login", self._approle_login)
        data_path = f"/v1/{self.kv_mount}/data/{{path:.+}}"
        router.add_get(data_path, self._kv_read)
        router.add_post(data_path, self._kv_write)
        router.add_put(data_path, self._kv_write)
        router.add_delete(data_path, self._kv_delete)
        router.add_route("*", "/{tail:.*}", self._no_route)

    async def _admit(self, request: web.Request) -> None:
        with self._lock:
            sealed = self._sealed
        if sealed and request.path not in ("/v1/sys/health", "/v1/sys/seal-status"):
            raise HTTPReply(_errors(503, "Vault is sealed"))

    def _error_response(
        self, status: int, body: str | None, headers: Mapping[str, str]
    ) -> web.Response:
        return _errors(status, body if body is not None else "internal error", headers=headers)

    # -- sys ------------------------------------------------------------------------------------

    async def _health(self, request: web.Request) -> web.Response:
        with self._lock:
            sealed = self._sealed
        status = 200
        if sealed:
            status = _int_param(request, "sealedcode", 503)
        else:
            status = _int_param(request, "activecode", 200)
        body = {
            "initialized": True,
            "sealed": sealed,
            "standby": False,
            "performance_standby": False,
            "replication_performance_mode": "disabled",
            "replication_dr_mode": "disabled",
            "server_time_utc": int(time.time()),
            "version": VERSION,
            "cluster_name": "vault-cluster-fake",
            "cluster_id": self.cluster_id,
        }
        return _json(body, status=status)

    async def _seal_status(self, request: web.Request) -> web.Response:
        with self._lock:
            sealed = self._sealed
        return _json(
            {
                "type": "shamir",
                "initialized": True,
                "sealed": sealed,
                "t": 1,
                "n": 1,
                "progress": 0,
                "nonce": "",
                "version": VERSION,
                "build_date": "2024-01-01T00:00:00Z",
                "migration": False,
                "cluster_name": "vault-cluster-fake",
                "cluster_id": self.cluster_id,
                "recovery_seal": False,
                "storage_type": "inmem",
            }
        )

    async def _no_route(self, request: web.Request) -> web.Response:
        self._authenticate(request)
        route = request.path.removeprefix("/v1/")
        return _errors(404, f'no handler for route "{route}". route entry not found.')

    # -- token auth -----------------------------------------------------------------------------

    async def _lookup_self(self, request: web.Request) -> web.Response:
        with self._lock:
            token = self._authenticate(request)
            self._remember_served(token.value)
            data = {
                "accessor": token.accessor,
                "creation_time": int(token.issue_time.timestamp()),
                "creation_ttl": token.creation_ttl,
                "display_name": token.display_name,
                "entity_id": "",
                "expire_time": _timestamp(token.expire_wall) if token.expire_wall else None,
                "explicit_max_ttl": 0,
                "id": token.value,  # Vault does echo the token here
                "issue_time": _timestamp(token.issue_time),
                "meta": None,
                "num_uses": 0,
                "orphan": True,
                "path": token.path,
                "policies": list(token.policies),
                "renewable": token.renewable,
                "ttl": token.remaining(),
                "type": "service",
            }
        return _json(_envelope(data=data))

    async def _renew_self(self, request: web.Request) -> web.Response:
        body = await _json_object(request, required=False)
        with self._lock:
            token = self._authenticate(request)
            if not token.renewable:
                return _errors(400, "lease is not renewable")
            increment = body.get("increment")
            ttl = self.token_ttl if increment in (None, "", 0) else _seconds(increment)
            if ttl is None:
                return _errors(400, f"invalid increment {increment!r}")
            token.extend(ttl)
            self.renewals += 1
            self._remember_served(token.value)
            auth = self._auth_block(token)
        return _json(_envelope(auth=auth))

    # -- AppRole --------------------------------------------------------------------------------

    async def _approle_login(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        role_id, secret_id = body.get("role_id"), body.get("secret_id")
        if not role_id:
            return _errors(400, "missing role_id")
        with self._lock:
            role = self._approles.get(str(role_id))
            if role is None or not secrets.compare_digest(
                role.secret_id.encode(), str(secret_id or "").encode()
            ):
                return _errors(400, "invalid role or secret ID")
            policies = list(dict.fromkeys(["default", *role.policies]))
            token = self._issue(
                policies=policies,
                ttl=self.token_ttl if role.token_ttl is None else role.token_ttl,
                renewable=role.renewable,
                path="auth/approle/login",
                display_name="approle",
            )
            self._remember_served(token.value)
            auth = self._auth_block(token)
            auth["metadata"] = {"role_name": "fake-role"}
        return _json(_envelope(auth=auth))

    # -- KV v2 ----------------------------------------------------------------------------------

    async def _kv_read(self, request: web.Request) -> web.Response:
        path = request.match_info["path"].strip("/")
        try:
            wanted = int(request.query.get("version", "0"))
        except ValueError:
            return _errors(400, "version must be an integer")
        with self._lock:
            self._authenticate(request)
            self.reads[path] += 1
            versions = self._kv.get(path, [])
            number = wanted or len(versions)
            if not 1 <= number <= len(versions):
                return _errors(404)
            version = versions[number - 1]
            if version.deleted is not None:
                # Vault answers 404 but still says which version and when it was deleted.
                body = _envelope(data={"data": None, "metadata": version.metadata(number)})
                return _json(body, status=404)
            for value in iter_strings(version.data):
                self._remember_served(value)
            body = _envelope(
                data={"data": dict(version.data), "metadata": version.metadata(number)}
            )
        return _json(body)

    async def _kv_write(self, request: web.Request) -> web.Response:
        path = request.match_info["path"].strip("/")
        body = await _json_object(request)
        data = body.get("data")
        if not isinstance(data, dict):
            return _errors(400, "no data provided")
        cas = (body.get("options") or {}).get("cas")
        with self._lock:
            self._authenticate(request)
            versions = self._kv.get(path, [])
            if cas is not None and cas != len(versions):
                return _errors(400, "check-and-set parameter did not match the current version")
            number = self.put_secret(path, data)
            metadata = self._kv[path][-1].metadata(number)
        return _json(_envelope(data=metadata))

    async def _kv_delete(self, request: web.Request) -> web.Response:
        path = request.match_info["path"].strip("/")
        with self._lock:
            self._authenticate(request)
            versions = self._kv.get(path)
            if versions and versions[-1].deleted is None:
                versions[-1].deleted = _now()
        return web.Response(status=204)

    # -- internals ------------------------------------------------------------------------------

    def _issue(
        self,
        *,
        policies: list[str],
        ttl: int,
        renewable: bool,
        path: str,
        display_name: str = "token",
        value: str | None = None,
    ) -> _Token:
        token = _Token(
            value=value or "hvs." + secrets.token_urlsafe(18),
            accessor=secrets.token_urlsafe(18),
            policies=policies,
            creation_ttl=ttl,
            renewable=renewable,
            path=path,
            display_name=display_name,
        )
        token.extend(ttl)
        self._tokens[token.value] = token
        return token

    def _authenticate(self, request: web.Request) -> _Token:
        """The request's token, or a 403 ``permission denied`` reply."""
        presented = request.headers.get("X-Vault-Token")
        bearer = request.headers.get("Authorization", "")
        if not presented and bearer.lower().startswith("bearer "):
            presented = bearer[7:]
        with self._lock:
            token = self._tokens.get(presented or "")
            if token is None or token.expired():
                raise HTTPReply(_errors(403, "permission denied"))
            return token

    @staticmethod
    def _auth_block(token: _Token) -> dict[str, Any]:
        return {
            "client_token": token.value,
            "accessor": token.accessor,
            "policies": list(token.policies),
            "token_policies": list(token.policies),
            "metadata": None,
            "lease_duration": token.remaining(),
            "renewable": token.renewable,
            "entity_id": "",
            "token_type": "service",
            "orphan": True,
            "mfa_requirement": None,
            "num_uses": 0,
        }


def _envelope(*, data: Any = None, auth: Any = None) -> dict[str, Any]:
    return {
        "request_id": str(uuid.uuid4()),
        "lease_id": "",
        "renewable": False,
        "lease_duration": 0,
        "data": data,
        "wrap_info": None,
        "warnings": None,
        "auth": auth,
        "mount_type": "",
    }


async def _json_object(request: web.Request, *, required: bool = True) -> dict[str, Any]:
    text = await request.text()
    if not text.strip() and not required:
        return {}
    try:
        parsed = json.loads(text)
    except ValueError as exc:
        raise HTTPReply(_errors(400, f"failed to parse JSON input: {exc}")) from None
    if not isinstance(parsed, dict):
        raise HTTPReply(_errors(400, "failed to parse JSON input: not an object"))
    return parsed


def _int_param(request: web.Request, name: str, default: int) -> int:
    try:
        return int(request.query.get(name, default))
    except ValueError:
        return default


def _json(data: Any, *, status: int = 200) -> web.Response:
    # Exactly "application/json": hvac only reads "errors" when the Content-Type is exactly that.
    return web.Response(
        status=status, body=json_body(data), headers={"Content-Type": "application/json"}
    )


def _errors(status: int, *messages: str, headers: Mapping[str, str] | None = None) -> web.Response:
    response = _json({"errors": list(messages)}, status=status)
    response.headers.update(headers or {})
    return response
