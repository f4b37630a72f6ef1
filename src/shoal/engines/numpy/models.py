"""The numpy engine's model files by Hugging Face model_type, and the builder of a shard's."""

from collections.abc import Mapping

import numpy as np

from shoal.engines.args import ModelArgs
from shoal.engines.base import ProgressFn
from shoal.engines.checkpoint import Checkpoint
from shoal.engines.numpy import deepseek_v3, llama, qwen3_moe
from shoal.engines.packed import Packed
from shoal.engines.rope import mla_rope
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


def model_args(cfg: ModelConfig, shard: Shard) -> ModelArgs:
    """The decoder's arguments, refusing a model or shard this engine cannot run."""
    if cfg.architecture not in ARCHITECTURES:
        known = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedModel(f"architecture {cfg.architecture!r} is not implemented ({known})")
    if shard.n_layers != cfg.num_hidden_layers:
        raise ValueError(f"shard {shard} does not match a model of {cfg.num_hidden_layers} layers")
    args = ModelArgs.from_config(cfg)
    if args.kv_lora_rank:  # an unknown rope_scaling raises here
        mla_rope(args)
    else:
        llama.rope_frequencies(args)
    return args


def build_model(
    args: ModelArgs,
    shard: Shard,
    tensors: Mapping[str, np.ndarray | Packed],
    progress: ProgressFn | None = None,
    formats: llama.Formats | None = None,
) -> llama.Model:
    """The model file for args.model_type, built from exactly the shard's tensors."""
    ckpt = Checkpoint(tensors)
    model = ARCHITECTURES[args.model_type](args, shard, ckpt, progress, formats)
    ckpt.finish(f"{args.model_type} shard {shard}")
    return model
