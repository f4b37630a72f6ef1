"""A real node without --threads, two models' instances on it: the second runner starts with
half the cores, the first is told to give up as many, and both answer as a runner alone does."""

import concurrent.futures
from collections.abc import Iterator
from pathlib import Path

import pytest

from shoal.bench.nodes import CLUSTER_FLAGS, NodeProcess, start_node
from shoal.worker.worker import cpu_share, node_cores
from tests.helpers.wait import until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
MODEL = "smollm2-135m"


@pytest.fixture
def node(tmp_path: Path) -> Iterator[NodeProcess]:
    proc = start_node(tmp_path, [*CLUSTER_FLAGS, "--quant", "int4"], threads=None)
    try:
        proc.wait_ready()
        yield proc
    finally:
        proc.stop()


def ask(node: NodeProcess) -> str:
    return str(node.chat(MODEL, "Name three colours.", 24)["choices"][0]["message"]["content"])


def ready(node: NodeProcess) -> int:
    return sum(i["ready"] for i in node.get("/v1/instances")["data"])


def test_two_runners_share_the_cores_and_answer_as_one(node: NodeProcess) -> None:
    node.place_here(MODEL)
    until(lambda: ready(node) == 1, 120, "the first instance")
    alone = ask(node)
    assert "computes on" not in node.log()  # a runner alone keeps its engine's default
    node.place_here(MODEL)
    until(lambda: ready(node) == 2, 120, "the second instance")
    share = cpu_share(2, node_cores())
    until(lambda: f"computes on {share} threads now" in node.log(), 10, "the first told its share")
    until(lambda: f"the engine runs on {share} threads" in node.log(), 10, "the runner applying it")
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda _: ask(node), range(4)))
    assert answers == [alone] * 4
    assert "could not set" not in node.log()
