"""The torch engine's logits equal transformers' on tiny random models, whole and in two shards."""

import numpy as np
import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from shoal.engines.base import StepInput  # noqa: E402
from shoal.engines.torch.engine import TorchEngine  # noqa: E402
from shoal.errors import UnsupportedModel  # noqa: E402
from shoal.types.ids import RequestId  # noqa: E402
from tests.helpers.tiny import (  # noqa: E402
    N_LAYERS,
    VARIANTS,
    VOCAB,
    DictSource,
    hf_logits,
    shard,
    tiny_config,
    tiny_source,
)

TOKENS = np.random.default_rng(7).integers(0, VOCAB, 12)
RID = RequestId("r")


def run(variant: str, start: int, end: int, data: np.ndarray) -> np.ndarray:
    engine = TorchEngine(device="cpu")
    engine.load(shard(start, end), tiny_source(variant))
    return engine.forward([StepInput(RID, data, 0)], all_logits=True)[0]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_whole_model_matches_transformers(variant: str) -> None:
    got = run(variant, 0, N_LAYERS, TOKENS)
    assert np.abs(got - hf_logits(variant, TOKENS)).max() <= 1e-4


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_two_shards_match_transformers(variant: str) -> None:
    hidden = run(variant, 0, 1, TOKENS)
    got = run(variant, 1, N_LAYERS, hidden)
    assert np.abs(got - hf_logits(variant, TOKENS)).max() <= 1e-4


def test_unknown_architecture_and_rope_are_refused() -> None:
    engine = TorchEngine(device="cpu")
    with pytest.raises(UnsupportedModel, match="gpt2"):
        engine.load(shard(), DictSource(tiny_config("gpt2"), {}))
    yarn = tiny_config().model_copy(update={"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(UnsupportedModel, match="yarn"):
        engine.load(shard(), DictSource(yarn, {}))


def test_missing_and_unexpected_weights_are_named() -> None:
    source = tiny_source("llama")
    weights = dict(source.weights)
    del weights["model.layers.1.mlp.up_proj.weight"]
    weights["model.layers.1.mlp.extra.weight"] = np.zeros(3, np.float32)
    engine = TorchEngine(device="cpu")
    with pytest.raises(UnsupportedModel, match=r"up_proj[\s\S]*extra"):
        engine.load(shard(), DictSource(source.config, weights))
