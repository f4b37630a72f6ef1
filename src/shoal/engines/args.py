"""Decoder hyperparameters as every engine's model file uses them (no framework imports)."""

from dataclasses import dataclass
from typing import Any

from shoal.types.model_config import ModelConfig


@dataclass(frozen=True)
class ModelArgs:
    """Hyperparameters of the decoder, as the model file uses them."""

    model_type: str
    hidden_size: int
    num_hidden_layers: int
    intermediate_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict[str, Any] | None
    tie_word_embeddings: bool
    attention_bias: bool
    qk_norm: bool

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "ModelArgs":
        return cls(
            model_type=cfg.architecture,
            hidden_size=cfg.hidden_size,
            num_hidden_layers=cfg.num_hidden_layers,
            intermediate_size=cfg.intermediate_size,
            num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_key_value_heads,
            head_dim=cfg.head_dim,
            vocab_size=cfg.vocab_size,
            rms_norm_eps=cfg.rms_norm_eps,
            rope_theta=cfg.rope_theta,
            rope_scaling=cfg.rope_scaling,
            tie_word_embeddings=cfg.tie_word_embeddings,
            attention_bias=cfg.attention_bias,
            qk_norm=cfg.qk_norm,
        )
