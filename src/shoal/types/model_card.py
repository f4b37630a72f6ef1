"""A model card: what a model is and where its weights are found. Data (TOML), not code."""

from typing import Annotated, Literal

from pydantic import Field

from shoal.types.ids import ModelId
from shoal.types.message import Document
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

    @property
    def kv_bytes_per_token(self) -> int:
        """KV cache bytes one token costs across all layers, at fp16."""
        return 2 * self.layers * self.kv_heads * self.head_dim * 2
