"""The numpy engine: equal to transformers on tiny models and to torch on SmolLM2, torch-free."""

import subprocess
import sys
import textwrap
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from shoal.engines.base import Engine, StepInput
from shoal.engines.numpy import llama
from shoal.engines.numpy.engine import NumpyEngine
from shoal.errors import BadRequest, UnsupportedModel
from shoal.models.gguf import GGUFSource
from shoal.types.ids import ModelId, RequestId
from shoal.types.shard import Shard
from tests.helpers.smollm2 import SMOLLM
from tests.helpers.tiny import N_LAYERS, VARIANTS, VOCAB, DictSource, shard, tiny_config

TOKENS = np.random.default_rng(7).integers(0, VOCAB, 12)
RID = RequestId("r")
ROOT = Path(__file__).resolve().parents[2]


def run(source: DictSource, start: int, end: int, data: np.ndarray) -> np.ndarray:
    engine = NumpyEngine()
    engine.load(shard(start, end), source)
    return engine.forward([StepInput(RID, data, 0)], all_logits=True)[0]


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_tiny_models_match_transformers_whole_and_in_two_shards(variant: str) -> None:
    pytest.importorskip("transformers")
    from tests.helpers.tiny import hf_logits, tiny_source

    want = hf_logits(variant, TOKENS)
    source = tiny_source(variant)
    assert np.abs(run(source, 0, N_LAYERS, TOKENS) - want).max() <= 1e-4
    hidden = run(source, 0, 1, TOKENS)
    assert np.abs(run(source, 1, N_LAYERS, hidden) - want).max() <= 1e-4


def test_long_prompts_attend_in_query_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("transformers")
    from tests.helpers.tiny import hf_logits, tiny_source

    monkeypatch.setattr(llama, "QUERY_BLOCK", 5)  # 12 tokens: blocks of 5, 5, 2
    engine = NumpyEngine()
    engine.load(shard(), tiny_source("qwen3"))
    first = engine.forward([StepInput(RID, TOKENS[:3], 0)], all_logits=True)[0]
    rest = engine.forward([StepInput(RID, TOKENS[3:], 3)], all_logits=True)[0]
    got = np.concatenate([first, rest])  # the second chunk's blocks start mid-prefix
    assert np.abs(got - hf_logits("qwen3", TOKENS)).max() <= 1e-4


def test_unknown_architecture_rope_and_dtype_are_refused() -> None:
    with pytest.raises(UnsupportedModel, match="gpt2"):
        NumpyEngine().load(shard(), DictSource(tiny_config("gpt2"), {}))
    yarn = tiny_config().model_copy(update={"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(UnsupportedModel, match="yarn"):
        NumpyEngine().load(shard(), DictSource(yarn, {}))
    with pytest.raises(BadRequest, match="float16"):
        NumpyEngine(dtype="float16")


def test_missing_unexpected_and_misshapen_weights_are_named() -> None:
    weights = random_weights()
    del weights["model.layers.1.mlp.up_proj.weight"]
    weights["model.layers.1.mlp.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(UnsupportedModel, match=r"up_proj[\s\S]*extra"):
        NumpyEngine().load(shard(), DictSource(tiny_config(), weights))
    weights = random_weights()
    weights["model.norm.weight"] = np.ones(3, np.float32)
    with pytest.raises(UnsupportedModel, match=r"model.norm.weight: shape \(3,\)"):
        NumpyEngine().load(shard(), DictSource(tiny_config(), weights))


def random_weights() -> dict[str, np.ndarray]:
    """Weights of tiny_config()'s llama from numpy alone: names and shapes as in a checkpoint."""
    cfg = tiny_config()
    h, i, d = cfg.hidden_size, cfg.intermediate_size, cfg.head_dim
    q, kv = cfg.num_attention_heads * d, cfg.num_key_value_heads * d
    layer = {
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "mlp.gate_proj.weight": (i, h),
        "mlp.up_proj.weight": (i, h),
        "mlp.down_proj.weight": (h, i),
        "input_layernorm.weight": (h,),
        "post_attention_layernorm.weight": (h,),
    }
    shapes = {
        f"model.layers.{n}.{k}": s for n in range(cfg.num_hidden_layers) for k, s in layer.items()
    }
    shapes |= {
        "model.embed_tokens.weight": (cfg.vocab_size, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (cfg.vocab_size, h),
    }
    rng = np.random.default_rng(0)
    return {
        k: (rng.standard_normal(s) * s[-1] ** -0.5).astype(np.float32) for k, s in shapes.items()
    }


def test_runs_with_torch_blocked() -> None:
    child = textwrap.dedent(
        """
        import sys
        sys.modules["torch"] = None  # any `import torch` now raises ImportError
        import numpy as np
        from shoal.engines.base import StepInput
        from shoal.engines.registry import create_engine
        from shoal.models import gguf, safetensors  # the loaders must not need torch either
        from shoal.types.ids import ModelId, RequestId
        from shoal.types.shard import Shard
        from tests.helpers.smollm2 import SMOLLM
        from tests.helpers.tiny import DictSource, shard, tiny_config
        from tests.unit.test_numpy_engine import random_weights

        engine = create_engine("numpy")
        engine.load(shard(), DictSource(tiny_config(), random_weights()))
        (logits,) = engine.forward([StepInput(RequestId("r"), np.arange(5), 0)])
        assert logits.shape == (128,) and np.isfinite(logits).all()
        # One layer of the real GGUF: header, dequantization and a forward pass.
        real = gguf.GGUFSource(SMOLLM)
        layer = Shard(model_id=ModelId("m"), start=10, end=11, n_layers=30)
        engine.load(layer, real)
        (hidden,) = engine.forward([StepInput(RequestId("r"), np.ones((4, 576), np.float32), 0)])
        assert hidden.shape == (4, 576) and np.isfinite(hidden).all()
        assert not [m for m, mod in sys.modules.items() if m.startswith("torch") and mod]
        print("ok")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", child], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"


# --- the real model ----------------------------------------------------------------------------


class _Cached:
    """A GGUF source whose tensors are dequantized once for both engines."""

    def __init__(self, source: GGUFSource) -> None:
        self.config = source.config
        self.whole = Shard.whole(ModelId("smollm2"), source.config.num_hidden_layers)
        self._tensors = source.tensors(self.whole)

    def tensors(self, shard: Shard) -> dict[str, np.ndarray]:
        assert shard == self.whole
        return dict(self._tensors)


@cache
def smollm2() -> tuple[_Cached, list[int]]:
    source = GGUFSource(SMOLLM)
    chat = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    return _Cached(source), source.tokenizer().encode_chat(chat)


def greedy(engine: Engine, prompt: list[int], n: int) -> tuple[np.ndarray, list[int]]:
    """Prompt logits [T, vocab] and n greedy tokens after them."""
    (logits,) = engine.forward([StepInput(RID, np.array(prompt), 0)], all_logits=True)
    out = [int(logits[-1].argmax())]
    for i in range(n - 1):
        (last,) = engine.forward([StepInput(RID, np.array(out[-1:]), len(prompt) + i)])
        out.append(int(last.argmax()))
    return logits, out


@pytest.mark.slow
def test_smollm2_matches_torch() -> None:
    pytest.importorskip("torch")
    from shoal.engines.torch.engine import TorchEngine

    source, prompt = smollm2()
    ours, theirs = NumpyEngine(), TorchEngine(device="cpu")
    ours.load(source.whole, source)
    theirs.load(source.whole, source)
    got, got_tokens = greedy(ours, prompt, 8)
    want, want_tokens = greedy(theirs, prompt, 8)
    assert np.abs(got - want).max() <= 1e-3
    assert got_tokens == want_tokens
