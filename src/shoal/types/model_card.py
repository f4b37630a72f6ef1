"""A model card: what a model is and where its weights are found. Data (TOML), not code."""

from typing import Annotated, Literal, Self

from pydantic import Field, model_validator

from shoal.types.ids import ModelId
from shoal.types.message import Document
from shoal.types.model_config import ModelConfig
from shoal.types.weights import Quant


class PackagedWeights(Document):
    """Weights shipped inside an installed Python package (found through importlib.resources)."""

    kind: Literal["package"] = "package"
    format: Literal["gguf", "safetensors", "mlx"]
    package: str
    resource: str


class HubWeights(Document):
    """Weights in a Hugging Face repository (downloaded on demand, never in tests)."""

    kind: Literal["hub"] = "hub"
    format: Literal["gguf", "safetensors", "mlx"]
    repo: str
    file: str | None = None  # one GGUF file in the repo; None = the whole snapshot
    revision: str = "main"
    # The format on disk ("4bit", "bf16", "Q4_K_M", ...); None: the card's `quantization`.
    quantization: str | None = None
    # Bytes to download (the GGUF file, or the snapshot's weights); None: the card's
    # `storage_bytes`. Figures marked "≈" in a card are from the repo's own size table.
    storage_bytes: int | None = Field(default=None, gt=0)
    gated: bool = False  # the repo asks for accepted terms: downloads need HF_TOKEN
    # Engines that read it; empty: every engine that reads `format` (models/availability.py).
    engines: tuple[str, ...] = ()


class LocalWeights(Document):
    """Weights at a path on this machine: a GGUF file or a safetensors directory."""

    kind: Literal["local"] = "local"
    format: Literal["gguf", "safetensors", "mlx"]
    path: str


WeightsLocation = Annotated[
    PackagedWeights | HubWeights | LocalWeights, Field(discriminator="kind")
]


class ModelCard(Document):
    """Public metadata of one model; `weights` lists where to find them, in order of preference."""

    id: ModelId
    name: str
    family: str
    architecture: str  # Hugging Face model_type: llama, qwen3, qwen3_moe, deepseek_v3, ...
    hf_repo: str
    layers: int = Field(gt=0)
    hidden_size: int = Field(gt=0)
    heads: int = Field(gt=0)
    kv_heads: int = Field(gt=0)
    head_dim: int = Field(gt=0)
    vocab_size: int = Field(gt=0)
    context_length: int = Field(gt=0)
    storage_bytes: int = Field(gt=0)  # bytes of the weights on disk
    quantization: str  # "4bit", "8bit", "fp16", "Q4_1", ...: the format on disk
    # The torch and numpy engines' weight format for this model unless a node says otherwise
    # (--quant): none (the engine's dtype), fp16, int8 or int4; see engines/torch/quant.py.
    quant: Quant = "fp16"
    license: str
    description: str = ""
    weights: tuple[WeightsLocation, ...] = ()
    # The shape the memory and speed models need beyond the attention (config.json's names in
    # the comments). Defaults: a dense model with ordinary attention.
    intermediate_size: int = Field(default=0, ge=0)  # a dense MLP's width; 0: not given
    # Mixture of experts: `experts` routed experts per sparse layer, `experts_per_token` of them
    # run per token, each `expert_intermediate_size` wide; `shared_experts` run for every token;
    # the first `dense_layers` layers have a dense MLP instead (deepseek first_k_dense_replace).
    experts: int = Field(default=0, ge=0)  # num_experts / n_routed_experts
    experts_per_token: int = Field(default=0, ge=0)  # num_experts_per_tok
    expert_intermediate_size: int = Field(default=0, ge=0)  # moe_intermediate_size
    shared_experts: int = Field(default=0, ge=0)  # n_shared_experts
    dense_layers: int = Field(default=0, ge=0)
    # Multi-head latent attention (deepseek_v3) when kv_lora_rank > 0: q through a rank
    # q_lora_rank (0: directly), q/k heads qk_nope_head_dim + qk_rope_head_dim wide, v heads
    # head_dim (v_head_dim); the KV cache holds kv_lora_rank + qk_rope_head_dim values a token.
    q_lora_rank: int = Field(default=0, ge=0)
    kv_lora_rank: int = Field(default=0, ge=0)
    qk_nope_head_dim: int = Field(default=0, ge=0)
    qk_rope_head_dim: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        if self.experts and not (
            0 < self.experts_per_token <= self.experts and self.expert_intermediate_size
        ):
            raise ValueError(
                "a mixture of experts needs experts_per_token in 1..experts and "
                "expert_intermediate_size"
            )
        if self.dense_layers >= self.layers and self.experts:
            raise ValueError(f"dense_layers {self.dense_layers} leaves no layer with experts")
        if self.kv_lora_rank and not (self.qk_rope_head_dim and self.qk_nope_head_dim):
            raise ValueError("latent attention (kv_lora_rank) needs qk_rope/qk_nope_head_dim")
        return self

    @property
    def moe(self) -> bool:
        """Whether the model routes tokens to experts."""
        return self.experts > 0

    @property
    def mla(self) -> bool:
        """Whether the attention is multi-head latent attention (a compressed KV cache)."""
        return self.kv_lora_rank > 0

    @property
    def kv_values_per_token(self) -> int:
        """Values one layer caches per token: keys and values, or MLA's latent and rope key."""
        if self.mla:
            return self.kv_lora_rank + self.qk_rope_head_dim
        return 2 * self.kv_heads * self.head_dim

    @property
    def kv_bytes_per_token(self) -> int:
        """KV cache bytes one token costs across all layers, at fp16."""
        return self.layers * self.kv_values_per_token * 2


def card_shape(cfg: ModelConfig) -> dict[str, int]:
    """A card's shape fields from a decoder's config (its dense layers counted, taken as the
    first ones: DeepSeek's first_k_dense_replace; qwen3_moe's seed models have none)."""
    moe = cfg.num_experts > 0
    dense = sum(not cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)) if moe else 0
    return {
        "layers": cfg.num_hidden_layers,
        "hidden_size": cfg.hidden_size,
        "heads": cfg.num_attention_heads,
        "kv_heads": cfg.num_key_value_heads,
        "head_dim": cfg.head_dim,
        "vocab_size": cfg.vocab_size,
        "context_length": cfg.max_position_embeddings,
        "intermediate_size": cfg.intermediate_size,
        "experts": cfg.num_experts,
        "experts_per_token": cfg.experts_per_token if moe else 0,
        "expert_intermediate_size": cfg.moe_intermediate_size if moe else 0,
        "shared_experts": cfg.shared_experts if moe else 0,
        "dense_layers": dense,
        "q_lora_rank": (cfg.q_lora_rank or 0) if cfg.mla else 0,
        "kv_lora_rank": cfg.kv_lora_rank,
        "qk_nope_head_dim": cfg.qk_nope_head_dim if cfg.mla else 0,
        "qk_rope_head_dim": cfg.qk_rope_head_dim if cfg.mla else 0,
    }
