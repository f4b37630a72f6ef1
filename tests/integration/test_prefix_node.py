"""Prefix caching through real runners: a chat's second turn on SmolLM2 starts from the first
turn's caches kept on every stage, and answers as a node without a prefix cache does.

The cached node runs the model over two stages on one node (two simulated GPUs, and the CPU
behind the second: engines/split.py), so the kept caches live in two runner processes and one
of them is a split engine; the plain node runs it whole with `--prefix-cache-mb 0`.
"""

from collections.abc import Iterator

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers.nodes import NodeProcess, profiled, ready, start_cluster_node
from tests.helpers.wait import until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MODEL = "smollm2-135m"
ARGS = ["--engine", "torch", "--no-probe-engines"]
SYSTEM = (
    "You are a helpful assistant who answers questions about European geography in one short "
    "sentence, and never more than that, whatever the question is about."
)


def chat(node: NodeProcess, messages: list[dict[str, str]]) -> str:
    body = {"model": MODEL, "messages": messages, "temperature": 0, "max_tokens": 24}
    r = httpx.post(f"{node.url}/v1/chat/completions", json=body, timeout=180)
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"])


def counter(node: NodeProcess, name: str) -> float:
    text = httpx.get(f"{node.url}/metrics", timeout=10).text
    return sum(
        s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == f"shoal:{name}_total"
    )


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeProcess, NodeProcess]]:
    tmp = tmp_path_factory.mktemp("prefix")
    started: list[NodeProcess] = []
    try:
        started.append(start_cluster_node(tmp / "a", args=[*ARGS, "--simulated-gpus", "2x0.45"]))
        started.append(start_cluster_node(tmp / "b", args=[*ARGS, "--prefix-cache-mb", "0"]))
        for node in started:
            node.wait_ready()
        until(lambda: all(profiled([n]) for n in started), 60, "the nodes' profiles")
        placed = []
        for node in started:
            r = httpx.post(f"{node.url}/instance", json={"model": MODEL}, timeout=120)
            assert r.status_code == 200, r.text
            placed.append((node, str(r.json()["instance_id"])))
        until(lambda: all(ready(node, iid) for node, iid in placed), 240, "both instances ready")
        yield started[0], started[1]
    finally:
        for node in started:
            node.stop()


def test_turn_two_starts_from_turn_one_and_answers_as_without_a_cache(
    nodes: tuple[NodeProcess, NodeProcess],
) -> None:
    cached, plain = nodes
    stages = cached.get("/v1/instances")["data"][0]["stages"]
    assert len(stages) == 2 and stages[1]["cpu_layers"] > 0  # two runners, one a GPU+CPU split
    turn_1 = [{"role": "system", "content": SYSTEM},
              {"role": "user", "content": "What is the capital of France?"}]  # fmt: skip
    first = chat(cached, turn_1)
    assert first == chat(plain, turn_1) and "Paris" in first
    hits = counter(cached, "prefix_cache_hits")
    turn_1_prompt = counter(cached, "prefix_cache_queries")  # its prompt tokens, looked up
    turn_2 = [*turn_1, {"role": "assistant", "content": first},
              {"role": "user", "content": "And the capital of Italy?"}]  # fmt: skip
    second = chat(cached, turn_2)
    assert second == chat(plain, turn_2)
    reused = counter(cached, "prefix_cache_hits") - hits
    asked = counter(cached, "prefix_cache_queries")
    # all of turn 1's prompt, and most of its answer (re-tokenized from its text)
    assert reused > turn_1_prompt, f"turn 2 reused {reused}, turn 1's prompt {turn_1_prompt}"
    assert counter(plain, "prefix_cache_hits") == 0 and asked > reused
