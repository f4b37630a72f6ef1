"""Runtime hyperparameters of a decoder, read from a GGUF header or a config.json."""

from typing import Any

from pydantic import Field

from shoal.types.message import Document

# Architectures the model files implement (Hugging Face model_type names).
LLAMA_FAMILY = frozenset({"llama", "mistral", "qwen2", "qwen3"})


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
        return cls(
            architecture=arch,
            num_hidden_layers=cfg["num_hidden_layers"],
            hidden_size=cfg["hidden_size"],
            intermediate_size=cfg["intermediate_size"],
            num_attention_heads=heads,
            num_key_value_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            vocab_size=cfg["vocab_size"],
            max_position_embeddings=cfg.get("max_position_embeddings", 4096),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            rope_theta=theta,
            rope_scaling=scaling,
            tie_word_embeddings=cfg.get("tie_word_embeddings", False),
            attention_bias=cfg.get("attention_bias", arch == "qwen2"),
            qk_norm=arch == "qwen3",
            sliding_window=cfg.get("sliding_window") if cfg.get("use_sliding_window") else None,
        )
