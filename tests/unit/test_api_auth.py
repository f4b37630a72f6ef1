"""API keys and CORS on the real app (in process, no sockets): 401 without a key, 403 for a user
key on an admin route, /healthz open, preflights for allowed origins only; the keys file."""

import logging
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx
import pytest

from shoal.api.app import create_app
from shoal.api.auth import ApiKeys, needs_admin, presented_key
from shoal.errors import BadRequest
from shoal.inference.service import ModelStatus
from shoal.types.model_card import ModelCard

pytestmark = pytest.mark.timeout(30)

USER, ADMIN = "sk-user-0123456789", "sk-admin-9876543210"
ORIGIN = "https://chat.example"


class PlacingService:
    """An InferenceService with no models that records what it is asked to place."""

    def __init__(self) -> None:
        self.placed: list[str] = []

    def cards(self) -> list[ModelCard]:
        return []

    async def acquire(self, model_id: str) -> Any:
        raise AssertionError("no model is asked for")

    def card(self, model_id: str) -> ModelCard:
        raise AssertionError("no model is asked for")

    async def resolve(self, model_id: str) -> ModelCard:
        raise AssertionError("no model is asked for")

    def status(self, card: ModelCard) -> ModelStatus:
        return ModelStatus("ready")

    def active_requests(self) -> int:
        return 0

    async def place(self, model: str, **_: Any) -> Any:
        self.placed.append(model)
        return SimpleNamespace(model_dump=lambda mode: {"instance_id": "i-1", "model_id": model})


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    keys = ApiKeys.of(user=[USER], admin=[ADMIN])
    app = create_app(PlacingService(), keys=keys, cors_origins=[ORIGIN])
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://node") as c:
        yield c


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def test_no_key_and_a_wrong_key_are_401_openai_shaped(client: httpx.AsyncClient) -> None:
    for headers in ({}, bearer("sk-wrong"), {"x-api-key": "sk-wrong"}, {"Authorization": USER}):
        r = await client.get("/v1/models", headers=headers)
        assert r.status_code == 401, headers
        assert r.headers["www-authenticate"] == "Bearer"
        error = r.json()["error"]
        assert error["type"] == "invalid_request_error"
        assert error["code"] == "invalid_api_key"
        assert error["param"] is None
        assert "Authorization: Bearer" in error["message"]


async def test_a_user_key_reads_and_infers_by_bearer_or_x_api_key(
    client: httpx.AsyncClient,
) -> None:
    assert (await client.get("/v1/models", headers=bearer(USER))).status_code == 200
    assert (await client.get("/v1/models", headers={"x-api-key": USER})).status_code == 200
    # past the key check: the request itself is judged (no model in it)
    r = await client.post("/v1/chat/completions", headers=bearer(USER), json={})
    assert r.status_code == 400


async def test_placing_and_deleting_need_an_admin_key(client: httpx.AsyncClient) -> None:
    body = {"model": "smollm2-135m"}
    r = await client.post("/instance", headers=bearer(USER), json=body)
    assert r.status_code == 403
    assert r.json()["error"]["code"] == "insufficient_permissions"
    assert (await client.delete("/instance/i-1", headers=bearer(USER))).status_code == 403
    assert (await client.post("/instance", json=body)).status_code == 401
    r = await client.post("/instance", headers=bearer(ADMIN), json=body)
    assert r.status_code == 200
    assert r.json() == {"instance_id": "i-1", "model_id": "smollm2-135m"}
    assert (await client.get("/v1/models", headers=bearer(ADMIN))).status_code == 200


async def test_healthz_stays_open(client: httpx.AsyncClient) -> None:
    assert (await client.get("/healthz")).status_code == 200


async def test_cors_preflight_for_an_allowed_origin_only(client: httpx.AsyncClient) -> None:
    ask = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization",
    }
    r = await client.options("/v1/chat/completions", headers={"Origin": ORIGIN, **ask})
    assert r.status_code == 200
    assert r.headers["access-control-allow-origin"] == ORIGIN
    r = await client.options("/v1/chat/completions", headers={"Origin": "https://evil", **ask})
    assert "access-control-allow-origin" not in r.headers
    r = await client.get("/v1/models", headers={"Origin": ORIGIN})  # a 401 a browser can read
    assert r.status_code == 401
    assert r.headers["access-control-allow-origin"] == ORIGIN


async def test_without_origins_there_is_no_cors_and_without_keys_no_check() -> None:
    app = create_app(PlacingService())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://node") as c:
        r = await c.get("/v1/models", headers={"Origin": ORIGIN})
        assert r.status_code == 200
        assert "access-control-allow-origin" not in r.headers


def test_keys_file_roles_and_comments(tmp_path: Path) -> None:
    path = tmp_path / "keys"
    path.write_text("# shoal keys\nsk-a\nsk-b user  # a comment\n\nsk-c admin\n")
    keys = ApiKeys.of(user=["sk-env"], admin=["sk-flag-admin"], file=path)
    assert keys.user == {"sk-a", "sk-b", "sk-env"}
    assert keys.admin == {"sk-c", "sk-flag-admin"}
    assert [keys.role(k) for k in ("sk-a", "sk-c", "sk-", "")] == ["user", "admin", None, None]
    path.write_text("sk-a root\n")
    with pytest.raises(BadRequest, match=":1: expected"):
        ApiKeys.of(file=path)
    assert not ApiKeys.of(user=[" ", ""]).required


@pytest.mark.parametrize(
    ("headers", "key"),
    [
        ([(b"authorization", b"Bearer sk-1")], "sk-1"),
        ([(b"Authorization", b"bearer  sk-1 ")], "sk-1"),
        ([(b"x-api-key", b"sk-2")], "sk-2"),
        ([(b"authorization", b"Basic abc"), (b"x-api-key", b"sk-2")], "sk-2"),
        ([(b"authorization", b"Bearer ")], None),
        ([], None),
    ],
)
def test_presented_key(headers: list[tuple[bytes, bytes]], key: str | None) -> None:
    assert presented_key(headers) == key


@pytest.mark.parametrize(
    ("method", "path", "admin"),
    [
        ("POST", "/instance", True),
        ("DELETE", "/instance/abc", True),
        ("PUT", "/anything", True),
        ("POST", "/v1/chat/completions", False),
        ("POST", "/v1/completions", False),
        ("GET", "/state", False),
        ("GET", "/instance/previews", False),
    ],
)
def test_which_routes_need_an_admin(method: str, path: str, admin: bool) -> None:
    assert needs_admin(method, path) is admin


@pytest.mark.parametrize(
    ("host", "keys", "warned"),
    [
        ("0.0.0.0", ApiKeys(), True),
        ("192.168.1.5", ApiKeys(), True),
        ("0.0.0.0", ApiKeys.of(user=[USER]), False),
        ("127.0.0.1", ApiKeys(), False),
        ("localhost", ApiKeys(), False),
        ("::1", ApiKeys(), False),
    ],
)
def test_an_open_api_beyond_loopback_is_warned_about_once(
    host: str, keys: ApiKeys, warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    from shoal.node import _check_exposure
    from shoal.settings import load_settings

    with caplog.at_level(logging.WARNING, logger="shoal.node"):
        _check_exposure(load_settings({"host": host}, environ={}), keys)
    assert len(caplog.records) == (1 if warned else 0)
    assert not warned or "takes no key" in caplog.records[0].getMessage()


def test_settings_default_to_a_loopback_api_and_split_keys_from_the_environment() -> None:
    from shoal.node import _cluster_addresses
    from shoal.settings import client_api_key, load_settings

    env = {"SHOAL_API_KEYS": "a, b", "SHOAL_CORS_ORIGINS": ORIGIN, "SHOAL_API_KEY": "k"}
    settings = load_settings({"admin_keys": ["c"]}, environ=env)
    assert settings.host == "127.0.0.1"
    assert (settings.api_keys, settings.admin_keys, settings.cors_origins) == (
        ("a", "b"),
        ("c",),
        (ORIGIN,),
    )
    loopback = load_settings({"cluster_host": "127.0.0.1"}, environ={})
    assert _cluster_addresses(loopback) == ("127.0.0.1", "127.0.0.1")
    assert client_api_key(None, env) == "k"
    assert client_api_key("flag", env) == "flag"
    assert client_api_key(None, {}) is None
