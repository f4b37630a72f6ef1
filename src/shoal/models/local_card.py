"""A card for weights the user points at (--model-path): a GGUF file or a safetensors folder."""

import re
from pathlib import Path

from shoal.errors import ModelNotFound
from shoal.models.source import open_weights
from shoal.types.ids import ModelId
from shoal.types.model_card import LocalWeights, ModelCard, card_shape


def _size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*.safetensors"))


def _slug(name: str) -> str:
    return re.sub(r"[^a-z0-9.]+", "-", name.lower()).strip("-") or "local-model"


def card_for_path(path: Path, model_id: str | None = None) -> ModelCard:
    """Read the weights' own header/config and describe them as a card (id from the name)."""
    path = path.expanduser().resolve()
    if not path.exists():
        raise ModelNotFound(f"--model-path {path} does not exist")
    source = open_weights(path)
    cfg = source.config
    fmt = "gguf" if path.is_file() else "safetensors"
    name = path.stem if path.is_file() else path.name
    quant = getattr(source, "quantization", None) or ("gguf" if fmt == "gguf" else "bf16")
    return ModelCard(
        id=ModelId(model_id or _slug(name)),
        name=name,
        family=cfg.architecture,
        architecture=cfg.architecture,
        hf_repo=f"local/{name}",
        **card_shape(cfg),
        storage_bytes=max(_size(path), 1),
        quantization=str(quant),
        license="unknown",
        description=f"local weights at {path}",
        weights=(LocalWeights(format=fmt, path=str(path)),),
    )
