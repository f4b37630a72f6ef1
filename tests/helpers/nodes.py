"""Node processes for tests: the helpers `shoal bench` uses, and a running cluster of N."""

import contextlib
from collections.abc import Iterator
from pathlib import Path

import httpx

from shoal.bench.nodes import CLUSTER_FLAGS, NodeProcess, free_port, start_cluster_node, start_node
from tests.helpers.wait import until

__all__ = [
    "CLUSTER_FLAGS",
    "NodeProcess",
    "free_port",
    "place",
    "profiled",
    "ready",
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


def place(node: NodeProcess, model: str, layers: str) -> str:
    """POST /instance of `model` over `layers` (`NODE:a-b,...`): the new instance's id."""
    r = httpx.post(f"{node.url}/instance", json={"model": model, "layers": layers}, timeout=120)
    assert r.status_code == 200, r.text
    return str(r.json()["instance_id"])


def ready(node: NodeProcess, instance_id: str) -> bool:
    """Whether the instance is ready in the node's view; a failed runner fails the test, with
    the node's log."""
    found = [i for i in node.get("/v1/instances")["data"] if i["instance_id"] == instance_id]
    if found and any(r["status"]["kind"] == "failed" for r in found[0]["runners"].values()):
        raise AssertionError(f"{instance_id} failed: {found[0]['runners']}\n{node.log()}")
    return bool(found) and bool(found[0]["ready"])
