"""granite and phi3 checkpoints rewritten at load into the llama layout the model files take.

Both are llama but for where a few constants sit and how two projections are stored, so a
shard's tensors are rewritten once and every engine path (torch, numpy, the native kernels) runs
them unchanged:

- phi3: the fused `qkv_proj` (rows q, k, v) and `gate_up_proj` (rows gate, up) are split.
  LongRoPE's attention factor a multiplies cos and sin, so it scales q.k by a^2: folded into q.
- granite: the embeddings x embedding_multiplier; o_proj and down_proj (each residual branch's
  last product) x residual_multiplier; q_proj x attention_multiplier * sqrt(head_dim), since the
  engines divide the scores by sqrt(head_dim); lm_head / logits_scaling (a tied head untied first:
  ModelArgs says so).

Float tensors are scaled in float32. An MLX-packed matrix keeps its integers and has its scales
and biases scaled in float32, so it dequantizes to the model's values exactly — except a
projection bound for the block kernels (`blocks`), whose scales are rounded to float16 (2^-11
relative at most) so the blocks still take the packed integers as they are, without a round trip
through floats (float32 stays where float16 cannot hold them). An embedding table is always
scaled in float32: its rows are dequantized per lookup.
"""

import math
from collections.abc import Mapping

import numpy as np

from shoal.engines.packed import Packed
from shoal.types.model_config import ModelConfig

F32 = np.float32
F16_MAX = 65504.0
Tensor = np.ndarray | Packed


def q_scale(cfg: ModelConfig) -> float:
    """What q is multiplied by so that softmax(q.k / sqrt(head_dim)) is the model's attention."""
    scale = 1.0
    if cfg.attention_multiplier is not None:
        scale *= cfg.attention_multiplier * math.sqrt(cfg.head_dim)
    scaling = cfg.rope_scaling or {}
    if scaling.get("rope_type") == "longrope":
        scale *= float(scaling["attention_factor"]) ** 2
    return scale


def adapt(
    cfg: ModelConfig, tensors: Mapping[str, Tensor], *, blocks: bool = False
) -> dict[str, Tensor]:
    """The shard's tensors in the llama layout, with the architecture's constants folded in;
    blocks: the projections become native blocks (see the module docstring)."""
    out = dict(tensors)
    if cfg.architecture == "phi3":
        _split_fused(cfg, out)
    scales = {
        "self_attn.q_proj.weight": q_scale(cfg),
        "self_attn.q_proj.bias": q_scale(cfg),
        "self_attn.o_proj.weight": cfg.residual_multiplier,
        "mlp.down_proj.weight": cfg.residual_multiplier,
    }
    for name, tensor in out.items():
        if name.startswith("model.layers."):
            leaf = name.split(".", 3)[3]  # model.layers.12.<leaf>
            out[name] = _scaled(tensor, scales.get(leaf, 1.0), exact=not blocks)
    if "model.embed_tokens.weight" in out:
        embed = out["model.embed_tokens.weight"]
        out["model.embed_tokens.weight"] = _scaled(embed, cfg.embedding_multiplier, exact=True)
    if "lm_head.weight" in out:
        head = out["lm_head.weight"]
        out["lm_head.weight"] = _scaled(head, 1.0 / cfg.logits_scaling, exact=not blocks)
    return out


def _split_fused(cfg: ModelConfig, tensors: dict[str, Tensor]) -> None:
    """phi3's qkv_proj and gate_up_proj as llama's separate projections, in place."""
    d = cfg.head_dim
    q, kv, inter = cfg.num_attention_heads * d, cfg.num_key_value_heads * d, cfg.intermediate_size
    fused = {
        "qkv_proj": (("q_proj", q), ("k_proj", kv), ("v_proj", kv)),
        "gate_up_proj": (("gate_proj", inter), ("up_proj", inter)),
    }
    for name in [n for n in tensors if n.startswith("model.layers.")]:
        parent, module, leaf = name.rsplit(".", 2)  # model.layers.3.mlp, gate_up_proj, weight
        if module not in fused:
            continue
        tensor, start = tensors.pop(name), 0
        for part, rows in fused[module]:
            tensors[f"{parent}.{part}.{leaf}"] = _rows(tensor, start, start + rows)
            start += rows


def _rows(tensor: Tensor, start: int, end: int) -> Tensor:
    """Rows [start, end) of a matrix or vector, packed or not (a view where it can be)."""
    if isinstance(tensor, Packed):
        return Packed(
            tensor.weight[start:end],
            tensor.scales[start:end],
            tensor.biases[start:end],
            tensor.bits,
            tensor.group_size,
            tensor.float_dtype,
        )
    return tensor[start:end]


def _scaled(tensor: Tensor, factor: float, *, exact: bool) -> Tensor:
    """tensor x factor: a float one in float32; a packed one by its scales and biases, in float32
    if exact, else in float16 where float16 holds them (see the module docstring)."""
    if factor == 1.0:
        return tensor
    if not isinstance(tensor, Packed):
        return np.asarray(tensor, F32) * F32(factor)
    scales, biases = (a * F32(factor) for a in tensor.group_scales())
    dtype = "F32"
    if not exact and all(np.abs(a).max(initial=0.0) <= F16_MAX for a in (scales, biases)):
        scales, biases, dtype = scales.astype(np.float16), biases.astype(np.float16), "F16"
    return Packed(tensor.weight, scales, biases, tensor.bits, tensor.group_size, dtype)
