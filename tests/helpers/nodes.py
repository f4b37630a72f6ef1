"""Node processes for tests: the helpers `shoal bench` uses, and a running cluster of N."""

import contextlib
from collections.abc import Iterator
from pathlib import Path

from shoal.bench.nodes import CLUSTER_FLAGS, NodeProcess, free_port, start_cluster_node, start_node
from tests.helpers.wait import until

__all__ = [
    "CLUSTER_FLAGS",
    "NodeProcess",
    "free_port",
    "profiled",
    "running_cluster",
    "start_cluster_node",
    "start_node",
]


@contextlib.contextmanager
def running_cluster(tmp: Path, size: int) -> Iterator[list[NodeProcess]]:
    """`size` nodes joined through the first one's control port; all stopped afterwards."""
    nodes: list[NodeProcess] = []
    try:
        nodes.append(start_cluster_node(tmp))
        nodes += [start_cluster_node(tmp, [nodes[0]]) for _ in range(size - 1)]
        for node in nodes:
            node.wait_ready()
        until(lambda: profiled(nodes), 30, f"{size} nodes with their profiles")
        yield nodes
    finally:
        for node in nodes:
            node.stop()


def profiled(nodes: list[NodeProcess]) -> bool:
    """Every node connected, with its profile, in the first node's state (placement needs it)."""
    records = nodes[0].get("/state")["nodes"].values()
    return len(records) == len(nodes) and all(r["connected"] and r["profile"] for r in records)
