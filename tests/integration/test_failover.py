"""Failover with real processes: a stage node or the master killed mid-stream costs no request."""

import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from openai import OpenAI

from tests.helpers.nodes import NodeProcess, running_cluster
from tests.helpers.wait import until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
MODEL = "smollm2-135m"
PROMPTS = [
    "Write a short story about a fox.",
    "Explain how rain forms.",
    "List some fruits and their colours.",
    "Describe a busy market in the morning.",
]
TOKENS = 48


def ready(node: NodeProcess) -> list[dict]:
    return [i for i in node.get("/v1/instances")["data"] if i["ready"]]


@pytest.fixture
def trio(tmp_path_factory: pytest.TempPathFactory) -> Iterator[list[NodeProcess]]:
    with running_cluster(tmp_path_factory.mktemp("failover"), 3) as nodes:
        yield nodes


def stream(entry: NodeProcess, prompt: str, started: threading.Event | None = None) -> str:
    client = OpenAI(base_url=f"{entry.url}/v1", api_key="unused", max_retries=0, timeout=300)
    chunks = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": prompt}],
        temperature=0,
        max_tokens=TOKENS,
        stream=True,
    )
    text = ""
    for n, chunk in enumerate(chunks):
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
        if n == 8 and started is not None:
            started.set()
    return text


def split_over(nodes: list[NodeProcess], a: int, b: int) -> str:
    layers = f"{nodes[a].node_id}:0-15,{nodes[b].node_id}:15-30"
    r = httpx.post(f"{nodes[0].url}/instance", json={"model": MODEL, "layers": layers}, timeout=60)
    assert r.status_code == 200, r.text
    until(lambda: len(ready(nodes[0])) == 1, 240, "the split instance")
    return str(r.json()["instance_id"])


def run_disturbed(entry: NodeProcess, disturb: Callable[[], None]) -> list[str]:
    """The four prompts streamed at once; disturb() runs once every stream is under way."""
    events = [threading.Event() for _ in PROMPTS]
    with ThreadPoolExecutor(len(PROMPTS)) as pool:
        futures = [pool.submit(stream, entry, p, e) for p, e in zip(PROMPTS, events, strict=True)]
        for e in events:
            assert e.wait(120), "a stream did not start"
        disturb()
        return [f.result(timeout=600) for f in futures]


def test_killing_a_stage_node_mid_stream_loses_no_request(trio: list[NodeProcess]) -> None:
    split_over(trio, 1, 2)  # the API node (0) holds no stage
    expected = [stream(trio[0], p) for p in PROMPTS]
    victim = trio[2]
    got = run_disturbed(trio[0], victim.kill9)
    assert got == expected  # every stream completed, no repeated or missing text
    assert "resumed" in trio[0].log()
    survivors = [trio[0], trio[1]]
    state = survivors[0].get("/state")
    assert state["nodes"][victim.node_id]["connected"] is False
    assert all(
        victim.node_id not in [s["node_id"] for s in i["stages"]] for i in ready(survivors[0])
    )


def test_killing_the_master_mid_stream(trio: list[NodeProcess]) -> None:
    master = next(n for n in trio if n.node_id == trio[0].get("/state")["master"])
    others = [n for n in trio if n is not master]
    split_over(trio, trio.index(others[0]), trio.index(others[1]))
    entry = others[0]
    expected = [stream(entry, p) for p in PROMPTS]
    before = others[1].get("/log")["entries"]
    got = run_disturbed(entry, master.kill9)
    assert got == expected
    until(
        lambda: others[1].get("/state")["master"] not in (None, master.node_id), 10, "a new master"
    )
    after = others[1].get("/log")["entries"]
    assert after[: len(before)] == before  # no event lost
