"""Runtime hyperparameters of a decoder, read from a GGUF header or a config.json."""

import math
from typing import Any, Protocol

from pydantic import Field

from shoal.types.message import Document

# Architectures the model files implement (Hugging Face model_type names). granite and phi3 are
# llama once their checkpoints are adapted at load (engines/adapt.py).
LLAMA_FAMILY = frozenset({"llama", "mistral", "qwen2", "qwen3", "granite", "phi3"})
# Mixture-of-experts decoders: qwen3_moe (softmax router), deepseek_v3 (MLA, sigmoid router;
# Kimi K2 is deepseek_v3 too).
MOE_FAMILY = frozenset({"qwen3_moe", "deepseek_v3"})
ARCHITECTURES = LLAMA_FAMILY | MOE_FAMILY


class ModelConfig(Document):
    """Everything an engine needs to build a Llama-family decoder, named as in config.json."""

    architecture: str  # Hugging Face model_type
    num_hidden_layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    intermediate_size: int = Field(gt=0)
    num_attention_heads: int = Field(gt=0)
    num_key_value_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    max_position_embeddings: int = Field(gt=0)
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # qwen2: q/k/v carry a bias
    qk_norm: bool = False  # qwen3: RMSNorm on q and k per head
    sliding_window: int | None = None
    # granite: embeddings x embedding_multiplier, each residual branch x residual_multiplier,
    # attention_multiplier the softmax scale (None: 1/sqrt(head_dim)), logits / logits_scaling
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float | None = None
    logits_scaling: float = 1.0
    partial_rotary_factor: float = 1.0  # the share of each head rotated (phi4-mini: 0.75)
    # Mixture of experts (0 experts: dense). A layer is sparse when is_moe_layer(i) says so.
    num_experts: int = Field(default=0, ge=0)  # routed experts (deepseek: n_routed_experts)
    experts_per_token: int = Field(default=0, ge=0)  # num_experts_per_tok
    moe_intermediate_size: int = Field(default=0, ge=0)  # width of one routed expert
    shared_experts: int = Field(default=0, ge=0)  # deepseek: n_shared_experts, always applied
    norm_topk_prob: bool = False  # the chosen experts' weights renormalised to sum to 1
    first_dense_layers: int = Field(default=0, ge=0)  # deepseek: first_k_dense_replace
    moe_layer_step: int = Field(default=1, gt=0)  # qwen3_moe decoder_sparse_step / moe_layer_freq
    mlp_only_layers: tuple[int, ...] = ()  # qwen3_moe: layers kept dense
    # deepseek_v3's router: sigmoid scores, e_score_correction_bias for choosing only, experts
    # in n_group groups of which topk_group are kept, weights x routed_scaling_factor
    router: str = "softmax"  # "softmax" (qwen3_moe) or "sigmoid" (deepseek_v3)
    n_group: int = Field(default=1, gt=0)
    topk_group: int = Field(default=1, gt=0)
    routed_scaling_factor: float = 1.0
    # Multi-head latent attention (deepseek_v3); kv_lora_rank 0: ordinary attention. q/k heads
    # are qk_nope_head_dim + qk_rope_head_dim wide, v heads v_head_dim; the cache holds
    # kv_lora_rank + qk_rope_head_dim values per token per layer.
    q_lora_rank: int | None = None
    kv_lora_rank: int = Field(default=0, ge=0)
    qk_nope_head_dim: int = Field(default=0, ge=0)
    qk_rope_head_dim: int = Field(default=0, ge=0)
    v_head_dim: int = Field(default=0, ge=0)

    def is_moe_layer(self, layer: int) -> bool:
        """Whether decoder layer `layer` (global index) routes to experts."""
        return is_moe_layer(self, self.architecture, layer)

    @property
    def mla(self) -> bool:
        return self.kv_lora_rank > 0

    @classmethod
    def from_hf(cls, cfg: dict[str, Any]) -> "ModelConfig":
        """Build from a Hugging Face config.json dict (v4 keys, or v5 `rope_parameters`)."""
        arch = cfg.get("model_type", "llama")
        rope = dict(cfg.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", None) or cfg.get("rope_theta", 10000.0)
        scaling = cfg.get("rope_scaling")
        if scaling is None and rope.get("rope_type", "default") != "default":
            scaling = rope
        heads = cfg["num_attention_heads"]
        max_positions = cfg.get("max_position_embeddings", 4096)
        if scaling is not None:
            scaling = _longrope(dict(scaling), cfg, max_positions)
        granite = arch == "granite"
        deepseek = arch in ("deepseek_v3", "kimi_k2")  # Kimi K2 is deepseek_v3's decoder
        arch = "deepseek_v3" if deepseek else arch
        moe = _moe_fields(cfg, deepseek)
        return cls(
            **moe,
            architecture=arch,
            num_hidden_layers=cfg["num_hidden_layers"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=(cfg.get("v_head_dim") if deepseek else cfg.get("head_dim"))
            or cfg["hidden_size"] // heads,
            vocab_size=cfg["vocab_size"],
            max_position_embeddings=max_positions,
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", arch == "qwen2"),
            qk_norm=arch in ("qwen3", "qwen3_moe"),
            sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window") else None,
            embedding_multiplier=cfg.get("embedding_multiplier", 1.0) if granite else 1.0,
            residual_multiplier=cfg.get("residual_multiplier", 1.0) if granite else 1.0,
            attention_multiplier=cfg.get("attention_multiplier", 1.0) if granite else None,
            logits_scaling=cfg.get("logits_scaling", 1.0) if granite else 1.0,
            partial_rotary_factor=rope.get(
                "partial_rotary_factor", cfg.get("partial_rotary_factor", 1.0)
            ),
        )


class _Experts(Protocol):
    @property
    def num_experts(self) -> int: ...
    @property
    def mlp_only_layers(self) -> tuple[int, ...]: ...
    @property
    def first_dense_layers(self) -> int: ...
    @property
    def moe_layer_step(self) -> int: ...


def is_moe_layer(cfg: _Experts, architecture: str, layer: int) -> bool:
    """Whether decoder layer `layer` (global index) of a config or ModelArgs routes to experts."""
    if cfg.num_experts == 0 or layer in cfg.mlp_only_layers:
        return False
    if architecture == "deepseek_v3":  # first_k_dense_replace, then every moe_layer_freq-th
        return layer >= cfg.first_dense_layers and layer % cfg.moe_layer_step == 0
    return (layer + 1) % cfg.moe_layer_step == 0  # qwen3_moe's decoder_sparse_step


def _moe_fields(cfg: dict[str, Any], deepseek: bool) -> dict[str, Any]:
    """The mixture-of-experts and latent-attention fields of a config.json, by our names."""
    if deepseek:
        if cfg.get("scoring_func", "sigmoid") != "sigmoid":
            raise ValueError(f"deepseek_v3 scoring_func {cfg['scoring_func']!r} (sigmoid only)")
        return {
            "num_experts": cfg.get("n_routed_experts") or 0,
            "experts_per_token": cfg.get("num_experts_per_tok") or 0,
            "moe_intermediate_size": cfg.get("moe_intermediate_size") or 0,
            "shared_experts": cfg.get("n_shared_experts") or 0,
            "norm_topk_prob": bool(cfg.get("norm_topk_prob", True)),
            "first_dense_layers": cfg.get("first_k_dense_replace") or 0,
            "moe_layer_step": cfg.get("moe_layer_freq") or 1,
            "router": "sigmoid",
            "n_group": cfg.get("n_group") or 1,
            "topk_group": cfg.get("topk_group") or 1,
            "routed_scaling_factor": cfg.get("routed_scaling_factor", 1.0),
            "q_lora_rank": cfg.get("q_lora_rank"),
            "kv_lora_rank": cfg.get("kv_lora_rank") or 0,
            "qk_nope_head_dim": cfg.get("qk_nope_head_dim") or 0,
            "qk_rope_head_dim": cfg.get("qk_rope_head_dim") or 0,
            "v_head_dim": cfg.get("v_head_dim") or 0,
        }
    if cfg.get("model_type") == "qwen3_moe":
        return {  # transformers 5 writes num_experts as num_local_experts
            "num_experts": cfg.get("num_experts") or cfg.get("num_local_experts") or 0,
            "experts_per_token": cfg.get("num_experts_per_tok") or 0,
            "moe_intermediate_size": cfg.get("moe_intermediate_size") or 0,
            "norm_topk_prob": bool(cfg.get("norm_topk_prob", False)),
            "moe_layer_step": cfg.get("decoder_sparse_step") or 1,
            "mlp_only_layers": tuple(cfg.get("mlp_only_layers") or ()),
        }
    return {}


def _longrope(scaling: dict[str, Any], cfg: dict[str, Any], max_positions: int) -> dict[str, Any]:
    """A LongRoPE (phi3's "longrope", formerly "su") rope_scaling with every value Hugging Face
    derives filled in: the original context, `factor` (max / original positions) and the
    `attention_factor` on cos and sin (sqrt(1 + ln factor / ln original), 1 if factor <= 1)."""
    if scaling.get("rope_type", scaling.get("type")) not in ("longrope", "su"):
        return scaling
    original = scaling.get("original_max_position_embeddings") or cfg.get(
        "original_max_position_embeddings", max_positions
    )
    factor = scaling.get("factor")
    if factor is None:
        factor = max_positions / original
    attention = scaling.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1 else math.sqrt(1 + math.log(factor) / math.log(original))
    scaling.pop("type", None)
    return {
        **scaling,
        "rope_type": "longrope",
        "original_max_position_embeddings": original,
        "factor": factor,
        "attention_factor": attention,
    }
