"""A model card for any Hugging Face repo id, made from its config.json and its file list.

So `org/name` works wherever a catalog id does: the card's id is the repo id itself, its shape
comes from config.json (the only file downloaded), its size and format from the listing. A
config of an architecture the engines implement is read as they read it (ModelConfig: experts,
latent attention, Kimi K2 as deepseek_v3); any other, or one missing what ModelConfig needs, by
its common field names, so `shoal models` can still say what it is.
"""

import json
from typing import Any, Literal

from shoal.errors import UnsupportedModel
from shoal.models.hub import Hub, RepoListing
from shoal.types.ids import ModelId
from shoal.types.model_card import HubWeights, ModelCard, card_shape
from shoal.types.model_config import ARCHITECTURES, ModelConfig
from shoal.types.weights import Quant

WeightFormat = Literal["gguf", "safetensors", "mlx"]
_WEIGHT_SUFFIXES = (".safetensors", ".gguf")
_DTYPES = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}
_QUANTS: dict[str, Quant] = {"4bit": "int4", "8bit": "int8"}


def _text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's part of a config (multimodal configs nest it as text_config)."""
    text = config.get("text_config")
    return {**config, **text} if isinstance(text, dict) else config


def _first(config: dict[str, Any], *names: str, default: int | None = None) -> int:
    for name in names:
        value = config.get(name)
        if isinstance(value, int) and value > 0:
            return value
    if default is None:
        raise UnsupportedModel(f"config.json has none of {', '.join(names)}")
    return default


def weight_format(repo: str, config: dict[str, Any], listing: RepoListing) -> WeightFormat:
    """mlx (quantized by mlx-lm, or an mlx-community repo), safetensors, or gguf."""
    names = [f.path for f in listing.files]
    if not any(n.endswith(".safetensors") for n in names):
        if any(n.endswith(".gguf") for n in names):
            return "gguf"
        raise UnsupportedModel(f"{repo} has no safetensors or GGUF weights")
    if "quantization" in config or repo.lower().startswith("mlx-community/"):
        return "mlx"
    return "safetensors"


def quantization(config: dict[str, Any], fmt: WeightFormat) -> str:
    """The format on disk as cards name it: "4bit", "8bit" (MLX), "bf16", "fp16", "gguf"."""
    quant = config.get("quantization") or config.get("quantization_config")
    if isinstance(quant, dict) and isinstance(quant.get("bits"), int):
        return f"{quant['bits']}bit"
    if fmt == "gguf":
        return "gguf"
    dtype = config.get("torch_dtype") or config.get("dtype")
    return _DTYPES.get(str(dtype), "bf16")


def _shape(text: dict[str, Any]) -> dict[str, Any]:
    """The card's architecture and shape fields from a (text) config.json."""
    model_type = str(text.get("model_type") or "unknown")
    if model_type in ARCHITECTURES or model_type == "kimi_k2":
        try:
            cfg = ModelConfig.from_hf(text)
        except (KeyError, TypeError, ValueError):
            pass  # not all an engine needs: the common fields, and the engine says what is not
        else:
            return {"architecture": cfg.architecture, **card_shape(cfg)}
    hidden = _first(text, "hidden_size", "n_embd", "d_model")
    heads = _first(text, "num_attention_heads", "n_head")
    return {
        "architecture": model_type,
        "layers": _first(text, "num_hidden_layers", "n_layer", "num_layers"),
        "hidden_size": hidden,
        "heads": heads,
        "kv_heads": _first(text, "num_key_value_heads", default=heads),
        "head_dim": _first(text, "head_dim", default=hidden // heads),
        "vocab_size": _first(text, "vocab_size"),
        "context_length": _first(
            text,
            "max_position_embeddings",
            "max_seq_len",
            "n_positions",
            "seq_length",
            default=4096,
        ),
    }


def card_from_config(repo: str, config: dict[str, Any], listing: RepoListing) -> ModelCard:
    """The card of a repo, from its config.json (parsed) and listing; no I/O."""
    text = _text_config(config)
    fmt = weight_format(repo, config, listing)
    label = quantization(config, fmt)
    model_type = str(text.get("model_type") or config.get("model_type") or "unknown")
    return ModelCard(
        id=ModelId(repo),
        name=repo.split("/", 1)[1],
        family=model_type,
        hf_repo=repo,
        **_shape({**text, "model_type": model_type}),
        storage_bytes=max(
            1, sum(f.size for f in listing.files if f.path.endswith(_WEIGHT_SUFFIXES))
        ),
        quantization=label,
        quant=_QUANTS.get(label, "fp16"),
        license=str(config.get("license") or "see the repo"),
        description=f"{repo} from the Hugging Face Hub (card made from its config.json)",
        weights=(HubWeights(format=fmt, repo=repo),),
    )


def card_for_repo(hub: Hub, repo: str, revision: str = "main") -> ModelCard:
    """The card of a Hub repo: its listing (saved, reused offline) and config.json (downloaded)."""
    listing = hub.cached_listing(repo, revision) or hub.listing(repo, revision)
    if not listing.has("config.json"):
        raise UnsupportedModel(f"{repo} has no config.json: add a model card for it")
    config = json.loads(hub.download(listing, "config.json").read_text())
    return card_from_config(repo, config, listing)
