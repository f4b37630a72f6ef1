"""Many ClusterNodes over one MemoryNetwork in this process, for fast cluster tests.

Each node has an Ed25519 key (kept per name across restarts) and signs everything it sends; the
nodes a cluster is made with are its founding members (every node's seed), so the tests run
through the same signature and membership checks as real nodes. One difference: node ids are
readable names ("n0"), so receivers look keys up in the cluster's directory instead of decoding
them from the id as real nodes do.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from shoal.cluster import ClusterNode, Timing
from shoal.net.identity import Identity, key_in_id
from shoal.net.memory import MemoryNetwork, MemoryTransport
from shoal.state.store import StateStore
from shoal.types.ids import NodeId

FAST = Timing(
    heartbeat_s=0.05, settle_s=0.05, join_grace_s=0.2, repair_interval_s=0.02, request_timeout_s=0.5
)


@dataclass
class MemoryCluster:
    """Nodes n0..nK on one memory network; start, kill and restart them by name."""

    root: Path
    network: MemoryNetwork = field(default_factory=MemoryNetwork)
    nodes: dict[NodeId, ClusterNode] = field(default_factory=dict)
    tasks: dict[NodeId, list[asyncio.Task[None]]] = field(default_factory=dict)
    identities: dict[str, Identity] = field(default_factory=dict)
    founders: tuple[NodeId, ...] = ()  # every node's seed: the members the log starts with

    def id(self, name: str) -> NodeId:
        """The node id of the node called `name` (its key is made on first use, then kept)."""
        if name not in self.identities:
            key = Ed25519PrivateKey.generate()
            self.identities[name] = Identity(private_key=key, node_id=NodeId(name))
        return self.identities[name].node_id

    def key_of(self, node_id: NodeId) -> Ed25519PublicKey | None:
        """The directory of this cluster's keys; other ids are real peer ids (or find none)."""
        found = self.identities.get(node_id)
        return found.public_key if found is not None else key_in_id(node_id)

    def node(self, name: str) -> ClusterNode:
        return self.nodes[self.id(name)]

    async def start(self, name: str, started_at: float | None = None) -> ClusterNode:
        node_id = self.id(name)
        transport = MemoryTransport(self.network, node_id)
        store = StateStore.open(self.root / f"{name}.db", snapshot_every=50, keep=20)
        node = ClusterNode(
            transport,
            store,
            "test",
            self.identities[name],
            self.founders,
            timing=FAST,
            keys=self.key_of,
        )
        if started_at is not None:
            node.election.started_at = started_at
        await transport.start()
        self.nodes[node_id] = node
        self.tasks[node_id] = [asyncio.create_task(c) for c in node.coroutines()]
        return node

    async def stop(self, name: str, *, crash: bool = False) -> None:
        node_id = self.id(name)
        node = self.nodes.pop(node_id)
        if crash:
            self.network.kill(node_id)
        for task in self.tasks.pop(node_id):
            task.cancel()
        await asyncio.gather(*self.tasks.get(node_id, []), return_exceptions=True)
        await node.transport.close()
        node.store.close()

    def masters(self) -> set[NodeId | None]:
        return {n.master_id for n in self.nodes.values()}

    def claimants(self) -> set[NodeId]:
        return {n.node_id for n in self.nodes.values() if n.master.active}

    def converged(self) -> bool:
        """One master that every node follows and all states byte-identical."""
        states = {n.state.model_dump_json() for n in self.nodes.values()}
        masters = self.masters()
        return (
            len(masters) == 1
            and None not in masters
            and self.claimants() == masters
            and len(states) == 1
        )

    async def until(self, condition: Callable[[], bool], within_s: float = 10.0) -> None:
        async with asyncio.timeout(within_s):
            while True:
                if condition():
                    return
                await asyncio.sleep(0.02)

    async def close(self) -> None:
        for name in list(self.nodes):
            await self.stop(name)


@contextlib.asynccontextmanager
async def memory_cluster(root: Path, size: int) -> AsyncIterator[MemoryCluster]:
    cluster = MemoryCluster(root)
    cluster.founders = tuple(cluster.id(f"n{i}") for i in range(size))
    try:
        for i in range(size):
            await cluster.start(f"n{i}", started_at=1000.0 + i)
        yield cluster
    finally:
        await cluster.close()
