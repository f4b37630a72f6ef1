"""Whole control planes over the in-memory transport: election, replication, failover, splits."""

from pathlib import Path

import pytest

from shoal.types.events import NodeProfiled
from shoal.types.ids import NodeId
from tests.helpers.cluster import memory_cluster
from tests.helpers.state import profile

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("size", [3, 5])
async def test_nodes_elect_one_master_and_converge(tmp_path: Path, size: int) -> None:
    async with memory_cluster(tmp_path, size) as c:
        await c.until(c.converged)
        state = next(iter(c.nodes.values())).state
        assert state.master == NodeId("n0")  # the most senior
        assert sorted(state.nodes) == [f"n{i}" for i in range(size)]
        assert state.members == tuple(sorted(state.nodes))  # the founders
        assert all(r.connected for r in state.nodes.values())


async def test_profiles_reach_every_node(tmp_path: Path) -> None:
    async with memory_cluster(tmp_path, 3) as c:
        await c.until(c.converged)
        for node in c.nodes.values():
            await node.report(NodeProfiled(profile=profile(node.node_id)))

        def profiled() -> bool:
            return c.converged() and all(
                r.profile is not None for r in next(iter(c.nodes.values())).state.nodes.values()
            )

        await c.until(profiled)


async def test_master_crash_elects_a_new_one_and_keeps_the_log(tmp_path: Path) -> None:
    async with memory_cluster(tmp_path, 3) as c:
        await c.until(c.converged)
        for node in c.nodes.values():
            await node.report(NodeProfiled(profile=profile(node.node_id)))
        await c.until(lambda: c.converged() and c.nodes[NodeId("n1")].state.index >= 10)
        before = c.nodes[NodeId("n1")].store.entries(1, c.nodes[NodeId("n1")].store.last_index + 1)
        await c.stop("n0", crash=True)
        await c.until(c.converged)
        survivor = c.nodes[NodeId("n1")]
        assert survivor.master_id == NodeId("n1")
        after = survivor.store.entries(1, survivor.store.last_index + 1)
        assert after[: len(before)] == before  # nothing lost, nothing rewritten
        assert not survivor.state.nodes[NodeId("n0")].connected
        assert survivor.state.term > before[-1].term


async def test_restarted_node_catches_up(tmp_path: Path) -> None:
    async with memory_cluster(tmp_path, 3) as c:
        await c.until(c.converged)
        await c.stop("n2")
        for node in c.nodes.values():
            await node.report(NodeProfiled(profile=profile(node.node_id, hostname="changed")))
        await c.until(c.converged)
        await c.start("n2", started_at=1002.0)
        await c.until(c.converged)
        assert c.nodes[NodeId("n2")].state.nodes[NodeId("n2")].connected


async def test_partition_heals_to_one_master_and_one_log(tmp_path: Path) -> None:
    async with memory_cluster(tmp_path, 5) as c:
        await c.until(c.converged)
        minority = [NodeId("n0"), NodeId("n1")]
        majority = [NodeId("n2"), NodeId("n3"), NodeId("n4")]
        c.network.partition(minority, majority)
        await c.until(lambda: len(c.claimants()) == 2)  # each side runs on
        for node in c.nodes.values():
            await node.report(NodeProfiled(profile=profile(node.node_id, hostname="split")))
        c.network.heal()
        await c.until(c.converged, within_s=20)
        logs = {
            tuple(n.store.entries(n.store.first_index, n.store.last_index + 1))
            for n in c.nodes.values()
        }
        assert len(logs) == 1


async def test_a_node_cut_off_alone_does_not_roll_back_the_majority(tmp_path: Path) -> None:
    async with memory_cluster(tmp_path, 3) as c:
        await c.until(c.converged)
        alone, rest = NodeId("n2"), [NodeId("n0"), NodeId("n1")]
        c.network.partition([alone], rest)
        await c.until(lambda: c.nodes[alone].master.active)  # it rules its side of one
        assert c.nodes[alone].state.master_quorum is False
        for node_id in rest:  # the majority keeps working meanwhile
            await c.nodes[node_id].report(NodeProfiled(profile=profile(node_id, hostname="kept")))
        await c.until(
            lambda: all(
                (r := c.nodes[NodeId("n0")].state.nodes[n]).profile is not None
                and r.profile.hostname == "kept"
                for n in rest
            )
        )
        c.network.heal()
        await c.until(c.converged, within_s=20)
        state = c.nodes[alone].state
        assert state.master == NodeId("n0")
        assert all(state.nodes[n].profile.hostname == "kept" for n in rest)  # type: ignore[union-attr]
