"""The torch engine on the real SmolLM2 GGUF: logits equal transformers', splits equal the whole."""

from typing import Any

import numpy as np
import pytest

from shoal.engines.base import StepInput
from shoal.engines.torch.engine import TorchEngine
from shoal.models.gguf import GGUFSource
from shoal.types.ids import ModelId, RequestId
from shoal.types.shard import Shard
from tests.helpers.smollm2 import SMOLLM

pytestmark = pytest.mark.slow
LAYERS = 30
PROMPT = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]


@pytest.fixture(scope="module")
def source() -> GGUFSource:
    return GGUFSource(SMOLLM)


@pytest.fixture(scope="module")
def tokens(source: GGUFSource) -> np.ndarray:
    return np.asarray(source.tokenizer().encode_chat(PROMPT), dtype=np.int64)


def engine(source: GGUFSource, start: int, end: int) -> TorchEngine:
    e = TorchEngine(device="cpu")
    e.load(Shard(model_id=ModelId("smollm2-135m"), start=start, end=end, n_layers=LAYERS), source)
    return e


@pytest.fixture(scope="module")
def whole_logits(source: GGUFSource, tokens: np.ndarray) -> np.ndarray:
    out = engine(source, 0, LAYERS).forward([StepInput(RequestId("r"), tokens, 0)], all_logits=True)
    return out[0]


def test_logits_match_transformers(
    hf_smollm2: Any, tokens: np.ndarray, whole_logits: np.ndarray
) -> None:
    import torch

    with torch.inference_mode():
        theirs = hf_smollm2(torch.from_numpy(tokens)[None]).logits[0].numpy()
    assert whole_logits.shape == theirs.shape == (len(tokens), 49152)
    assert float(np.abs(whole_logits - theirs).max()) <= 1e-3


def test_two_layer_ranges_passing_bytes_equal_the_whole(
    source: GGUFSource, tokens: np.ndarray, whole_logits: np.ndarray
) -> None:
    first, second = engine(source, 0, 13), engine(source, 13, LAYERS)
    hidden = first.forward([StepInput(RequestId("r"), tokens, 0)])[0]
    wire = hidden.astype(np.float32).tobytes()  # what crosses the network
    received = np.frombuffer(wire, dtype=np.float32).reshape(len(tokens), -1)
    logits = second.forward([StepInput(RequestId("r"), received, 0)], all_logits=True)[0]
    assert float(np.abs(logits - whole_logits).max()) <= 1e-4
    # and decoding continues across the split from both caches
    nxt = np.asarray([int(logits[-1].argmax())])
    h = first.forward([StepInput(RequestId("r"), nxt, len(tokens))])[0]
    step = second.forward([StepInput(RequestId("r"), h, len(tokens))])[0]
    whole = engine(source, 0, LAYERS)
    whole.forward([StepInput(RequestId("r"), tokens, 0)])
    ref = whole.forward([StepInput(RequestId("r"), nxt, len(tokens))])[0]
    assert float(np.abs(step - ref).max()) <= 1e-4


def test_greedy_answer_is_paris(source: GGUFSource, tokens: np.ndarray) -> None:
    e = engine(source, 0, LAYERS)
    tokenizer = source.tokenizer()
    out: list[int] = []
    logits = e.forward([StepInput(RequestId("p"), tokens, 0)])[0]
    for _ in range(8):
        out.append(int(logits.argmax()))
        if out[-1] in tokenizer.eos_token_ids:
            break
        step = np.asarray(out[-1:])
        logits = e.forward([StepInput(RequestId("p"), step, len(tokens) + len(out) - 1)])[0]
    assert "Paris" in tokenizer.decode(out)
