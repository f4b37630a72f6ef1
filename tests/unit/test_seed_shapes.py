"""The seed cards' shapes against their original repos' config.json, read as the engines read it.

CONFIGS holds, per original repo, the config.json fields that shape the decoder, spelled and
valued as on the Hugging Face Hub (other fields left out). Each goes through ModelConfig.from_hf
and must give the card's layers, widths, heads, vocabulary, context, experts and latent ranks;
hub_card.py must make the same shape from it. The 48 LongRoPE factors of Phi-3 Mini are stand-ins
(the shape does not depend on them).
"""

from typing import Any

import pytest

from shoal.models.catalog import builtin_cards
from shoal.models.hub import RepoFile, RepoListing
from shoal.models.hub_card import card_from_config
from shoal.types.model_card import HubWeights, ModelCard
from shoal.types.model_config import ARCHITECTURES, ModelConfig

LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}  # fmt: skip
QWEN3_MOE = {"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"],
             "head_dim": 128, "vocab_size": 151936, "norm_topk_prob": True,
             "decoder_sparse_step": 1, "mlp_only_layers": [], "tie_word_embeddings": False,
             "rms_norm_eps": 1e-06, "attention_bias": False, "rope_scaling": None}  # fmt: skip
DEEPSEEK = {"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"],
            "hidden_size": 7168, "num_hidden_layers": 61, "intermediate_size": 18432,
            "moe_intermediate_size": 2048, "q_lora_rank": 1536, "kv_lora_rank": 512,
            "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "v_head_dim": 128,
            "n_shared_experts": 1, "num_experts_per_tok": 8, "moe_layer_freq": 1,
            "topk_method": "noaux_tc", "scoring_func": "sigmoid", "norm_topk_prob": True,
            "rms_norm_eps": 1e-06, "tie_word_embeddings": False}  # fmt: skip

CONFIGS: dict[str, dict[str, Any]] = {
    "meta-llama/Llama-3.2-1B-Instruct": {
        "model_type": "llama", "hidden_size": 2048, "intermediate_size": 8192,
        "num_hidden_layers": 16, "num_attention_heads": 32, "num_key_value_heads": 8,
        "head_dim": 64, "vocab_size": 128256, "max_position_embeddings": 131072,
        "rope_theta": 500000.0, "rope_scaling": {**LLAMA3_ROPE, "factor": 32.0},
        "rms_norm_eps": 1e-05, "tie_word_embeddings": True,
    },
    "meta-llama/Llama-3.2-3B-Instruct": {
        "model_type": "llama", "hidden_size": 3072, "intermediate_size": 8192,
        "num_hidden_layers": 28, "num_attention_heads": 24, "num_key_value_heads": 8,
        "head_dim": 128, "vocab_size": 128256, "max_position_embeddings": 131072,
        "rope_theta": 500000.0, "rope_scaling": {**LLAMA3_ROPE, "factor": 32.0},
        "rms_norm_eps": 1e-05, "tie_word_embeddings": True,
    },
    "meta-llama/Llama-3.1-8B-Instruct": {
        "model_type": "llama", "hidden_size": 4096, "intermediate_size": 14336,
        "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
        "vocab_size": 128256, "max_position_embeddings": 131072, "rope_theta": 500000.0,
        "rope_scaling": {**LLAMA3_ROPE, "factor": 8.0}, "rms_norm_eps": 1e-05,
        "tie_word_embeddings": False,
    },
    "meta-llama/Llama-3.1-70B-Instruct": {
        "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672,
        "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
        "vocab_size": 128256, "max_position_embeddings": 131072, "rope_theta": 500000.0,
        "rope_scaling": {**LLAMA3_ROPE, "factor": 8.0}, "rms_norm_eps": 1e-05,
        "tie_word_embeddings": False,
    },
    "meta-llama/Llama-3.3-70B-Instruct": {
        "model_type": "llama", "hidden_size": 8192, "intermediate_size": 28672,
        "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8,
        "vocab_size": 128256, "max_position_embeddings": 131072, "rope_theta": 500000.0,
        "rope_scaling": {**LLAMA3_ROPE, "factor": 8.0}, "rms_norm_eps": 1e-05,
        "tie_word_embeddings": False,
    },
    "Qwen/Qwen3-0.6B": {
        "model_type": "qwen3", "hidden_size": 1024, "intermediate_size": 3072,
        "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
        "head_dim": 128, "vocab_size": 151936, "max_position_embeddings": 40960,
        "rope_theta": 1000000, "rope_scaling": None, "rms_norm_eps": 1e-06,
        "tie_word_embeddings": True, "attention_bias": False,
    },
    "HuggingFaceTB/SmolLM2-135M-Instruct": {
        "model_type": "llama", "hidden_size": 576, "intermediate_size": 1536,
        "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
        "vocab_size": 49152, "max_position_embeddings": 8192, "rope_theta": 100000,
        "rms_norm_eps": 1e-05, "tie_word_embeddings": True,
    },
    "ibm-granite/granite-3.3-2b-instruct": {
        "model_type": "granite", "architectures": ["GraniteForCausalLM"], "hidden_size": 2048,
        "intermediate_size": 8192, "num_hidden_layers": 40, "num_attention_heads": 32,
        "num_key_value_heads": 8, "vocab_size": 49159, "max_position_embeddings": 131072,
        "rope_theta": 10000000.0, "rms_norm_eps": 1e-05, "embedding_multiplier": 12.0,
        "residual_multiplier": 0.22, "attention_multiplier": 0.015625, "logits_scaling": 8.0,
        "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": True,
    },
    "microsoft/Phi-3-mini-128k-instruct": {
        "model_type": "phi3", "architectures": ["Phi3ForCausalLM"], "hidden_size": 3072,
        "intermediate_size": 8192, "num_hidden_layers": 32, "num_attention_heads": 32,
        "num_key_value_heads": 32, "vocab_size": 32064, "max_position_embeddings": 131072,
        "original_max_position_embeddings": 4096, "rope_theta": 10000.0,
        "rope_scaling": {"type": "longrope", "long_factor": [1.0] * 48,
                         "short_factor": [1.0] * 48},
        "rms_norm_eps": 1e-05, "tie_word_embeddings": False,
    },
    "Qwen/Qwen3-30B-A3B": {
        **QWEN3_MOE, "hidden_size": 2048, "intermediate_size": 6144, "num_hidden_layers": 48,
        "num_attention_heads": 32, "num_key_value_heads": 4, "num_experts": 128,
        "num_experts_per_tok": 8, "moe_intermediate_size": 768,
        "max_position_embeddings": 40960, "rope_theta": 1000000.0,
    },
    "Qwen/Qwen3-235B-A22B-Instruct-2507": {
        **QWEN3_MOE, "hidden_size": 4096, "intermediate_size": 12288, "num_hidden_layers": 94,
        "num_attention_heads": 64, "num_key_value_heads": 4, "num_experts": 128,
        "num_experts_per_tok": 8, "moe_intermediate_size": 1536,
        "max_position_embeddings": 262144, "rope_theta": 5000000,
    },
    "Qwen/Qwen3-Coder-480B-A35B-Instruct": {
        **QWEN3_MOE, "hidden_size": 6144, "intermediate_size": 8192, "num_hidden_layers": 62,
        "num_attention_heads": 96, "num_key_value_heads": 8, "num_experts": 160,
        "num_experts_per_tok": 8, "moe_intermediate_size": 2560,
        "max_position_embeddings": 262144, "rope_theta": 10000000,
    },
    "deepseek-ai/DeepSeek-V3.1": {
        **DEEPSEEK, "num_attention_heads": 128, "num_key_value_heads": 128,
        "n_routed_experts": 256, "first_k_dense_replace": 3, "n_group": 8, "topk_group": 4,
        "routed_scaling_factor": 2.5, "vocab_size": 129280, "max_position_embeddings": 163840,
        "rope_theta": 10000, "rope_scaling": {
            "type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
            "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    },
    "moonshotai/Kimi-K2-Instruct": {
        **DEEPSEEK, "model_type": "kimi_k2", "num_attention_heads": 64,
        "num_key_value_heads": 64, "n_routed_experts": 384, "first_k_dense_replace": 1,
        "n_group": 1, "topk_group": 1, "routed_scaling_factor": 2.827, "vocab_size": 163840,
        "max_position_embeddings": 131072, "rope_theta": 50000.0, "rope_scaling": {
            "type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
            "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
    },
    "moonshotai/Kimi-K2-Thinking": {
        **DEEPSEEK, "model_type": "kimi_k2", "num_attention_heads": 64,
        "num_key_value_heads": 64, "n_routed_experts": 384, "first_k_dense_replace": 1,
        "n_group": 1, "topk_group": 1, "routed_scaling_factor": 2.827, "vocab_size": 163840,
        "max_position_embeddings": 262144, "rope_theta": 50000.0, "rope_scaling": {
            "type": "yarn", "factor": 64.0, "original_max_position_embeddings": 4096,
            "beta_fast": 1.0, "beta_slow": 1.0, "mscale": 1.0, "mscale_all_dim": 1.0},
    },
}  # fmt: skip

CARDS = builtin_cards()


def original(card: ModelCard) -> str:
    """The card's original repo: its safetensors source (SmolLM2's hf_repo)."""
    repos = [
        w.repo for w in card.weights if isinstance(w, HubWeights) and w.format == "safetensors"
    ]
    return repos[0]


def expected_shape(cfg: ModelConfig) -> dict[str, Any]:
    """What the card must say, field by field, from the config as the engines read it."""
    moe = cfg.num_experts > 0
    return {
        "architecture": cfg.architecture,
        "layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "context_length": cfg.max_position_embeddings,
        "intermediate_size": cfg.intermediate_size,
        "experts": cfg.num_experts,
        "experts_per_token": cfg.experts_per_token,
        "expert_intermediate_size": cfg.moe_intermediate_size,
        "shared_experts": cfg.shared_experts,
        # deepseek: first_k_dense_replace; qwen3_moe: mlp_only_layers (empty in the seeds)
        "dense_layers": cfg.first_dense_layers + len(cfg.mlp_only_layers) if moe else 0,
        "q_lora_rank": cfg.q_lora_rank or 0,
        "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim,
        "qk_rope_head_dim": cfg.qk_rope_head_dim,
    }


def test_every_seed_card_has_its_config_here() -> None:
    assert {original(c) for c in CARDS.values()} == set(CONFIGS)
    assert all(c.architecture in ARCHITECTURES for c in CARDS.values())


@pytest.mark.parametrize("model_id", sorted(CARDS))
def test_card_shape_is_the_config_json(model_id: str) -> None:
    card = CARDS[model_id]  # type: ignore[index]
    want = expected_shape(ModelConfig.from_hf(CONFIGS[original(card)]))
    got = {name: getattr(card, name) for name in want}
    assert got == want


@pytest.mark.parametrize("repo", sorted(CONFIGS))
def test_a_card_made_from_the_config_has_the_seed_shape(repo: str) -> None:
    listing = RepoListing(
        repo=repo, commit="c" * 40, files=(RepoFile("model.safetensors", 10, None, None),)
    )
    made = card_from_config(repo, CONFIGS[repo], listing)
    seeds = [c for c in CARDS.values() if original(c) == repo]
    want = expected_shape(ModelConfig.from_hf(CONFIGS[repo]))
    assert {name: getattr(made, name) for name in want} == want
    assert all(made.kv_bytes_per_token == seed.kv_bytes_per_token for seed in seeds)


# KV cache bytes a token costs over all layers at fp16: keys and values per KV head, or MLA's
# latent (kv_lora_rank + qk_rope_head_dim) per layer.
KV_BYTES = [
    ("llama-3.2-1b", 16 * 2 * 8 * 64 * 2),
    ("llama-3.3-70b", 80 * 2 * 8 * 128 * 2),
    ("qwen3-30b", 48 * 2 * 4 * 128 * 2),
    ("phi-3-mini", 32 * 2 * 32 * 96 * 2),
    ("deepseek-v3.1-4bit", 61 * (512 + 64) * 2),
    ("kimi-k2-thinking", 61 * (512 + 64) * 2),
]


@pytest.mark.parametrize(("model_id", "kv"), KV_BYTES)
def test_kv_bytes_per_token(model_id: str, kv: int) -> None:
    assert CARDS[model_id].kv_bytes_per_token == kv  # type: ignore[index]


def test_latent_attention_caches_57_times_less_than_its_heads_would() -> None:
    deepseek = CARDS["deepseek-v3.1-8bit"]  # type: ignore[index]
    heads = deepseek.layers * 2 * deepseek.kv_heads * deepseek.head_dim * 2
    assert heads / deepseek.kv_bytes_per_token == pytest.approx(56.9, abs=0.1)
