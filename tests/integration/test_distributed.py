"""A model split across three real node processes: same tokens, any entry node, spread, crash."""

import os
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import psutil
import pytest
from openai import OpenAI

from tests.helpers.nodes import NodeProcess, running_cluster
from tests.helpers.wait import until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
MODEL = "smollm2-135m"
PROMPTS = [
    "What is the capital of France?",
    "Name three colours.",
    "Write one sentence about the sea.",
]


def place(node: NodeProcess, layers: str) -> str:
    r = httpx.post(f"{node.url}/instance", json={"model": MODEL, "layers": layers}, timeout=60)
    assert r.status_code == 200, r.text
    return str(r.json()["instance_id"])


def instances(node: NodeProcess) -> dict[str, dict]:
    return {i["instance_id"]: i for i in node.get("/v1/instances")["data"]}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    with running_cluster(tmp_path_factory.mktemp("split"), 3) as nodes:
        ids = [n.node_id for n in nodes]
        whole = place(nodes[0], f"{ids[0]}:0-30")
        split = place(nodes[1], f"{ids[0][:20]}:0-10,{ids[1]}:10-20,{ids[2]}:20-30")
        until(lambda: all(i["ready"] for i in instances(nodes[2]).values()), 240, "instances")
        yield {"nodes": nodes, "whole": whole, "split": split}


def client(node: NodeProcess) -> OpenAI:
    return OpenAI(base_url=f"{node.url}/v1", api_key="unused", max_retries=0, timeout=120)


def test_split_instance_has_three_stages_on_three_nodes(cluster: dict) -> None:
    split = instances(cluster["nodes"][0])[cluster["split"]]
    assert [(s["start"], s["end"]) for s in split["stages"]] == [(0, 10), (10, 20), (20, 30)]
    assert [s["node_id"] for s in split["stages"]] == [n.node_id for n in cluster["nodes"]]


@pytest.mark.parametrize("i", range(3))
def test_split_greedy_output_equals_single_node_from_any_entry_node(cluster: dict, i: int) -> None:
    entry = client(cluster["nodes"][i])  # each prompt enters through a different node
    ask = {
        "messages": [{"role": "user", "content": PROMPTS[i]}],
        "temperature": 0,
        "max_tokens": 24,
    }
    whole = entry.chat.completions.create(model=cluster["whole"], **ask)  # type: ignore[call-overload]
    split = entry.chat.completions.create(model=cluster["split"], **ask)  # type: ignore[call-overload]
    assert split.system_fingerprint == cluster["split"]
    assert whole.system_fingerprint == cluster["whole"]
    assert split.choices[0].message.content == whole.choices[0].message.content
    streamed = entry.chat.completions.create(model=cluster["split"], stream=True, **ask)  # type: ignore[call-overload]
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == whole.choices[0].message.content


def test_concurrent_requests_spread_over_both_instances(cluster: dict) -> None:
    entry = client(cluster["nodes"][0])

    def ask(k: int) -> str | None:
        reply = entry.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": f"Count to {k + 3}."}],
            temperature=0,
            max_tokens=12,
        )
        return reply.system_fingerprint

    with ThreadPoolExecutor(8) as pool:
        used = list(pool.map(ask, range(8)))
    assert set(used) == {cluster["whole"], cluster["split"]}
    assert min(used.count(cluster["whole"]), used.count(cluster["split"])) >= 2


def test_killed_stage_process_is_an_event_and_is_restarted_not_the_node(cluster: dict) -> None:
    middle = cluster["nodes"][1]
    before = instances(middle)[cluster["split"]]["runners"]["1"]["data_addr"]
    children = psutil.Process(middle.proc.pid).children()
    runners = [c for c in children if "--preload" not in c.cmdline()]  # not the spare
    assert len(runners) == 1  # stage 1 of the split instance
    os.kill(runners[0].pid, signal.SIGKILL)

    def restarted() -> bool:
        runner = instances(cluster["nodes"][2])[cluster["split"]]["runners"]["1"]
        return runner["status"]["kind"] == "ready" and runner["data_addr"] != before

    until(restarted, 60, "the stage runner to be restarted")
    assert middle.get("/healthz")["status"] == "ok"
    assert "runner" in middle.log() and "crashed" in middle.log()
    reply = client(middle).chat.completions.create(
        model=cluster["split"], messages=[{"role": "user", "content": "Hi"}], max_tokens=4
    )
    assert reply.choices[0].message.content


def test_status_cli_shows_the_placements(cluster: dict, tmp_path: Path) -> None:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "shoal.cli", "status", "--api", cluster["nodes"][0].url],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert cluster["split"] in out.stdout and "★" in out.stdout
