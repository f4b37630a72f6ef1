"""GET /v1/nodes/{id}/ping: round trips over the control plane, for `shoal bench`'s RTT table."""

from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from shoal.api.app import create_app
from shoal.models.catalog import Catalog
from shoal.serving import ClusterService
from shoal.types.ids import NodeId
from tests.helpers.cluster import MemoryCluster, memory_cluster

pytestmark = pytest.mark.timeout(30)


@pytest.fixture
async def api(tmp_path: Path) -> AsyncIterator[tuple[MemoryCluster, httpx.AsyncClient]]:
    async with memory_cluster(tmp_path, 2) as cluster:
        await cluster.until(lambda: cluster.converged() and len(cluster.nodes) == 2)
        entry = cluster.nodes[NodeId("n0")]
        await cluster.until(lambda: len(entry.state.nodes) == 2)
        app = create_app(ClusterService(entry, Catalog()), cluster=entry)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://n0") as client:
            yield cluster, client


async def test_ping_returns_one_round_trip_per_count(
    api: tuple[MemoryCluster, httpx.AsyncClient],
) -> None:
    _, client = api
    r = await client.get("/v1/nodes/n1/ping", params={"count": 5})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["from"], body["to"], body["count"], body["lost"]) == ("n0", "n1", 5, 0)
    assert len(body["rtt_ms"]) == 5
    assert all(ms > 0 for ms in body["rtt_ms"])


async def test_ping_unknown_node_is_an_openai_shaped_404(
    api: tuple[MemoryCluster, httpx.AsyncClient],
) -> None:
    _, client = api
    r = await client.get("/v1/nodes/12D3KooWnobody/ping")
    assert r.status_code == 404
    error = r.json()["error"]
    assert error["type"] == "not_found_error"
    assert "12D3KooWnobody" in error["message"]
    assert set(error) == {"message", "type", "param", "code"}


async def test_ping_self_or_bad_count_is_a_400(
    api: tuple[MemoryCluster, httpx.AsyncClient],
) -> None:
    _, client = api
    assert (await client.get("/v1/nodes/n0/ping")).status_code == 400
    assert (await client.get("/v1/nodes/n1/ping", params={"count": 0})).status_code == 400


async def test_ping_a_lost_node_is_a_503(api: tuple[MemoryCluster, httpx.AsyncClient]) -> None:
    cluster, client = api
    await cluster.stop("n1", crash=True)
    entry = cluster.nodes[NodeId("n0")]
    await cluster.until(lambda: NodeId("n1") not in entry.transport.peers())
    r = await client.get("/v1/nodes/n1/ping")
    assert r.status_code == 503
    assert r.json()["error"]["type"] == "service_unavailable"
