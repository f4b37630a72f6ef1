"""One pipeline shard of an mlx-lm model: llama, mistral, qwen2, qwen3, granite, phi3, qwen3_moe,
deepseek_v3 (Kimi K2 too).

mlx-lm's model files already name their modules after the Hugging Face checkpoint keys, so a
shard is that model with the other stages' modules cut away: `model.layers` keeps its global
indices (it ends at `end`, with None for each layer before `start`), the embedding stays on the
first shard, norm and head on the last. The head is always its own `lm_head`, even when the
checkpoint ties it to the embedding: a last shard that is not also the first has no embedding to
borrow. What mlx-lm's `Model.__call__` adds around the layers is done here per architecture:
granite's embedding multiplier and logits scaling, deepseek_v3's boolean mask.

mlx-lm's ModelArgs are built from the ModelConfig the source gives, mapped back to config.json's
names (`config_json`): every engine reads the same one config, and the sources stay as they are.
What a ModelConfig cannot say is refused, not guessed (a head_dim mlx-lm would not use, a rope
type the file ignores). Checkpoint tensors go through the model's own `sanitize` layer by layer:
experts stored one by one (`mlp.experts.{e}.gate_proj.weight`, as the Hub and shoal's loader
have them) are stacked into `switch_mlp`, deepseek's `kv_b_proj` split into `embed_q` and
`unembed_out`; phi3 keeps its fused `qkv_proj` and `gate_up_proj`. Tensors the model's
`cast_predicate` exempts (deepseek's `e_score_correction_bias`) stay float32.

LongRoPE (phi3) as transformers applies it: a pass whose last position is at or past the
original context rotates with the long factors, any other with the short ones (mlx-lm's own
file always takes the long ones); keys already cached keep theirs.
"""

from collections.abc import Callable, Sequence
from types import ModuleType
from typing import Any

import mlx.core as mx
import numpy as np
from mlx import nn
from mlx.utils import tree_flatten
from mlx_lm.models import deepseek_v3, granite, llama, phi3, qwen2, qwen3, qwen3_moe
from mlx_lm.models.base import create_attention_mask
from mlx_lm.models.cache import KVCache
from mlx_lm.models.rope_utils import SuScaledRoPE

from shoal.errors import UnsupportedModel
from shoal.types.model_config import ModelConfig
from shoal.types.shard import Shard

# Hugging Face model_type → the mlx-lm model file that implements it.
ARCHITECTURES: dict[str, ModuleType] = {
    "llama": llama,
    "mistral": llama,  # mistral's dense models are llama with another name
    "qwen2": qwen2,  # q/k/v bias
    "qwen3": qwen3,  # per-head q/k RMSNorm
    "granite": granite,  # multipliers on embeddings, residuals, scores and logits
    "phi3": phi3,  # fused qkv and gate/up, LongRoPE
    "qwen3_moe": qwen3_moe,  # softmax-routed experts
    "deepseek_v3": deepseek_v3,  # latent attention, sigmoid-routed experts in groups
}
# The rope types each file implements that are checked here (mlx-lm's qwen3_moe ignores any).
_LLAMA_ROPES = frozenset({"default", "linear", "llama3"})
ROPE_TYPES: dict[str, frozenset[str]] = {
    "llama": _LLAMA_ROPES,
    "mistral": _LLAMA_ROPES,
    "qwen2": _LLAMA_ROPES,
    "qwen3": _LLAMA_ROPES,
    "granite": _LLAMA_ROPES,
    "phi3": frozenset({"default", "longrope"}),
    "qwen3_moe": frozenset({"default"}),
    "deepseek_v3": frozenset({"default", "yarn", "deepseek_yarn"}),
}


def rope_type(cfg: ModelConfig) -> str:
    scaling = cfg.rope_scaling or {}
    return str(scaling.get("rope_type", scaling.get("type", "default")))


def config_json(cfg: ModelConfig) -> dict[str, Any]:
    """cfg under config.json's names, as mlx-lm's ModelArgs read them (each file keeps the
    fields it knows)."""
    kind = rope_type(cfg)
    out: dict[str, Any] = {
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
    if cfg.architecture == "granite":
        scale = cfg.attention_multiplier
        out |= {
            "embedding_multiplier": cfg.embedding_multiplier,
            "residual_multiplier": cfg.residual_multiplier,
            "attention_multiplier": cfg.head_dim**-0.5 if scale is None else scale,
            "logits_scaling": cfg.logits_scaling,
            "mlp_bias": False,
        }
    elif cfg.architecture == "phi3" and cfg.rope_scaling is not None:
        scaling = cfg.rope_scaling
        out["rope_scaling"] = {**scaling, "type": "longrope"}
        out["original_max_position_embeddings"] = scaling["original_max_position_embeddings"]
    elif cfg.architecture == "qwen3_moe":
        out |= {
            "num_experts": cfg.num_experts,
            "num_experts_per_tok": cfg.experts_per_token,
            "moe_intermediate_size": cfg.moe_intermediate_size,
            "decoder_sparse_step": cfg.moe_layer_step,
            "mlp_only_layers": list(cfg.mlp_only_layers),
            "norm_topk_prob": cfg.norm_topk_prob,
        }
    elif cfg.architecture == "deepseek_v3":
        out |= {
            "n_routed_experts": cfg.num_experts or None,
            "n_shared_experts": cfg.shared_experts or None,
            "num_experts_per_tok": cfg.experts_per_token,
            "moe_intermediate_size": cfg.moe_intermediate_size,
            "first_k_dense_replace": cfg.first_dense_layers,
            "moe_layer_freq": cfg.moe_layer_step,
            "norm_topk_prob": cfg.norm_topk_prob,
            "topk_method": "noaux_tc",
            "scoring_func": "sigmoid",
            "n_group": cfg.n_group,
            "topk_group": cfg.topk_group,
            "routed_scaling_factor": cfg.routed_scaling_factor,
            "q_lora_rank": cfg.q_lora_rank,
            "kv_lora_rank": cfg.kv_lora_rank,
            "qk_nope_head_dim": cfg.qk_nope_head_dim,
            "qk_rope_head_dim": cfg.qk_rope_head_dim,
            "v_head_dim": cfg.v_head_dim,
        }
    return out


def model_args(cfg: ModelConfig) -> Any:
    """mlx-lm's ModelArgs for cfg's architecture, or UnsupportedModel naming what is not run."""
    module = ARCHITECTURES.get(cfg.architecture)
    if module is None:
        known = ", ".join(sorted(ARCHITECTURES))
        raise UnsupportedModel(f"architecture {cfg.architecture!r} is not implemented ({known})")
    kind, kinds = rope_type(cfg), ROPE_TYPES[cfg.architecture]
    if kind not in kinds:
        raise UnsupportedModel(
            f"rope_scaling type {kind!r} is not implemented for {cfg.architecture} "
            f"({', '.join(sorted(kinds - {'default'})) or 'none'})"
        )
    derived = cfg.hidden_size // cfg.num_attention_heads
    if cfg.architecture in ("granite", "phi3") and cfg.head_dim != derived:
        raise UnsupportedModel(
            f"{cfg.architecture} with head_dim {cfg.head_dim}: mlx-lm's file takes "
            f"hidden_size / heads ({derived})"
        )
    return module.ModelArgs.from_dict(config_json(cfg))


class LongRope:
    """phi3's short and long LongRoPE, swapped into every attention of the shard per pass."""

    def __init__(self, cfg: ModelConfig, attentions: Sequence[nn.Module]) -> None:
        scaling = cfg.rope_scaling or {}
        self.original = int(scaling["original_max_position_embeddings"])
        self.attentions = list(attentions)

        def rope(factors: list[float]) -> SuScaledRoPE:
            return SuScaledRoPE(
                cfg.head_dim,
                base=cfg.rope_theta,
                max_position_embeddings=cfg.max_position_embeddings,
                original_max_position_embeddings=self.original,
                long_factor=factors,
                long_mscale=float(scaling["attention_factor"]),  # on cos and sin, both ways
            )

        self.short, self.long = rope(scaling["short_factor"]), rope(scaling["long_factor"])

    def choose(self, last_position: int) -> None:
        """The ropes for a pass whose last position is `last_position`."""
        chosen = self.long if last_position >= self.original else self.short
        for attention in self.attentions:
            attention.rope = chosen


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
        granite_ = cfg.architecture == "granite"
        self.embed_scale = cfg.embedding_multiplier if granite_ else 1.0
        self.logits_scale = cfg.logits_scaling if granite_ else 1.0
        self.array_mask = cfg.architecture == "deepseek_v3"  # it masks the rope scores itself
        self.longrope: LongRope | None = None
        if rope_type(cfg) == "longrope":
            self.longrope = LongRope(cfg, [block["self_attn"] for block in self.blocks])

    def parameters(self) -> dict[str, mx.array]:
        """Every weight of the shard under its checkpoint name."""
        return dict(tree_flatten(self.model.parameters()))

    def load(
        self,
        tensors: dict[str, np.ndarray],
        dtype: mx.Dtype,
        progress: Callable[[int, int], None] | None = None,
    ) -> None:
        """Replace every weight by the checkpoint's (sanitized as mlx-lm does), strictly: same
        names, same shapes. Layer by layer, so at most one layer is converted at a time."""
        expected = self.parameters()
        layers = [f"model.layers.{i}." for i in range(self.shard.start, self.shard.end)]
        groups: list[list[str]] = [[] for _ in layers]
        rest: list[str] = []
        for name in tensors:
            at = self._layer(name)
            (groups[at - self.shard.start] if at is not None else rest).append(name)
        if progress is not None:
            progress(0, len(layers))
        want_rest = [n for n in expected if not n.startswith("model.layers.")]
        self._assign(want_rest, self._sanitized(rest, tensors), expected, dtype)
        for done, (prefix, names) in enumerate(zip(layers, groups, strict=True), start=1):
            wanted = [n for n in expected if n.startswith(prefix)]
            self._assign(wanted, self._sanitized(names, tensors), expected, dtype)
            if progress is not None:
                progress(done, len(layers))
        if self.tied and self.shard.is_whole:
            assert self.embed is not None and self.head is not None
            self.head["weight"] = self.embed["weight"]  # one copy, not two

    def make_cache(self) -> list[KVCache]:
        """An empty KV cache per layer of the shard, for one request (deepseek_v3's holds the
        latent and the rope key)."""
        return [KVCache() for _ in self.blocks]

    def __call__(self, x: mx.array, caches: Sequence[KVCache], *, all_logits: bool) -> mx.array:
        """ids [B, T] or hidden [B, T, hidden] → hidden, or logits [B, T or 1, vocab] if last."""
        # Appends each layer's new keys and values to caches[layer].
        h = self.embed(x) if self.embed is not None else x  # [B, T, hidden]
        if self.embed is not None and self.embed_scale != 1.0:
            h = h * self.embed_scale
        if self.longrope is not None:
            self.longrope.choose(caches[0].offset + x.shape[1] - 1)
        # "causal" (mx.fast's, aligned bottom-right after a cached prefix), a boolean array for
        # deepseek_v3, None for one query
        mask = create_attention_mask(h, caches[0], return_array=self.array_mask)
        for block, cache in zip(self.blocks, caches, strict=True):
            h = block(h, mask, cache)  # [B, T, hidden]
        if self.norm is None or self.head is None:
            return h
        if not all_logits:
            h = h[:, -1:]  # [B, 1, hidden]
        logits = self.head(self.norm(h))  # [B, T or 1, vocab]
        return logits / self.logits_scale if self.logits_scale != 1.0 else logits

    def _layer(self, name: str) -> int | None:
        """The shard layer a checkpoint tensor belongs to, or None (not a layer of the shard)."""
        if not name.startswith("model.layers."):
            return None
        part = name.split(".")[2]
        at = int(part) if part.isdigit() else -1
        return at if self.shard.start <= at < self.shard.end else None

    def _sanitized(self, names: list[str], tensors: dict[str, np.ndarray]) -> dict[str, mx.array]:
        """The named tensors as mlx-lm's model keeps them (its sanitize, where it has one)."""
        arrays = {name: mx.array(tensors[name]) for name in names}
        sanitize = getattr(self.model, "sanitize", None)
        return sanitize(arrays) if sanitize is not None else arrays

    def _assign(
        self,
        wanted: list[str],
        arrays: dict[str, mx.array],
        expected: dict[str, mx.array],
        dtype: mx.Dtype,
    ) -> None:
        """Put the sanitized arrays in place, in dtype, and compute them now; the names must be
        exactly `wanted`, the shapes the model's."""
        missing = sorted(set(wanted) - arrays.keys())
        unexpected = sorted(arrays.keys() - set(wanted))
        if missing or unexpected:
            raise UnsupportedModel(
                f"weights do not fit {self.args.model_type} shard {self.shard}: "
                f"missing {missing}, unexpected {unexpected}"
            )
        for name, array in arrays.items():
            if tuple(array.shape) != tuple(expected[name].shape):
                shape = tuple(expected[name].shape)
                raise UnsupportedModel(f"{name}: shape {tuple(array.shape)}, expected {shape}")
        keep = getattr(self.model, "cast_predicate", None) or (lambda _name: True)
        cast = {n: a.astype(dtype) if keep(n) else a.astype(mx.float32) for n, a in arrays.items()}
        mx.eval(list(cast.values()))
        for name, array in cast.items():
            *path, leaf = name.split(".")
            owner: Any = self.model
            for part in path:
                owner = owner[int(part)] if isinstance(owner, list) else owner[part]
            owner[leaf] = array
