"""One pipeline shard of an mlx-lm Llama-family model (llama, mistral, qwen2, qwen3).

mlx-lm's model files already name their modules after the Hugging Face checkpoint keys, so a
shard is that model with the other stages' modules cut away: `model.layers` keeps its global
indices (it ends at `end`, with None for each layer before `start`), the embedding stays on the
first shard, norm and head on the last. The head is always its own `lm_head`, even when the
checkpoint ties it to the embedding: a last shard that is not also the first has no embedding to
borrow.
"""

from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import mlx.core as mx
import numpy as np
from mlx import nn
from mlx.utils import tree_flatten
from mlx_lm.models import llama, qwen2, qwen3
from mlx_lm.models.cache import KVCache

from shoal.errors import UnsupportedModel
from shoal.types.model_config import ModelConfig
from shoal.types.shard import Shard

# Hugging Face model_type → the mlx-lm model file that implements it.
ARCHITECTURES: dict[str, ModuleType] = {
    "llama": llama,
    "mistral": llama,  # mistral's dense models are llama with another name
    "qwen2": qwen2,  # q/k/v bias
    "qwen3": qwen3,  # per-head q/k RMSNorm
}
# mlx-lm knows more rope types; these are the ones checked against transformers here.
ROPE_TYPES = frozenset({"default", "linear", "llama3"})


def model_args(cfg: ModelConfig) -> Any:
    """mlx-lm's ModelArgs for cfg's architecture (each file keeps the fields it knows)."""
    module = ARCHITECTURES.get(cfg.architecture)
    if module is None:
        known = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedModel(f"architecture {cfg.architecture!r} is not implemented ({known})")
    scaling = cfg.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind not in ROPE_TYPES:
        raise UnsupportedModel(f"rope_scaling type {kind!r} is not implemented (llama3, linear)")
    return module.ModelArgs.from_dict(
        {
            "model_type": cfg.architecture,
            "hidden_size": cfg.hidden_size,
            "num_hidden_layers": cfg.num_hidden_layers,
            "intermediate_size": cfg.intermediate_size,
            "num_attention_heads": cfg.num_attention_heads,
            "num_key_value_heads": cfg.num_key_value_heads,
            "head_dim": cfg.head_dim,
            "vocab_size": cfg.vocab_size,
            "max_position_embeddings": cfg.max_position_embeddings,
            "rms_norm_eps": cfg.rms_norm_eps,
            "rope_theta": cfg.rope_theta,
            "rope_scaling": cfg.rope_scaling if kind != "default" else None,
            "rope_traditional": False,  # HF checkpoints rotate halves, not interleaved pairs
            "attention_bias": cfg.attention_bias,
            "tie_word_embeddings": False,  # see the module docstring
        }
    )


class ShardModel:
    """The shard's part of mlx-lm's Model: ids or hidden states in, hidden or logits out."""

    def __init__(self, cfg: ModelConfig, shard: Shard) -> None:
        if shard.n_layers != cfg.num_hidden_layers:
            layers = cfg.num_hidden_layers
            raise ValueError(f"shard {shard} does not match a model of {layers} layers")
        self.shard = shard
        self.tied = cfg.tie_word_embeddings
        self.args = model_args(cfg)
        # MLX is lazy: the random initial weights of the modules cut away are never computed.
        self.model: nn.Module = ARCHITECTURES[cfg.architecture].Model(self.args)
        inner = self.model["model"]
        blocks = inner["layers"]
        inner["layers"] = [
            None if i < shard.start else block for i, block in enumerate(blocks[: shard.end])
        ]
        if not shard.is_first:
            del inner["embed_tokens"]
        if not shard.is_last:
            del inner["norm"]
            del self.model["lm_head"]
        self.embed: nn.Embedding | None = inner.get("embed_tokens")
        self.blocks: list[nn.Module] = inner["layers"][shard.start :]
        self.norm: nn.RMSNorm | None = inner.get("norm")
        self.head: nn.Linear | None = self.model.get("lm_head")

    def parameters(self) -> dict[str, mx.array]:
        """Every weight of the shard under its checkpoint name."""
        return dict(tree_flatten(self.model.parameters()))

    def load(
        self,
        tensors: dict[str, np.ndarray],
        dtype: mx.Dtype,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        """Replace every weight by the checkpoint's, strictly: same names, same shapes."""
        expected = self.parameters()
        missing = sorted(expected.keys() - tensors.keys())
        unexpected = sorted(tensors.keys() - expected.keys())
        if missing or unexpected:
            raise UnsupportedModel(
                f"weights do not fit {self.args.model_type} shard {self.shard}: "
                f"missing {missing}, unexpected {unexpected}"
            )
        for name, array in tensors.items():
            if tuple(array.shape) != tuple(expected[name].shape):
                shape = tuple(expected[name].shape)
                raise UnsupportedModel(f"{name}: shape {tuple(array.shape)}, expected {shape}")
        layers = [f"model.layers.{i}." for i in range(self.shard.start, self.shard.end)]
        if progress is not None:
            progress(0, len(layers))
        self._assign([n for n in expected if not n.startswith("model.layers.")], tensors, dtype)
        for done, prefix in enumerate(layers, start=1):
            self._assign([n for n in expected if n.startswith(prefix)], tensors, dtype)
            if progress is not None:
                progress(done, len(layers))
        if self.tied and self.shard.is_whole:
            assert self.embed is not None and self.head is not None
            self.head["weight"] = self.embed["weight"]  # one copy, not two

    def make_cache(self) -> list[KVCache]:
        """An empty KV cache per layer of the shard, for one request."""
        return [KVCache() for _ in self.blocks]

    def __call__(self, x: mx.array, caches: Sequence[KVCache], *, all_logits: bool) -> mx.array:
        """ids [B, T] or hidden [B, T, hidden] → hidden, or logits [B, T or 1, vocab] if last."""
        # Appends each layer's new keys and values to caches[layer].
        h = self.embed(x) if self.embed is not None else x  # [B, T, hidden]
        # mx.fast's "causal" mask is aligned bottom-right: after a cached prefix of n, query i of
        # the chunk sees keys [0, n + i]. One query needs no mask.
        mask = "causal" if x.shape[1] > 1 else None
        for block, cache in zip(self.blocks, caches, strict=True):
            h = block(h, mask, cache)  # [B, T, hidden]
        if self.norm is None or self.head is None:
            return h
        if not all_logits:
            h = h[:, -1:]  # [B, 1, hidden]
        return self.head(self.norm(h))  # [B, T or 1, vocab]

    def _assign(self, names: list[str], tensors: dict[str, np.ndarray], dtype: mx.Dtype) -> None:
        """Put the named checkpoint arrays in place, in dtype, and compute them now."""
        arrays = [mx.array(tensors[name]).astype(dtype) for name in names]
        mx.eval(arrays)
        for name, array in zip(names, arrays, strict=True):
            *path, leaf = name.split(".")
            owner: Any = self.model
            for part in path:
                owner = owner[int(part)] if isinstance(owner, list) else owner[part]
            owner[leaf] = array
