"""Decoder hyperparameters as every engine's model file uses them (no framework imports)."""

from dataclasses import dataclass
from typing import Any

from shoal.errors import UnsupportedModel
from shoal.types.model_config import ModelConfig, is_moe_layer


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
    # Mixture of experts and latent attention: ModelConfig's fields of the same names.
    num_experts: int = 0
    experts_per_token: int = 0
    moe_intermediate_size: int = 0
    shared_experts: int = 0
    norm_topk_prob: bool = False
    first_dense_layers: int = 0
    moe_layer_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    router: str = "softmax"
    n_group: int = 1
    topk_group: int = 1
    routed_scaling_factor: float = 1.0
    q_lora_rank: int | None = None
    kv_lora_rank: int = 0
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0

    def is_moe_layer(self, layer: int) -> bool:
        """Whether decoder layer `layer` (global index) routes to experts (as ModelConfig)."""
        return is_moe_layer(self, self.model_type, layer)

    @classmethod
    def from_config(cls, cfg: ModelConfig) -> "ModelArgs":
        """The arguments of cfg, refusing what no model file here computes."""
        if cfg.partial_rotary_factor != 1.0:  # phi4-mini: a share of each head left unrotated
            raise UnsupportedModel(
                f"{cfg.architecture}: partial_rotary_factor {cfg.partial_rotary_factor} "
                "is not implemented (every head dimension rotated only)"
            )
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
            # granite's multipliers fold into the embedding and the head apart (adapt.py)
            tie_word_embeddings=cfg.tie_word_embeddings
            and cfg.embedding_multiplier == 1.0
            and cfg.logits_scaling == 1.0,
            attention_bias=cfg.attention_bias,
            qk_norm=cfg.qk_norm,
            **{name: getattr(cfg, name) for name in _MOE_FIELDS},
        )


_MOE_FIELDS = (
    "num_experts", "experts_per_token", "moe_intermediate_size", "shared_experts",
    "norm_topk_prob", "first_dense_layers", "moe_layer_step", "mlp_only_layers", "router",
    "n_group", "topk_group", "routed_scaling_factor", "q_lora_rank", "kv_lora_rank",
    "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
)  # fmt: skip


def longrope_context(args: ModelArgs) -> int | None:
    """LongRoPE's original context, or None for any other rope.

    As transformers applies it (5.x `longrope_frequency_update`): a pass whose last position is
    at or past it rotates all its positions with the long factors, any other pass with the short
    ones; keys already cached keep theirs. Engines decide it per request, so a batch gives each
    request what it would get alone.
    """
    scaling = args.rope_scaling or {}
    if scaling.get("rope_type", scaling.get("type")) != "longrope":
        return None
    return int(scaling["original_max_position_embeddings"])
