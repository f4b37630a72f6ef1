"""POST /instance with a layout waits for the profiles of the nodes it names (memory cluster).

Right after a node joins it has not profiled itself yet; `shoal place --layers` naming it must
wait for its profile (up to the lease) instead of failing with "no node", and say clearly which
node never reported when none comes.
"""

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from shoal.api.app import create_app
from shoal.api.instances import unprofiled
from shoal.cluster import ClusterNode
from shoal.models.catalog import Catalog
from shoal.serving import ClusterService
from shoal.types.events import NodeProfiled
from shoal.types.ids import NodeId
from tests.helpers.cluster import MemoryCluster, memory_cluster
from tests.helpers.state import profile

pytestmark = pytest.mark.timeout(30)

WAIT_S = 0.6  # the lease, shortened
LONG_WAIT_S = 20.0  # a lease no slow host reaches: whoever answers sooner woke on the profile
LAYOUT = "n0:0-15,n1:15-30"


@pytest.fixture
async def api(
    tmp_path: Path, request: pytest.FixtureRequest
) -> AsyncIterator[tuple[MemoryCluster, httpx.AsyncClient]]:
    async with memory_cluster(tmp_path, 2) as cluster:
        await cluster.until(lambda: cluster.converged() and len(cluster.nodes) == 2)
        entry = cluster.nodes[NodeId("n0")]
        await cluster.until(lambda: len(entry.state.nodes) == 2)
        await entry.report(NodeProfiled(profile=profile("n0")))
        await cluster.until(lambda: entry.state.nodes[NodeId("n0")].profile is not None)
        app = create_app(ClusterService(entry, Catalog()), cluster=entry)
        app.state.profile_wait_s = getattr(request, "param", WAIT_S)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://n0") as client:
            yield cluster, client


async def place(client: httpx.AsyncClient, layers: str) -> tuple[httpx.Response, float]:
    began = time.monotonic()
    r = await client.post("/instance", json={"model": "smollm2-135m", "layers": layers})
    return r, time.monotonic() - began


@pytest.mark.parametrize("api", [LONG_WAIT_S], indirect=True)
async def test_a_node_that_profiles_late_is_waited_for(
    api: tuple[MemoryCluster, httpx.AsyncClient],
) -> None:
    cluster, client = api
    late: ClusterNode = cluster.nodes[NodeId("n1")]

    async def profile_later() -> None:
        await asyncio.sleep(0.3)
        await late.report(NodeProfiled(profile=profile("n1")))

    reporting = asyncio.create_task(profile_later())
    r, took = await place(client, LAYOUT)
    await reporting
    # it got past the wait to the master, whose placer here places nothing
    assert 0.3 <= took < LONG_WAIT_S
    assert "no profile" not in r.text and "no node" not in r.text
    assert "this master cannot place models" in r.json()["error"]["message"]


async def test_a_node_that_never_profiles_fails_clearly_after_the_wait(
    api: tuple[MemoryCluster, httpx.AsyncClient],
) -> None:
    _, client = api
    r, took = await place(client, "n0:0-15,nobody:15-30")
    assert r.status_code == 400
    error = r.json()["error"]
    assert error["param"] == "layers"
    assert error["message"].startswith(f"no profile from nobody within {WAIT_S:g} s")
    assert "profiled nodes: n0" in error["message"]
    assert WAIT_S <= took < WAIT_S + 0.5


async def test_profiled_nodes_and_prefixes_do_not_wait(
    api: tuple[MemoryCluster, httpx.AsyncClient],
) -> None:
    cluster, client = api
    entry = cluster.nodes[NodeId("n0")]
    assert unprofiled(LAYOUT, entry.state) == ["n1"]
    assert unprofiled("n:0-15,n0:15-30", entry.state) == []  # a prefix of a profiled node
    assert unprofiled("not a layout", entry.state) == []  # placement explains that one
    r, took = await place(client, "n0:0-30")
    assert took < WAIT_S and "this master cannot place models" in r.text
