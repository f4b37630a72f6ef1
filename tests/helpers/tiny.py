"""Tiny random models and an in-memory WeightSource for engine tests.

`tiny_config` needs nothing but shoal; `tiny_hf` and `tiny_source` build a seeded transformers
model (torch + transformers) with weights scaled so activations and logits are O(1).
"""

import json
import struct
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

import numpy as np

from shoal.models.safetensors import split_experts
from shoal.types.ids import ModelId
from shoal.types.model_config import ModelConfig
from shoal.types.shard import Shard

if TYPE_CHECKING:
    from transformers import PreTrainedModel

N_LAYERS = 4
HIDDEN = 64
VOCAB = 128
MODEL_ID = ModelId("tiny")

BASE: dict[str, Any] = {
    "hidden_size": HIDDEN,
    "intermediate_size": 128,
    "num_hidden_layers": N_LAYERS,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": VOCAB,
    "max_position_embeddings": 256,
    "rms_norm_eps": 1e-6,
    "tie_word_embeddings": False,
}

# variant → (model_type, config overrides)
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "llama": ("llama", {}),
    "llama3-rope": (
        "llama",
        {
            "rope_theta": 50000.0,
            "rope_scaling": {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32,
            },
        },
    ),
    "mistral-linear-rope": ("mistral", {"rope_scaling": {"rope_type": "linear", "factor": 2.0}}),
    "qwen2": ("qwen2", {"rope_theta": 1e6}),
    "qwen3": ("qwen3", {"head_dim": 32, "rope_theta": 1e6, "tie_word_embeddings": True}),
    # 8 experts, top 2, layer 1 dense; 128 wide so MLX's groups of 64 fit
    "qwen3_moe": (
        "qwen3_moe",
        {
            "hidden_size": 128,
            "head_dim": 32,
            "rope_theta": 1e6,
            "num_experts": 8,
            "num_experts_per_tok": 2,
            "moe_intermediate_size": 64,
            "norm_topk_prob": True,
            "mlp_only_layers": [1],
        },
    ),
    # granite 3.3's multipliers (tied head: untied at load, since its scale differs)
    "granite": (
        "granite",
        {
            "embedding_multiplier": 12.0,
            "residual_multiplier": 0.22,
            "attention_multiplier": 0.015625,
            "logits_scaling": 8.0,
            "tie_word_embeddings": True,
        },
    ),
    # phi3: fused qkv_proj and gate_up_proj; LongRoPE past an original context of 32
    "phi3": (
        "phi3",
        {
            "original_max_position_embeddings": 32,
            "rope_scaling": {
                "type": "longrope",
                "short_factor": [1.0, 1.1, 1.3, 1.2, 1.6, 1.4, 1.9, 2.0],
                "long_factor": [1.0, 1.5, 2.5, 3.0, 4.5, 6.0, 7.5, 9.0],
            },
            "pad_token_id": 0,
        },
    ),
}


class DictSource:
    """WeightSource over a whole-model dict of float32 arrays under Hugging Face names."""

    def __init__(self, config: ModelConfig, weights: dict[str, np.ndarray]) -> None:
        self._config = config
        self.weights = weights

    @property
    def config(self) -> ModelConfig:
        return self._config

    def tensors(self, shard: Shard) -> dict[str, np.ndarray]:
        """The shard's tensors only, as a file-backed source would return them."""
        layers = {f"model.layers.{i}." for i in range(shard.start, shard.end)}
        out = {
            name: array
            for name, array in self.weights.items()
            if any(name.startswith(prefix) for prefix in layers)
        }
        if shard.is_first:
            out["model.embed_tokens.weight"] = self.weights["model.embed_tokens.weight"]
        if shard.is_last:
            out["model.norm.weight"] = self.weights["model.norm.weight"]
            head = self.weights.get("lm_head.weight")
            out["lm_head.weight"] = (
                head if head is not None else self.weights["model.embed_tokens.weight"]
            )
        return out


def shard(start: int = 0, end: int = N_LAYERS) -> Shard:
    """Layers [start, end) of the tiny model."""
    return Shard(model_id=MODEL_ID, start=start, end=end, n_layers=N_LAYERS)


def tiny_config(architecture: str = "llama") -> ModelConfig:
    """The tiny model's ModelConfig, without torch."""
    return ModelConfig(
        architecture=architecture,
        num_hidden_layers=N_LAYERS,
        hidden_size=HIDDEN,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=HIDDEN // 4,
        vocab_size=VOCAB,
        max_position_embeddings=256,
    )


@cache
def tiny_hf(variant: str = "llama", seed: int = 0) -> "PreTrainedModel":
    """A seeded random transformers causal LM of the variant, float32, eval mode."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    model_type, overrides = VARIANTS[variant]
    config = AutoConfig.for_model(model_type, **{**BASE, **overrides})
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    randomize(model, torch.Generator().manual_seed(seed), biases=True)
    return model.eval()


def randomize(model: Any, generator: Any, *, biases: bool = False) -> None:
    """Seeded random weights with O(1) activations and logits: norms near 1, embeddings of unit
    scale, projections scaled by 1/sqrt(fan-in); biases at 0.1 if `biases`, else as the
    projections."""
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator)
            if name.endswith("norm.weight"):
                param.copy_(1.0 + 0.1 * noise)
            elif biases and name.endswith("bias"):
                param.copy_(0.1 * noise)
            elif name.endswith("embed_tokens.weight"):
                param.copy_(noise)
            else:
                param.copy_(noise * param.shape[-1] ** -0.5)


@cache
def tiny_source(variant: str = "llama", seed: int = 0) -> DictSource:
    """DictSource over tiny_hf(variant, seed)'s weights and config."""
    model = tiny_hf(variant, seed)
    state = {k: v.detach().float().numpy().copy() for k, v in model.state_dict().items()}
    # transformers 5 stacks experts; the engines take one float matrix per expert
    weights = cast(dict[str, np.ndarray], split_experts(state))
    return DictSource(ModelConfig.from_hf(model.config.to_dict()), weights)


def hf_logits(variant: str, tokens: np.ndarray, seed: int = 0) -> np.ndarray:
    """transformers' logits [T, vocab] for one sequence."""
    import torch

    model = tiny_hf(variant, seed)
    with torch.no_grad():
        ids = torch.from_numpy(tokens.astype(np.int64))[None]
        return model(ids).logits[0].float().numpy()  # [T, vocab]


def write_fake_model(path: Path) -> Path:
    """A config.json and one tiny safetensors file in path: all the fake engine reads."""
    (path / "config.json").write_text(json.dumps({**BASE, "model_type": "llama"}))
    header = json.dumps({"unused": {"dtype": "F32", "shape": [1], "data_offsets": [0, 4]}})
    blob = header.encode()
    (path / "model.safetensors").write_bytes(struct.pack("<Q", len(blob)) + blob + bytes(4))
    return path
