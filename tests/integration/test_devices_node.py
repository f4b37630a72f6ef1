"""A node's devices as stages: runners on simulated GPUs (CPU runners standing in for GPUs by
index) answer as a plain one-node instance does.

One node claims two CUDA GPUs too small for SmolLM2 (`--simulated-gpus 2x0.45`: 159 MiB each
after headroom, the model needs 419 MiB at int4 in torch's formats): placement puts a stage on
each GPU and the layers that fit neither on the node's CPU, in the second GPU's runner. Another
node, in a cluster of its own, runs the model whole on its CPU. Both answer the same greedy chat.
"""

import os
import subprocess
import sys
from collections.abc import Iterator

import httpx
import pytest

from tests.helpers.nodes import NodeProcess, profiled, ready, start_cluster_node
from tests.helpers.wait import until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

MODEL = "smollm2-135m"
ARGS = ["--engine", "torch", "--no-probe-engines"]
QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


def chat(node: NodeProcess) -> str:
    body = {"model": MODEL, "messages": QUESTION, "temperature": 0, "max_tokens": 24}
    r = httpx.post(f"{node.url}/v1/chat/completions", json=body, timeout=180)
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"])


def placed(node: NodeProcess) -> dict:
    r = httpx.post(f"{node.url}/instance", json={"model": MODEL}, timeout=120)
    assert r.status_code == 200, r.text
    iid = str(r.json()["instance_id"])
    until(lambda: ready(node, iid), 240, f"{iid} ready")
    return next(i for i in node.get("/v1/instances")["data"] if i["instance_id"] == iid)


@pytest.fixture(scope="module")
def nodes(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[NodeProcess, NodeProcess]]:
    tmp = tmp_path_factory.mktemp("devices")
    started: list[NodeProcess] = []
    try:
        started.append(start_cluster_node(tmp / "gpus", args=[*ARGS, "--simulated-gpus", "2x0.45"]))
        started.append(start_cluster_node(tmp / "plain", args=ARGS))
        for node in started:
            node.wait_ready()
        until(lambda: all(profiled([node]) for node in started), 60, "the nodes' profiles")
        yield started[0], started[1]
    finally:
        for node in started:
            node.stop()


def test_stages_on_two_simulated_gpus_and_the_cpu_answer_like_one_node(
    nodes: tuple[NodeProcess, NodeProcess],
) -> None:
    gpus, plain = nodes
    profile = gpus.get("/state")["nodes"][gpus.node_id]["profile"]
    assert [(g["index"], g["backend"]) for g in profile["gpus"]] == [(0, "cuda"), (1, "cuda")]
    previews = gpus.get(f"/instance/previews?model={MODEL}")["previews"]
    best = next(p for p in previews if p["fits"])
    assert [s["device"] for s in best["stages"]] == ["cuda:0", "cuda:1"]

    split = placed(gpus)
    stages = split["stages"]
    assert [s["node_id"] for s in stages] == [gpus.node_id, gpus.node_id]
    assert [s["device"] for s in stages] == ["cuda:0", "cuda:1"]
    assert stages[0]["cpu_layers"] == 0 and stages[1]["cpu_layers"] > 0
    assert stages[0]["end"] == stages[1]["start"] and stages[1]["end"] == 30

    whole = placed(plain)
    assert [(s["start"], s["end"], s["device"]) for s in whole["stages"]] == [(0, 30, None)]
    answer = chat(gpus)
    assert "Paris" in answer
    assert answer == chat(plain)
    # the runners said what they run: the GPU stages on the CPU, as simulated
    assert "simulated GPU" in gpus.log()


def test_status_shows_each_gpu_and_where_each_stage_runs(
    nodes: tuple[NodeProcess, NodeProcess],
) -> None:
    gpus, _ = nodes
    until(lambda: bool(gpus.get("/v1/instances")["data"]), 60, "an instance")
    out = subprocess.run(
        [sys.executable, "-m", "shoal.cli", "status", "--api", gpus.url],
        capture_output=True, text=True, timeout=60, env=dict(os.environ, COLUMNS="400"),
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    assert "cuda:0 simulated GPU 0" in out.stdout and "cuda:1 simulated GPU 1" in out.stdout
    assert "cuda:1 + cpu " in out.stdout
