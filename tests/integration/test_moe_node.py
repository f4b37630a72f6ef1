"""A tiny random qwen3_moe served by two real node processes, split in two stages.

Its safetensors directory (transformers' stacked experts, bf16) is served with --model-path by
both nodes; an instance placed over both answers a greedy chat completion with the text the
whole model gives when loaded in this process.
"""

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest

from shoal.engines.base import StepInput
from shoal.models.safetensors import SafetensorsSource
from shoal.types.ids import ModelId, RequestId
from shoal.types.shard import Shard
from tests.helpers.mlx_repos import make_hf_repo, qwen3_moe_config
from tests.helpers.nodes import NodeProcess, place, profiled, ready, start_cluster_node
from tests.helpers.wait import until

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

LAYERS = 4
ARGS = ["--engine", "torch", "--quant", "none", "--no-probe-engines"]
MESSAGES = [{"role": "user", "content": "hello there"}]
MAX_TOKENS = 12


def chat(node: NodeProcess, model: str) -> str:
    body = {"model": model, "messages": MESSAGES, "temperature": 0, "max_tokens": MAX_TOKENS}
    r = httpx.post(f"{node.url}/v1/chat/completions", json=body, timeout=120)
    assert r.status_code == 200, r.text
    return str(r.json()["choices"][0]["message"]["content"])


def greedy_in_process(repo: Path) -> str:
    """The whole model in this process, greedy from the chat prompt, as the node decodes it."""
    from shoal.engines.torch.engine import TorchEngine

    source = SafetensorsSource(repo)
    tokenizer = source.tokenizer()
    engine = TorchEngine(device="cpu")
    engine.load(Shard(model_id=ModelId("moe"), start=0, end=LAYERS, n_layers=LAYERS), source)
    ids = np.array(tokenizer.encode_chat(MESSAGES))
    out: list[int] = []
    start = 0
    while len(out) < MAX_TOKENS:
        logits = engine.forward([StepInput(RequestId("r"), ids, start)])[0]  # [vocab]
        token = int(logits.argmax())
        if token in tokenizer.eos_token_ids:
            break
        out.append(token)
        start, ids = start + len(ids), np.array([token])
    return tokenizer.decode(out)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    tmp = tmp_path_factory.mktemp("moe-node")
    repo = make_hf_repo(tmp / "tiny-moe", config=qwen3_moe_config(LAYERS), files=LAYERS)
    args = [*ARGS, "--model-path", str(repo)]
    nodes: list[NodeProcess] = []
    try:
        nodes.append(start_cluster_node(tmp, args=args))
        nodes[0].wait_ready()
        nodes.append(start_cluster_node(tmp, [nodes[0]], args=args))
        nodes[1].wait_ready()
        until(lambda: profiled(nodes), 60, "both nodes with their profiles")
        yield {"repo": repo, "nodes": nodes}
    finally:
        for node in nodes:
            node.stop()


def test_a_moe_split_over_two_processes_answers_as_the_whole_model(world: dict) -> None:
    a, b = world["nodes"]
    model = world["repo"].name
    split = place(a, model, f"{a.node_id}:0-2,{b.node_id}:2-4")
    until(lambda: ready(a, split), 240, "the split instance")
    stages = next(i for i in a.get("/v1/instances")["data"] if i["instance_id"] == split)
    assert [(s["start"], s["end"]) for s in stages["stages"]] == [(0, 2), (2, 4)]
    assert [s["node_id"] for s in stages["stages"]] == [a.node_id, b.node_id]
    want = greedy_in_process(world["repo"])
    assert want  # the tiny model says something within MAX_TOKENS
    assert chat(a, split) == chat(b, split) == want
