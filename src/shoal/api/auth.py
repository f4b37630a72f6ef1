"""API keys: who may use a node's HTTP API, and who may change what the cluster runs.

Keys come from `--api-key` (repeatable) and `SHOAL_API_KEYS` (comma-separated): user keys;
`--admin-key` and `SHOAL_ADMIN_KEYS`: admin keys; and a keys file (`--api-keys-file`), one key
a line, `KEY` or `KEY user` or `KEY admin`, `#` comments. A request names its key as
`Authorization: Bearer KEY` (what OpenAI clients send) or `x-api-key: KEY`.

With no key configured the API is open (it binds 127.0.0.1 unless told otherwise). With keys,
every route but `/healthz`, `/health` and the dashboard's static files (`/`, `/dashboard/*`:
they hold no data) needs one (401 in the route's dialect, `WWW-Authenticate: Bearer`), and a
route that changes what the cluster runs (any method but GET/HEAD/OPTIONS outside the inference
routes below: placing and deleting instances) needs an admin key (403). Keys are compared in
constant time (`hmac.compare_digest`), against every key, whatever matches first.
"""

import hmac
import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from starlette.types import ASGIApp, Receive, Scope, Send

from shoal.api.errors import dialect_of, error_body
from shoal.errors import BadRequest

log = logging.getLogger(__name__)

Role = Literal["user", "admin"]

OPEN_PATHS = frozenset({"/healthz", "/health"})
# The dashboard's page and static files (api/dashboard.py) hold no data: open to GET and HEAD.
# Every call the page makes for data needs the key like any client's.
DASHBOARD_PATHS = frozenset({"/"})
DASHBOARD_PREFIX = "/dashboard/"
READS = frozenset({"GET", "HEAD", "OPTIONS"})
# Writes a user key may make: inference, in every dialect shoal speaks or will (a path that
# does not exist is a 404 all the same). Any other write is an admin's.
INFERENCE = frozenset(
    {
        "/v1/chat/completions",
        "/v1/completions",
        "/v1/responses",
        "/v1/messages",
        "/v1/messages/count_tokens",
        "/v1/embeddings",
        "/api/chat",
        "/api/generate",
        "/api/show",  # Ollama reads a model's details by POST
    }
)


@dataclass(frozen=True)
class ApiKeys:
    """The keys a node takes, by role."""

    user: frozenset[str] = frozenset()
    admin: frozenset[str] = frozenset()

    @property
    def required(self) -> bool:
        """Whether any key is set (else the API is open)."""
        return bool(self.user or self.admin)

    def role(self, key: str) -> Role | None:
        """The role of a presented key, or None; every key is compared, in constant time each."""
        presented = key.encode()
        found: Role | None = None
        roles: list[tuple[Role, frozenset[str]]] = [("user", self.user), ("admin", self.admin)]
        for role, keys in roles:
            for known in keys:
                if hmac.compare_digest(presented, known.encode()):
                    found = role
        return found

    @classmethod
    def of(
        cls, user: Iterable[str] = (), admin: Iterable[str] = (), file: Path | None = None
    ) -> "ApiKeys":
        """Keys from flags / environment and a keys file; BadRequest for a bad file line."""
        users = {k.strip() for k in user if k.strip()}
        admins = {k.strip() for k in admin if k.strip()}
        if file is not None:
            for number, line in enumerate(file.read_text().splitlines(), 1):
                words = line.split("#", 1)[0].split()
                if not words:
                    continue
                if len(words) > 2 or (len(words) == 2 and words[1] not in ("user", "admin")):
                    raise BadRequest(f"{file}:{number}: expected `KEY` or `KEY user|admin`")
                (admins if words[-1] == "admin" and len(words) == 2 else users).add(words[0])
        return cls(frozenset(users - admins), frozenset(admins))


def presented_key(headers: Iterable[tuple[bytes, bytes]]) -> str | None:
    """The key a request carries: `Authorization: Bearer KEY`, else `x-api-key: KEY`."""
    bearer = api_key = None
    for name, value in headers:
        name = name.lower()
        if name == b"authorization":
            scheme, _, token = value.decode("latin-1").strip().partition(" ")
            if scheme.lower() == "bearer" and token.strip():
                bearer = token.strip()
        elif name == b"x-api-key" and value.strip():
            api_key = value.decode("latin-1").strip()
    return bearer or api_key


def is_open(method: str, path: str) -> bool:
    """Whether a request needs no key: /healthz, and reading the dashboard's static files."""
    if path in OPEN_PATHS:
        return True
    dashboard = path in DASHBOARD_PATHS or path.startswith(DASHBOARD_PREFIX)
    return dashboard and method in ("GET", "HEAD")


def needs_admin(method: str, path: str) -> bool:
    """Whether a request changes what the cluster runs (placing, deleting instances, …)."""
    return method not in READS and path.rstrip("/") not in INFERENCE


class ApiKeyAuth:
    """Pure ASGI middleware: 401 without a valid key, 403 for a user key on an admin route."""

    def __init__(self, app: ASGIApp, keys: ApiKeys) -> None:
        self.app = app
        self.keys = keys

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.keys.required:
            return await self.app(scope, receive, send)
        if is_open(scope["method"], scope["path"]):
            return await self.app(scope, receive, send)
        if scope["method"] == "OPTIONS":  # CORS preflights carry no key (CORSMiddleware answers)
            return await self.app(scope, receive, send)
        key = presented_key(scope["headers"])
        role = self.keys.role(key) if key is not None else None
        if role is None:
            why = "no API key given" if key is None else "the API key is not valid"
            message = f"{why}: send `Authorization: Bearer KEY` (or `x-api-key: KEY`)"
            return await _deny(send, scope["path"], 401, message, "invalid_api_key")
        if role != "admin" and needs_admin(scope["method"], scope["path"]):
            message = f"{scope['method']} {scope['path']} needs an admin key"
            return await _deny(send, scope["path"], 403, message, "insufficient_permissions")
        await self.app(scope, receive, send)


async def _deny(send: Send, path: str, status: int, message: str, code: str) -> None:
    body = json.dumps(error_body(status, message, code=code, dialect=dialect_of(path))).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
