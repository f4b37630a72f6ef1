"""A `shoal node --engine llamacpp` serves SmolLM2 through llama.cpp, with torch's greedy answer."""

import importlib.util
from collections.abc import Iterator

import numpy as np
import pytest
from openai import OpenAI

from shoal.engines.base import StepInput
from shoal.models.gguf import GGUFSource
from shoal.types.ids import ModelId, RequestId
from shoal.types.shard import Shard
from tests.helpers.nodes import NodeProcess, start_node
from tests.helpers.smollm2 import SMOLLM

if importlib.util.find_spec("llama_cpp") is None:  # found, not imported: native code runs in nodes
    pytest.skip("llama-cpp-python is not installed (the llamacpp extra)", allow_module_level=True)

pytestmark = [pytest.mark.slow, pytest.mark.timeout(300)]
MODEL = "smollm2-135m"
QUESTION = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
PREFIX = 5  # greedy tokens that must match torch's


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    args = ["--engine", "llamacpp", "--model", MODEL, "--no-microbench"]
    proc = start_node(tmp_path_factory.mktemp("llamacpp"), args, threads=1)
    try:
        proc.wait_ready(MODEL, timeout=180)
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def torch_text() -> str:
    """The text of torch's first PREFIX greedy tokens for QUESTION (the reference engine)."""
    pytest.importorskip("torch")
    from shoal.engines.torch.engine import TorchEngine

    source = GGUFSource(SMOLLM)
    tokenizer = source.tokenizer()
    engine = TorchEngine(device="cpu")
    engine.load(Shard.whole(ModelId(MODEL), source.config.num_hidden_layers), source)
    tokens = np.asarray(tokenizer.encode_chat(QUESTION), dtype=np.int64)
    rid = RequestId("r")
    ids = [int(engine.forward([StepInput(rid, tokens, 0)])[0].argmax())]
    for pos in range(len(tokens), len(tokens) + PREFIX - 1):
        ids.append(int(engine.forward([StepInput(rid, np.asarray(ids[-1:]), pos)])[0].argmax()))
    engine.close()
    return tokenizer.decode(ids)


def test_the_node_offers_and_runs_llamacpp_only(node: NodeProcess) -> None:
    (me,) = node.get("/state")["nodes"].values()
    assert me["profile"]["engines"] == ["llamacpp"]
    (instance,) = node.get("/v1/instances")["data"]
    assert [(s["start"], s["end"], s["engine"]) for s in instance["stages"]] == [
        (0, 30, "llamacpp")
    ]


def test_greedy_answer_starts_like_torch(node: NodeProcess, torch_text: str) -> None:
    client = OpenAI(base_url=f"{node.url}/v1", api_key="unused", max_retries=0, timeout=120)
    reply = client.chat.completions.create(
        model=MODEL,
        messages=QUESTION,  # type: ignore[arg-type]
        temperature=0,
        max_tokens=12,
    )
    text = reply.choices[0].message.content or ""
    assert text.startswith(torch_text.strip()), (text, torch_text)
    assert "Paris" in text
