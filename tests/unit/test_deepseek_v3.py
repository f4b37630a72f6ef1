"""deepseek_v3 (DeepSeek V3/V3.1, Kimi K2) in the torch and numpy engines, on a tiny random model.

Latent attention with q_lora, YaRN rope (factor 4 over an original 64 positions), 8 sigmoid-routed
experts in 4 groups (top 2 of the best 2 groups) with a choice-only correction bias, one shared
expert, the first layer dense. Checked against transformers' DeepseekV3ForCausalLM in float32,
and against itself: stages, batches, decoding from the compressed cache.
"""

import importlib.util
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from shoal.engines.base import Engine, StepInput
from shoal.engines.numpy.engine import NumpyEngine
from shoal.models.safetensors import SafetensorsSource, split_experts
from shoal.types.ids import ModelId, RequestId
from shoal.types.model_config import ModelConfig
from shoal.types.shard import Shard
from tests.helpers.tiny import DictSource, randomize

LAYERS, VOCAB, RANK, ROPE = 4, 320, 64, 16
CONFIG: dict[str, Any] = {
    "model_type": "deepseek_v3",
    "architectures": ["DeepseekV3ForCausalLM"],
    "hidden_size": 128,
    "intermediate_size": 256,
    "moe_intermediate_size": 64,
    "num_hidden_layers": LAYERS,
    "num_attention_heads": 4,
    "num_key_value_heads": 4,
    "n_routed_experts": 8,
    "num_experts_per_tok": 2,
    "n_group": 4,
    "topk_group": 2,
    "n_shared_experts": 1,
    "first_k_dense_replace": 1,
    "moe_layer_freq": 1,
    "routed_scaling_factor": 2.5,
    "norm_topk_prob": True,
    "scoring_func": "sigmoid",
    "topk_method": "noaux_tc",
    "q_lora_rank": 64,
    "kv_lora_rank": RANK,
    "qk_nope_head_dim": 32,
    "qk_rope_head_dim": ROPE,
    "v_head_dim": 32,
    "vocab_size": VOCAB,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "rope_scaling": {
        "type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 64,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
    "tie_word_embeddings": False,
    "attention_bias": False,
}
# q through q_a_proj, q_a_layernorm, q_b_proj; or one q_proj, with biases on kv_a and o
VARIANTS: dict[str, dict[str, Any]] = {
    "q_lora": {},
    "q_proj-bias": {"q_lora_rank": None, "attention_bias": True},
}
PROMPT = np.random.default_rng(1).integers(0, VOCAB, 20)
LONG = np.random.default_rng(2).integers(0, VOCAB, 90)  # past the original 64 positions
FLOAT_BOUND = 1e-3  # max |Δlogit| against transformers in float32 (measured 4e-6)
# max |Δlogit| / max |logit| (measured: 2.4e-2; 3e-4; 1.5e-6; 3.9e-4)
INT8_BOUND = 5e-2  # int8 blocks of the float weights against float32
SAME_BLOCKS_BOUND = 2e-3  # torch's and numpy's int8/int4 blocks of the same weights
MLX_FLOAT_BOUND = 1e-5  # MLX 4-bit weights dequantized, against mlx-lm in float32
MLX_BLOCK_BOUND = 2e-3  # the same weights held exactly in int4 blocks (15-bit activations)
ENGINES = ["torch", "numpy"]
NO_MLX = importlib.util.find_spec("mlx") is None or importlib.util.find_spec("mlx_lm") is None
with_mlx = pytest.mark.skipif(NO_MLX, reason="mlx is not installed (pip install 'mlx[cpu]' mlx-lm)")


@cache
def hf_model(variant: str = "q_lora") -> Any:
    """The seeded transformers model: O(1) activations, a correction bias that moves choices."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    config = {**CONFIG, **VARIANTS[variant]}
    hf_args = {k: v for k, v in config.items() if k not in ("model_type", "architectures")}
    config = transformers.AutoConfig.for_model("deepseek_v3", **hf_args)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    generator = torch.Generator().manual_seed(0)
    randomize(model, generator)
    with torch.no_grad():
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(0.3 * torch.randn(buffer.shape, generator=generator))
    return model


@cache
def source(variant: str = "q_lora") -> DictSource:
    model = hf_model(variant)
    state = {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}
    weights = split_experts(state)  # transformers 5 stacks experts; the engines take them apart
    config = ModelConfig.from_hf({**CONFIG, **VARIANTS[variant]})
    return DictSource(config, weights)  # type: ignore[arg-type]


def hf_logits(tokens: np.ndarray, variant: str = "q_lora") -> np.ndarray:
    import torch

    with torch.no_grad():
        ids = torch.from_numpy(tokens.astype(np.int64))[None]
        return hf_model(variant)(ids).logits[0].float().numpy()  # [T, vocab]


def shard(start: int = 0, end: int = LAYERS) -> Shard:
    return Shard(model_id=ModelId("tiny-deepseek"), start=start, end=end, n_layers=LAYERS)


def load(
    kind: str, start: int = 0, end: int = LAYERS, quant: str = "none", variant: str = "q_lora"
) -> Engine:
    engine: Engine
    if kind == "numpy":
        engine = NumpyEngine(quant=quant)
    else:
        pytest.importorskip("torch")
        from shoal.engines.torch.engine import TorchEngine

        engine = TorchEngine(device="cpu", quant=quant)
    engine.load(shard(start, end), source(variant))
    return engine


def step(engine: Engine, rid: str, data: np.ndarray, start: int) -> np.ndarray:
    """One request's pass: logits (or hidden states) [T, width] of every position."""
    return engine.forward([StepInput(RequestId(rid), data, start)], all_logits=True)[0]


@pytest.mark.parametrize(
    ("variant", "tokens"),
    [("q_lora", PROMPT), ("q_lora", LONG), ("q_proj-bias", PROMPT)],
    ids=["prompt", "past-original-context", "q_proj-and-biases"],
)
@pytest.mark.parametrize("kind", ENGINES)
def test_float_logits_equal_transformers(kind: str, variant: str, tokens: np.ndarray) -> None:
    got = step(load(kind, variant=variant), "a", tokens, 0)
    want = hf_logits(tokens, variant)
    assert np.abs(got - want).max() < FLOAT_BOUND


@pytest.mark.parametrize("kind", ENGINES)
def test_decoding_from_the_cache_equals_one_pass(kind: str) -> None:
    engine = load(kind)
    whole = step(engine, "whole", LONG, 0)
    parts = [step(engine, "parts", LONG[:50], 0), step(engine, "parts", LONG[50:70], 50)]
    parts += [step(engine, "parts", LONG[i : i + 1], i) for i in range(70, 90)]  # decode steps
    np.testing.assert_allclose(np.concatenate(parts), whole, rtol=0, atol=1e-4)


@pytest.mark.parametrize("splits", [(2,), (1, 3)], ids=["2-stages", "3-stages"])
@pytest.mark.parametrize("kind", ENGINES)
def test_stages_equal_the_whole(kind: str, splits: tuple[int, ...]) -> None:
    bounds = [0, *splits, LAYERS]
    stages = [load(kind, a, b) for a, b in zip(bounds[:-1], bounds[1:], strict=True)]
    whole = load(kind)
    for start, chunk in ((0, PROMPT[:15]), (15, PROMPT[15:16]), (16, PROMPT[16:])):
        data: np.ndarray = chunk
        for stage in stages:
            data = step(stage, "r", data, start)  # hidden [T, hidden] between stages
        np.testing.assert_allclose(data, step(whole, "r", chunk, start), rtol=0, atol=1e-4)


@pytest.mark.parametrize("kind", ENGINES)
def test_a_batch_gives_each_request_what_it_gets_alone(kind: str) -> None:
    prompts = [PROMPT[:7], LONG[:12], PROMPT[5:17], LONG[40:43]]
    alone = [greedy(load(kind), [p])[0] for p in prompts]
    together = greedy(load(kind), prompts)
    assert together == alone


def greedy(engine: Engine, prompts: list[np.ndarray], steps: int = 6) -> list[list[int]]:
    """Greedy tokens of every prompt, all of them prefilled and decoded in one batch a step."""
    batch = [StepInput(RequestId(str(i)), p, 0) for i, p in enumerate(prompts)]
    tokens: list[list[int]] = [[] for _ in prompts]
    for _ in range(steps):
        for i, logits in enumerate(engine.forward(batch)):
            tokens[i].append(int(logits.argmax()))
        batch = [
            StepInput(b.request_id, np.array([t[-1]]), b.start + b.length)
            for b, t in zip(batch, tokens, strict=True)
        ]
    return tokens


@pytest.mark.parametrize("kind", ENGINES)
def test_the_cache_holds_the_latent_and_the_rotary_key_only(kind: str) -> None:
    engine = load(kind)
    step(engine, "a", PROMPT, 0)
    caches: Any = engine._caches  # type: ignore[attr-defined]
    cache = caches.get(RequestId("a"))
    # per position and layer: kv_lora_rank + qk_rope_head_dim float32 values, not per-head k, v
    assert cache.nbytes == LAYERS * cache.capacity * (RANK + ROPE) * 4
    assert tuple(cache.k.shape) == (LAYERS, 1, cache.capacity, RANK)
    assert tuple(cache.v.shape) == (LAYERS, 1, cache.capacity, ROPE)


def block_kernels() -> None:
    from shoal.engines import native

    if native.library() is None:
        pytest.skip("no C compiler for the block kernels")


def test_int8_and_int4_run_in_block_kernels() -> None:
    """The native engine does not run deepseek_v3, so the model files run int8/int4 shards: every
    projection but kv_b_proj in blocks, in torch and numpy alike (their block products agree)."""
    block_kernels()
    from shoal.engines.numpy.llama import BlockLinear
    from shoal.engines.torch.quant import Blocked

    want = hf_logits(PROMPT)
    scale = np.abs(want).max()
    got = {}
    for kind in ENGINES:
        for quant in ("int8", "int4"):
            engine: Any = load(kind, quant=quant)
            got[kind, quant] = step(engine, "a", PROMPT, 0)
            if kind == "torch":
                layer = engine._model.model.layers["1"]
                held = [layer.self_attn.qkv_a, layer.self_attn.q_b, layer.self_attn.out]
                held += [layer.mlp.experts[7].gate_up, layer.mlp.shared_experts.down]
                assert all(isinstance(p, Blocked) for p in held)
            else:
                layer = engine._model.layers[1]
                held = [layer.self_attn.qkv_a, layer.self_attn.q_b_proj, layer.self_attn.o_proj]
                held += [layer.mlp.experts.experts[7].gate_up, layer.mlp.shared_experts.down_proj]
                assert all(isinstance(p, BlockLinear) for p in held)
    assert np.abs(got["numpy", "int8"] - want).max() / scale < INT8_BOUND
    for quant in ("int8", "int4"):
        assert np.abs(got["torch", quant] - got["numpy", quant]).max() / scale < SAME_BLOCKS_BOUND


@pytest.fixture(scope="module")
def mlx_repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, np.ndarray]:
    """mlx-lm's 4-bit deepseek_v3 of CONFIG (its per-head embed_q/unembed_out, switch_mlp
    experts) over two files, named Kimi K2's way (model_type kimi_k2, which is deepseek_v3 to
    mlx-lm and to shoal), and mlx-lm's float32 logits of PROMPT, both made in a child."""
    from tests.helpers.mlx_repos import make_mlx_repo, mlx_logits

    root = tmp_path_factory.mktemp("deepseek-mlx")
    path = make_mlx_repo(root / "q4", 4, files=2, config={**CONFIG, "model_type": "kimi_k2"})
    return path, mlx_logits(path, PROMPT, root / "logits.npy")


@pytest.mark.slow
@with_mlx
@pytest.mark.parametrize(("kind", "quant"), [(k, q) for k in ENGINES for q in ("none", "int4")])
def test_mlx_4bit_files_against_mlx_lm(
    mlx_repo: tuple[Path, np.ndarray], kind: str, quant: str
) -> None:
    if quant == "int4":
        block_kernels()
    path, want = mlx_repo
    engine: Engine
    if kind == "numpy":
        engine = NumpyEngine(quant=quant)
    else:
        pytest.importorskip("torch")
        from shoal.engines.torch.engine import TorchEngine

        engine = TorchEngine(device="cpu", quant=quant)
    engine.load(shard(), SafetensorsSource(path))
    got = step(engine, "a", PROMPT, 0)
    err = np.abs(got - want).max() / np.abs(want).max()
    assert err < (MLX_FLOAT_BOUND if quant == "none" else MLX_BLOCK_BOUND), err
    np.testing.assert_array_equal(got.argmax(-1), want.argmax(-1))


def test_a_fixed_shape_decode_step_equals_the_ordinary_one() -> None:
    """What a CUDA graph replays (llama.Context.fixed: a write at a position tensor, attention
    over the cache's whole capacity, masked) gives the ordinary step's logits; run on the CPU."""
    torch = pytest.importorskip("torch")
    from shoal.engines.torch.llama import Context

    engine: Any = load("torch")
    step(engine, "a", PROMPT[:19], 0)
    cache = engine._caches.get(RequestId("a"))
    ids, positions = torch.tensor([[int(PROMPT[19])]]), torch.tensor([[19]])
    with torch.inference_mode():
        fixed = engine._model(ids, positions, Context.fixed([cache], positions))[0, -1].numpy()
    ordinary = engine.forward([StepInput(RequestId("a"), PROMPT[19:], 19)])[0]
    np.testing.assert_allclose(fixed, ordinary, rtol=0, atol=1e-5)
