"""POST /v1/pulls: a model's files into this node's Hub cache in the background, with progress,
against a Hub stand-in on loopback; the model then runs here without a download."""

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from shoal.api.app import create_app
from shoal.api.auth import ApiKeys
from shoal.errors import ModelNotFound
from shoal.models.catalog import Catalog
from shoal.models.hub import Hub
from shoal.serving.pulls import Pulls
from shoal.types.ids import ModelId
from shoal.types.model_card import HubWeights, ModelCard
from tests.helpers.hub_server import HubServer
from tests.helpers.mlx_repos import make_hf_repo

pytestmark = pytest.mark.timeout(120)
pytest.importorskip("transformers")

REPO = "org/tiny-llama"
ADMIN, USER = "sk-admin-pulls-0123456789", "sk-user-pulls-0123456789"


class RepoModels:
    """An InferenceService that knows each repo id as a card of that Hub repo (as ClusterService
    resolves one), and nothing else."""

    def cards(self) -> list[ModelCard]:
        return []

    async def resolve(self, model_id: str) -> ModelCard:
        if "/" not in model_id:
            raise ModelNotFound(f"model {model_id!r} not found")
        return ModelCard(
            id=ModelId(model_id), name=model_id, family="f", architecture="llama",
            hf_repo=model_id, license="l", layers=4, hidden_size=64, heads=4, kv_heads=2,
            head_dim=16, vocab_size=256, context_length=128, storage_bytes=1 << 20,
            quantization="bf16", weights=[HubWeights(format="safetensors", repo=model_id)],
        )  # fmt: skip


@pytest.fixture(scope="module")
def hub_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HubServer]:
    repo = make_hf_repo(tmp_path_factory.mktemp("repo") / "tiny", layers=4, files=3)
    with HubServer({REPO: repo}) as server:
        yield server


@pytest.fixture
async def world(hub_server: HubServer, tmp_path: Path) -> AsyncIterator[dict[str, Any]]:
    hub = Hub(tmp_path / "hub", endpoint=hub_server.url, timeout_s=5)
    pulls = Pulls(hub, Catalog())
    keys = ApiKeys.of(user=[USER], admin=[ADMIN])
    app = create_app(RepoModels(), keys=keys, pull_files=pulls)  # type: ignore[arg-type]
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://node") as client:
        yield {"client": client, "hub": hub, "server": hub_server, "pulls": pulls}
    await pulls.close()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def until_done(client: httpx.AsyncClient) -> dict[str, Any]:
    for _ in range(400):
        rows = (await client.get("/v1/pulls", headers=auth(USER))).json()["data"]
        if rows and rows[0]["status"] in ("done", "failed"):
            return dict(rows[0])
        await asyncio.sleep(0.05)
    raise AssertionError(f"the pull did not end: {rows}")


async def test_a_pull_fetches_every_file_and_reports_its_bytes(world: dict[str, Any]) -> None:
    client, server = world["client"], world["server"]
    server.rate = 400_000  # slow enough to see it downloading
    r = await client.post("/v1/pulls", json={"model": REPO}, headers=auth(ADMIN))
    assert r.status_code == 200 and r.json()["status"] in ("starting", "downloading")
    again = await client.post("/v1/pulls", json={"model": REPO}, headers=auth(ADMIN))
    assert again.json()["started"] == r.json()["started"]  # the same pull, not a second one
    seen: list[dict[str, Any]] = []
    for _ in range(200):
        rows = (await client.get("/v1/pulls", headers=auth(USER))).json()["data"]
        seen.append(rows[0])
        if rows[0]["status"] == "done":
            break
        await asyncio.sleep(0.05)
    server.rate = None
    done = seen[-1]
    assert done["status"] == "done" and done["done"] == done["total"] > 0 and done["files"] == 3
    moving = [s for s in seen if s["status"] == "downloading" and 0 < s["done"] < s["total"]]
    assert moving, "no progress was reported between nothing and everything"
    assert [s["done"] for s in seen] == sorted(s["done"] for s in seen)
    listing = world["hub"].listing(REPO)
    assert all(world["hub"].local(listing, f.path) is not None for f in listing.files)
    # pulled once: a second pull fetches nothing (the server logs a response once it is sent)
    await asyncio.sleep(0.5)
    before = len(server.log)
    await client.post("/v1/pulls", json={"model": REPO}, headers=auth(ADMIN))
    assert (await until_done(client))["files"] == 0
    assert not [e for e in server.log[before:] if "/resolve/" in e.path and e.method == "GET"]


async def test_pulls_need_an_admin_key_and_a_known_model(world: dict[str, Any]) -> None:
    client = world["client"]
    r = await client.post("/v1/pulls", json={"model": REPO}, headers=auth(USER))
    assert r.status_code == 403
    r = await client.post("/v1/pulls", json={"model": "no-such-model"}, headers=auth(ADMIN))
    assert r.status_code == 404 and "no-such-model" in r.json()["error"]["message"]
    r = await client.post("/v1/pulls", json={"model": 3}, headers=auth(ADMIN))
    assert r.status_code == 400


async def test_a_failed_pull_says_why_in_one_line(world: dict[str, Any]) -> None:
    client = world["client"]
    r = await client.post("/v1/pulls", json={"model": "org/absent"}, headers=auth(ADMIN))
    assert r.status_code == 200
    failed = await until_done(client)
    assert failed["status"] == "failed" and "org/absent" in failed["reason"]
    assert "\n" not in failed["reason"]
