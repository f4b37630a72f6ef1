"""The torch engine's model files by Hugging Face model_type, and the builder of a shard's."""

from shoal.engines.args import ModelArgs
from shoal.engines.torch import deepseek_v3, llama, qwen3_moe
from shoal.errors import UnsupportedModel
from shoal.types.model_config import ModelConfig
from shoal.types.shard import Shard

ARCHITECTURES: dict[str, type[llama.Model]] = {
    "llama": llama.Model,
    "mistral": llama.Model,
    "qwen2": llama.Model,  # q/k/v bias: ModelConfig.attention_bias
    "qwen3": llama.Model,  # per-head q/k RMSNorm: ModelConfig.qk_norm
    "granite": llama.Model,  # multipliers folded into the weights: engines/adapt.py
    "phi3": llama.Model,  # fused projections split at load (adapt.py); LongRoPE
    "qwen3_moe": qwen3_moe.Model,  # routed experts (moe.py); q/k RMSNorm
    "deepseek_v3": deepseek_v3.Model,  # latent attention, sigmoid-routed experts; Kimi K2
}


def build_model(cfg: ModelConfig, shard: Shard) -> llama.Model:
    """The model file for cfg.architecture, holding only the shard's modules."""
    cls = ARCHITECTURES.get(cfg.architecture)
    if cls is None:
        known = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedModel(f"architecture {cfg.architecture!r} is not implemented ({known})")
    if shard.n_layers != cfg.num_hidden_layers:
        raise ValueError(f"shard {shard} does not match a model of {cfg.num_hidden_layers} layers")
    return cls(ModelArgs.from_config(cfg), shard)
