"""A loopback cluster of real `shoal node` processes for the bench, and instance placement.

The bench starts one when no --url is given: N nodes, each knowing the first statically, with
fast test timings (see nodes.py). Placement goes through any node's POST /instance with explicit
layer ranges, so every layout is known exactly; the bench deletes what it placed.
"""

import contextlib
import tempfile
import time
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx

from shoal.bench.errors import BenchError
from shoal.bench.nodes import NodeProcess, start_cluster_node
from shoal.bench.target import Endpoint


def until(condition: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll condition (HTTP errors count as false) until true; the seconds it took."""
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if condition():
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.02)
    raise BenchError(f"gave up after {timeout:.0f} s waiting for {what}")


def joined(nodes: list[NodeProcess]) -> bool:
    """Every node holds the same state, listing all of them connected with their profiles."""
    states = [n.get("/state") for n in nodes]
    records = states[0]["nodes"].values()
    return len({str(s) for s in states}) == 1 and sum(
        1 for r in records if r["connected"] and r["profile"]
    ) == len(nodes)


@dataclass
class Loopback:
    """The processes of a cluster the bench started, and how long they took to join."""

    processes: list[NodeProcess]
    join_s: float = 0.0

    def live(self) -> list[NodeProcess]:
        return [p for p in self.processes if p.proc.poll() is None]

    def endpoints(self) -> list[Endpoint]:
        return [Endpoint(p.node_id, p.url) for p in self.live()]


@contextlib.contextmanager
def loopback(size: int) -> Iterator[Loopback]:
    """Start `size` nodes on 127.0.0.1, wait until they form one cluster; stop them after."""
    with tempfile.TemporaryDirectory(prefix="shoal-bench-") as tmp:
        cluster = Loopback([])
        try:
            start = time.monotonic()
            first = start_cluster_node(Path(tmp))
            cluster.processes.append(first)
            cluster.processes += [start_cluster_node(Path(tmp), [first]) for _ in range(size - 1)]
            until(lambda: joined(cluster.processes), 120, f"{size} nodes to join")
            cluster.join_s = time.monotonic() - start
            yield cluster
        finally:
            for process in cluster.processes:
                process.stop()


def place(url: str, model: str, layers: str) -> str:
    """Place an instance with explicit layer ranges NODE:START-END,...; its id."""
    r = httpx.post(f"{url}/instance", json={"model": model, "layers": layers}, timeout=60)
    if r.status_code != 200:
        raise BenchError(f"placing {model} as {layers} failed: HTTP {r.status_code} {r.text[:200]}")
    return str(r.json()["instance_id"])


def ready(url: str, instances: Collection[str]) -> bool:
    """Every one of `instances` is ready, as the node at url sees it."""
    data = httpx.get(f"{url}/v1/instances", timeout=10).json()["data"]
    done = {i["instance_id"] for i in data if i["ready"]}
    return all(i in done for i in instances)


def delete(url: str, instance: str) -> None:
    """Stop an instance the bench placed (a missing one is fine)."""
    httpx.delete(f"{url}/instance/{instance}", timeout=30)
