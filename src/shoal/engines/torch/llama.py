"""The Llama-family decoder (llama, mistral, qwen2, qwen3, granite, phi3) for one pipeline shard.

Module names match Hugging Face checkpoint keys, so `model.layers.12.self_attn.q_proj.weight`
is the parameter of that name here and loading is a dict walk. A shard builds only its layers,
keyed by their global index; the embedding lives on the first shard, norm and head on the last.
qwen2 differs by a bias on q/k/v, qwen3 by an RMSNorm on each head of q and k; mistral is llama;
granite and phi3 are llama once their checkpoints are adapted (engines/adapt.py), but for phi3's
LongRoPE, which picks its frequencies per pass (ModelArgs.longrope_context).
"""

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shoal.engines.args import ModelArgs, longrope_context
from shoal.engines.cache import KVCache
from shoal.engines.packed import Packed
from shoal.engines.torch.quant import Quant, pack
from shoal.errors import UnsupportedModel
from shoal.types.shard import Shard

Packs = Mapping[str, Packed] | None  # a layer's MLX-packed projections by name, if any


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim, computed in float32 as the checkpoints expect."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        if x.dtype == torch.float32:
            return F.rms_norm(x, self.weight.shape, self.weight, self.eps)  # one fused kernel
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_frequencies(args: ModelArgs, long: bool = False) -> Tensor:
    """Inverse frequencies [head_dim / 2] of the rotary embedding, with rope_scaling applied
    (LongRoPE: its long factors if `long`, else its short ones)."""
    dim = args.head_dim
    exponents = torch.arange(0, dim, 2, dtype=torch.int64, device="cpu").float() / dim
    inv_freq = 1.0 / (args.rope_theta**exponents)  # [D/2]
    scaling = args.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / scaling["factor"]
    if kind == "llama3":
        return _llama3_frequencies(inv_freq, scaling)
    if kind == "longrope":  # as transformers: 1 / (factor * theta^(2i/D))
        factors = torch.tensor(scaling["long_factor" if long else "short_factor"], device="cpu")
        return 1.0 / (factors.float() * args.rope_theta**exponents)
    raise UnsupportedModel(
        f"rope_scaling type {kind!r} is not implemented (llama3, linear, longrope)"
    )


def _llama3_frequencies(inv_freq: Tensor, scaling: dict[str, Any]) -> Tensor:
    """Llama 3.1: slow down long wavelengths by `factor`, keep short ones, blend in between."""
    factor = scaling["factor"]
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    context = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq  # [D/2]
    scaled = torch.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)  # [D/2]
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= context / high) & (wavelen <= context / low)
    return torch.where(medium, blended, scaled)


def rotate(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, heads, T, D] by cos, sin [B, 1, T, D] (halves layout, as in HF checkpoints).

    sin carries the sign of the swapped halves (-sin, +sin), so the rotation of (x1, x2) to
    (x1 cos - x2 sin, x2 cos + x1 sin) is x * cos + roll(x, D/2) * sin: three kernels, not seven.
    """
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), sin)


@dataclass
class Context:
    """What every layer needs about the batch: each item's cache and attention mask."""

    caches: Sequence[KVCache[Tensor]]
    masks: list[Tensor | None]  # [T, start+T] bool, True = attend; None = no mask needed
    causal: list[bool]  # the item starts at 0: plain causal attention, no mask tensor
    # A decode step at fixed shapes and addresses, as a CUDA graph replays it: each item writes
    # at positions[i] and attends over its cache's whole capacity, masked by visible[i].
    positions: Tensor | None = None  # [B, 1]
    visible: list[Tensor] | None = None  # [capacity] bool per item: set by Model.forward

    @classmethod
    def fixed(cls, caches: Sequence[KVCache[Tensor]], positions: Tensor) -> "Context":
        """A decode step's context with no shape or index taken from Python values."""
        return cls(caches, [None] * len(caches), [False] * len(caches), positions)


def attention_mask(start: int, t: int, device: torch.device) -> tuple[Tensor | None, bool]:
    """Mask of a chunk of t queries at positions start.. against start+t keys: (mask, is_causal)."""
    if t == 1:
        return None, False  # one query sees the whole prefix
    if start == 0:
        return None, True
    rows = torch.arange(start, start + t, device=device)  # [T]
    cols = torch.arange(start + t, device=device)  # [S]
    return cols[None, :] <= rows[:, None], False  # [T, S]


class LayerAttention(nn.Module):
    """A layer's attention, normed x [B, T, hidden] → [B, T, hidden] writing its items' caches,
    put in its format by pack()."""

    def pack(
        self, quant: Quant, device: torch.device, dtype: torch.dtype, packed: Packs = None
    ) -> None:
        raise NotImplementedError


class Attention(LayerAttention):
    """Grouped-query attention over the request's cached prefix plus the new chunk."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.n_heads = args.num_attention_heads
        self.n_kv_heads = args.num_key_value_heads
        self.head_dim = d = args.head_dim
        bias = args.attention_bias
        self.q_proj = nn.Linear(args.hidden_size, self.n_heads * d, bias=bias)
        self.k_proj = nn.Linear(args.hidden_size, self.n_kv_heads * d, bias=bias)
        self.v_proj = nn.Linear(args.hidden_size, self.n_kv_heads * d, bias=bias)
        self.o_proj = nn.Linear(self.n_heads * d, args.hidden_size, bias=False)
        self.q_norm: RMSNorm | None = RMSNorm(d, args.rms_norm_eps) if args.qk_norm else None
        self.k_norm: RMSNorm | None = RMSNorm(d, args.rms_norm_eps) if args.qk_norm else None
        self.qkv: nn.Module  # q, k, v fused, and the output projection: set by pack()
        self.out: nn.Module

    def pack(
        self, quant: Quant, device: torch.device, dtype: torch.dtype, packed: Packs = None
    ) -> None:
        """Fuse q, k, v into one projection and put both projections in the weight format.
        packed: the checkpoint's MLX-packed projections by name (`q_proj`, ...), if any."""
        packed = packed or {}
        parts = (self.q_proj, self.k_proj, self.v_proj)
        weight = torch.cat([p.weight for p in parts])  # [(H + 2 KV) * D, hidden]
        bias = torch.cat([p.bias for p in parts]) if self.q_proj.bias is not None else None
        names = ("q_proj", "k_proj", "v_proj")
        held = [packed.get(n, p.weight) for n, p in zip(names, parts, strict=True)]
        self.qkv = pack(weight, bias, quant, device=device, dtype=dtype, parts=held, name="qkv")
        o = self.o_proj.weight
        self.out = pack(o, None, quant, device=device, dtype=dtype, parts=[packed.get("o_proj", o)])
        del self.q_proj, self.k_proj, self.v_proj, self.o_proj

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, ctx: Context, layer: int) -> Tensor:
        b, t, _ = x.shape
        h, kv, d = self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.qkv(x).view(b, t, h + 2 * kv, d)  # [B, T, H + 2 KV, D]
        if self.q_norm is not None and self.k_norm is not None:
            q, k, v = qkv.split([h, kv, kv], dim=2)
            qk = torch.cat((self.q_norm(q), self.k_norm(k)), dim=2)  # [B, T, H + KV, D]
        else:
            qk, v = qkv.split([h + kv, kv], dim=2)
        qk = rotate(qk.transpose(1, 2), cos, sin)  # [B, H + KV, T, D]: q and k in one rotation
        q, k = qk.split([h, kv], dim=1)  # [B, H, T, D], [B, KV, T, D]
        v = v.transpose(1, 2)  # [B, KV, T, D]
        # Projections run batched; attention runs per item, since each has its own prefix length.
        if t == 1:
            q = q * d**-0.5  # decode scales q here, once for the batch (see _attend)
        items = zip(q.unbind(0), k.unbind(0), v.unbind(0), strict=True)
        outs = [self._attend(qi, ki, vi, ctx, layer, i) for i, (qi, ki, vi) in enumerate(items)]
        out = outs[0][None] if b == 1 else torch.stack(outs)  # [B, H, T, D]
        return self.out(out.transpose(1, 2).reshape(b, t, h * d))  # [B, T, hidden]

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, ctx: Context, layer: int, i: int) -> Tensor:
        """One item's attention: q [H, T, D] against its cache after writing k, v [KV, T, D]."""
        if ctx.positions is not None and ctx.visible is not None:  # fixed shapes: see Context
            # write at a position tensor, so a CUDA graph replays it at the next position
            keys, values = ctx.caches[i].layer(layer)  # [KV, C, D]: the whole capacity
            keys.index_copy_(1, ctx.positions[i], k.to(keys.dtype))
            values.index_copy_(1, ctx.positions[i], v.to(values.dtype))
            kv, _, d = keys.shape
            grouped = q.reshape(kv, -1, d)  # [KV, H / KV, D], q already scaled by D^-1/2
            scores = torch.bmm(grouped, keys.transpose(1, 2))  # [KV, H / KV, C]
            scores = scores.masked_fill(~ctx.visible[i], float("-inf"))
            return torch.bmm(scores.softmax(dim=-1), values).view(-1, 1, d)  # [H, 1, D]
        keys, values = ctx.caches[i].update(layer, k, v)  # [KV, S, D] with S = start + T
        if q.shape[1] == 1:  # decode: three small matmuls beat the fused kernel's set-up
            kv, _, d = keys.shape
            grouped = q.reshape(kv, -1, d)  # [KV, H / KV, D], q already scaled by D^-1/2
            scores = torch.bmm(grouped, keys.transpose(1, 2))  # [KV, H / KV, S]
            out = torch.bmm(scores.softmax(dim=-1), values)  # [KV, H / KV, D]
            return out.view(-1, 1, d)  # [H, 1, D]
        return F.scaled_dot_product_attention(
            q[None],  # [1, H, T, D]
            keys[None],  # [1, KV, S, D]
            values[None],  # [1, KV, S, D]
            attn_mask=ctx.masks[i],
            is_causal=ctx.causal[i],
            enable_gqa=self.n_heads != self.n_kv_heads,
        )[0]  # [H, T, D]


class FeedForward(nn.Module):
    """A layer's feed-forward, x [B, T, hidden] → [B, T, hidden], put in its format by pack()."""

    def pack(
        self, quant: Quant, device: torch.device, dtype: torch.dtype, packed: Packs = None
    ) -> None:
        raise NotImplementedError


class MLP(FeedForward):
    """SiLU-gated feed-forward, `inner` wide (default args.intermediate_size)."""

    def __init__(self, args: ModelArgs, inner: int | None = None) -> None:
        super().__init__()
        inner = inner or args.intermediate_size
        self.gate_proj = nn.Linear(args.hidden_size, inner, bias=False)
        self.up_proj = nn.Linear(args.hidden_size, inner, bias=False)
        self.down_proj = nn.Linear(inner, args.hidden_size, bias=False)

        self.gate_up: nn.Module  # gate and up fused, and down: set by pack()
        self.down: nn.Module

    def pack(
        self, quant: Quant, device: torch.device, dtype: torch.dtype, packed: Packs = None
    ) -> None:
        """Fuse gate and up into one projection and put both in the weight format.
        packed: the checkpoint's MLX-packed projections by name (`gate_proj`, ...), if any."""
        packed = packed or {}
        gate, up, down = self.gate_proj.weight, self.up_proj.weight, self.down_proj.weight
        weight = torch.cat([gate, up])  # [2 * inter, hidden]
        held = [packed.get("gate_proj", gate), packed.get("up_proj", up)]
        self.gate_up = pack(weight, None, quant, device=device, dtype=dtype, parts=held)
        held = [packed.get("down_proj", down)]
        self.down = pack(down, None, quant, device=device, dtype=dtype, parts=held)
        del self.gate_proj, self.up_proj, self.down_proj

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.gate_up(x).chunk(2, dim=-1)  # [B, T, inter] each
        return self.down(F.silu(gate) * up)  # [B, T, hidden]


class Block(nn.Module):
    """One decoder layer: pre-norm attention and pre-norm feed-forward `mlp` (a dense MLP, or
    routed experts), each with a residual."""

    def __init__(
        self, args: ModelArgs, mlp: FeedForward, attn: LayerAttention | None = None
    ) -> None:
        super().__init__()
        self.self_attn = attn if attn is not None else Attention(args)
        self.mlp = mlp
        self.input_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(args.hidden_size, args.rms_norm_eps)

    def pack(
        self, quant: Quant, device: torch.device, dtype: torch.dtype, packed: Packs = None
    ) -> None:
        """Replace the checkpoint's projections by fused ones in the weight format. packed: the
        layer's MLX-packed projections under names below it (`self_attn.q_proj`, ...)."""
        self.self_attn.pack(quant, device, dtype, below(packed, "self_attn."))
        self.mlp.pack(quant, device, dtype, below(packed, "mlp."))

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, ctx: Context, layer: int) -> Tensor:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx, layer)  # [B, T, hidden]
        return h + self.mlp(self.post_attention_layernorm(h))  # [B, T, hidden]


def below(packed: Packs, prefix: str) -> dict[str, Packed]:
    """The packed tensors under `prefix`, named relative to it."""
    return {k.removeprefix(prefix): v for k, v in (packed or {}).items() if k.startswith(prefix)}


class LlamaModel(nn.Module):
    """The `model.` part of the checkpoint: embedding, the shard's layers, final norm.
    mlp(i), attn(i): the feed-forward and the attention of layer i (global index)."""

    def __init__(
        self,
        args: ModelArgs,
        shard: Shard,
        mlp: Callable[[int], FeedForward],
        attn: Callable[[int], LayerAttention],
    ) -> None:
        super().__init__()
        self.embed_tokens: nn.Embedding | None = (
            nn.Embedding(args.vocab_size, args.hidden_size) if shard.is_first else None
        )
        # Keyed by global index: `model.layers.12.…` on a shard [10, 20) is layers["12"].
        self.layers = nn.ModuleDict(
            {str(i): Block(args, mlp(i), attn(i)) for i in range(shard.start, shard.end)}
        )
        self.norm: RMSNorm | None = (
            RMSNorm(args.hidden_size, args.rms_norm_eps) if shard.is_last else None
        )


class Model(nn.Module):
    """The shard of a causal LM: token ids or hidden states in, hidden states or logits out."""

    def __init__(self, args: ModelArgs, shard: Shard) -> None:
        super().__init__()
        self.args = args
        self.shard = shard
        self.model = LlamaModel(args, shard, self.layer_mlp, self.layer_attention)
        self.lm_head: nn.Linear | None = (
            nn.Linear(args.hidden_size, args.vocab_size, bias=False) if shard.is_last else None
        )
        self.head: nn.Module | None = None  # lm_head in the weight format: set by pack_head()
        self.register_rope(args)

    def register_rope(self, args: ModelArgs) -> None:
        """The rotary frequencies as buffers, built on the CPU even under a meta-device context
        (the engine moves them with the model)."""
        self.inv_freq: Tensor
        self.register_buffer("inv_freq", rope_frequencies(args), persistent=False)
        self.long_after = longrope_context(args)  # LongRoPE's original context, if it is that
        self.inv_freq_long: Tensor
        self.register_buffer("inv_freq_long", rope_frequencies(args, long=True), persistent=False)

    def rotations(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and sin [B, 1, T, D] (sin signed, see rotate()) of positions [B, T]."""
        inv_freq = self.inv_freq  # [D/2]
        if self.long_after is not None:  # an item whose pass reaches past it: the long factors
            reaches = positions.amax(dim=1)[:, None, None] >= self.long_after  # [B, 1, 1]
            inv_freq = torch.where(reaches, self.inv_freq_long, self.inv_freq)  # [B, 1, D/2]
        freqs = positions[..., None].float() * inv_freq  # [B, T, D/2]
        cos = torch.cat((freqs, freqs), dim=-1).cos()[:, None].to(dtype)  # [B, 1, T, D]
        sin = torch.cat((-freqs, freqs), dim=-1).sin()[:, None].to(dtype)
        return cos, sin

    def layer_mlp(self, layer: int) -> FeedForward:
        """The feed-forward of decoder layer `layer` (global index): a dense MLP here."""
        return MLP(self.args)

    def layer_attention(self, layer: int) -> LayerAttention:
        """The attention of decoder layer `layer` (global index): grouped-query here."""
        return Attention(self.args)

    def forward(
        self, x: Tensor, positions: Tensor, ctx: Context, *, all_logits: bool = True
    ) -> Tensor:
        """ids [B, T] or hidden [B, T, hidden] → hidden, or logits [B, T or 1, vocab] if last."""
        # Writes each item's keys and values into ctx.caches[i]; the caller commits them.
        inner = self.model
        h = inner.embed_tokens(x) if inner.embed_tokens is not None else x  # [B, T, hidden]
        if ctx.positions is not None:  # each cache's positions up to the step's, computed here
            ctx.visible = [  # so that a CUDA graph recomputes them from the positions tensor
                torch.arange(c.capacity, device=h.device) <= p
                for c, p in zip(ctx.caches, ctx.positions, strict=True)
            ]
        cos, sin = self.rotations(positions, h.dtype)  # [B, 1, T, D] (deepseek_v3: its own)
        for layer, block in enumerate(inner.layers.values()):
            h = block(h, cos, sin, ctx, layer)  # [B, T, hidden]
        if inner.norm is None or self.head is None:
            return h
        if not all_logits:
            h = h[:, -1:]  # [B, 1, hidden]
        return self.head(inner.norm(h))  # [B, T or 1, vocab]

    def pack_head(
        self, quant: Quant, device: torch.device, dtype: torch.dtype, packed: Packed | None = None
    ) -> None:
        """Put the output head in the weight format (a tied head gets its own copy); packed: the
        checkpoint's MLX-packed head, if it is one."""
        if self.lm_head is not None:
            w = self.lm_head.weight
            held = [w if packed is None else packed]
            self.head = pack(w, None, quant, device=device, dtype=dtype, parts=held)
            del self.lm_head
            self.lm_head = None
