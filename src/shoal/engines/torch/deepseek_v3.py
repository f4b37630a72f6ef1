"""The deepseek_v3 decoder (DeepSeek V3/V3.1, Kimi K2) for one pipeline shard.

Multi-head latent attention (MLA), as transformers' DeepseekV3Attention computes it: q through
`q_a_proj` → `q_a_layernorm` → `q_b_proj` (or one `q_proj`), each head split into a non-rotary
and a rotary part; `kv_a_proj_with_mqa` gives the compressed kv (kv_lora_rank, normalised by
`kv_a_layernorm`) and one rotary key k_pe shared by every head; `kv_b_proj` expands the
compressed kv into each head's non-rotary key and value. The cache holds only the compressed kv
and the rotated k_pe (engines/cache.py cache_dims). A prompt expands its prefix per head and runs
the fused attention kernel; a decode step folds kv_b_proj into the query and the output instead
and attends in the latent space, never expanding the cache. Rope is DeepSeek's interleaved
pairs, plain or YaRN (engines/rope.py).

The layers are llama.py's Block with this attention: the first `first_dense_layers` keep its
dense MLP, the rest route to the experts of moe.py through a sigmoid router (`mlp.gate`, whose
`e_score_correction_bias` is used for choosing only) and add `shared_experts`, one SwiGLU every
row goes through. kv_b_proj stays in the engine's dtype in every format: it is used per head
(H small matrices, batched), where the block kernels take one matrix a call.
"""

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from shoal.engines.args import ModelArgs
from shoal.engines.rope import mla_rope
from shoal.engines.torch import llama
from shoal.engines.torch.llama import (
    Context,
    FeedForward,
    LayerAttention,
    Packs,
    RMSNorm,
    below,
)
from shoal.engines.torch.moe import Experts, route_sigmoid
from shoal.engines.torch.quant import Quant, pack

LATENT_NORM_EPS = 1e-6  # q_a_layernorm and kv_a_layernorm, as transformers and mlx-lm build them


def rotate_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate x [B, T, heads, R] by cos, sin [B, T, 1, R/2] in DeepSeek's interleaved pairs; the
    result is laid out in halves, as transformers returns it (q and k alike, so q.k holds)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]  # [B, T, heads, R/2]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)  # [B, T, heads, R]


class Attention(LayerAttention):
    """Multi-head latent attention over the request's cached compressed kv plus the new chunk."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.h, self.nope, self.rope = (
            args.num_attention_heads,
            args.qk_nope_head_dim,
            args.qk_rope_head_dim,
        )
        self.rank, self.v_dim, self.q_rank = args.kv_lora_rank, args.v_head_dim, args.q_lora_rank
        self.scale = mla_rope(args).softmax_scale
        hidden, qk, bias = args.hidden_size, self.h * (self.nope + self.rope), args.attention_bias
        self.q_proj: nn.Linear | None = None
        self.q_a_proj: nn.Linear | None = None
        self.q_a_layernorm: RMSNorm | None = None
        self.q_b_proj: nn.Linear | None = None
        if self.q_rank is None:
            self.q_proj = nn.Linear(hidden, qk, bias=False)
        else:
            self.q_a_proj = nn.Linear(hidden, self.q_rank, bias=bias)
            self.q_a_layernorm = RMSNorm(self.q_rank, LATENT_NORM_EPS)
            self.q_b_proj = nn.Linear(self.q_rank, qk, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(hidden, self.rank + self.rope, bias=bias)
        self.kv_a_layernorm = RMSNorm(self.rank, LATENT_NORM_EPS)
        self.kv_b_proj = nn.Linear(self.rank, self.h * (self.nope + self.v_dim), bias=False)
        self.o_proj = nn.Linear(self.h * self.v_dim, hidden, bias=bias)
        # set by pack(): [q_a | kv_a] (or [q | kv_a]) as one projection, q_b, o, and kv_b per head
        self.qkv_a: nn.Module
        self.q_b: nn.Module | None = None
        self.out: nn.Module
        self.kv_b: Tensor  # [H, n + v, rank]

    def pack(
        self, quant: Quant, device: torch.device, dtype: torch.dtype, packed: Packs = None
    ) -> None:
        """Fuse the two projections of x into one and put every projection in the weight format
        (kv_b_proj in the engine's dtype); packed: MLX-packed projections by name, if any."""
        packed = packed or {}
        first = self.q_proj if self.q_proj is not None else self.q_a_proj
        assert first is not None
        names = ("q_proj" if self.q_proj is not None else "q_a_proj", "kv_a_proj_with_mqa")
        parts = (first, self.kv_a_proj_with_mqa)
        weight = torch.cat([p.weight for p in parts])  # [q_rank or H*(n+r), + rank + r, hidden]
        bias = None
        if self.kv_a_proj_with_mqa.bias is not None:  # q_proj has none: zeros in its place
            q_bias = first.bias if first.bias is not None else torch.zeros(first.out_features)
            bias = torch.cat([q_bias, self.kv_a_proj_with_mqa.bias])
        held = [packed.get(n, p.weight) for n, p in zip(names, parts, strict=True)]
        self.qkv_a = pack(weight, bias, quant, device=device, dtype=dtype, parts=held, name="qkv_a")
        if self.q_b_proj is not None:
            w = self.q_b_proj.weight
            self.q_b = pack(
                w, None, quant, device=device, dtype=dtype, parts=[packed.get("q_b_proj", w)]
            )
        o = self.o_proj
        self.out = pack(
            o.weight,
            o.bias,
            quant,
            device=device,
            dtype=dtype,
            parts=[packed.get("o_proj", o.weight)],
        )
        kv_b = self.kv_b_proj.weight.view(self.h, self.nope + self.v_dim, self.rank)
        self.kv_b = nn.Parameter(kv_b.to(device, dtype), requires_grad=False)
        del self.q_proj, self.q_a_proj, self.q_b_proj, self.kv_a_proj_with_mqa, self.kv_b_proj
        del self.o_proj

    def forward(self, x: Tensor, cos: Tensor, sin: Tensor, ctx: Context, layer: int) -> Tensor:
        b, t, _ = x.shape
        h, nope, rope = self.h, self.nope, self.rope
        a = self.qkv_a(x)  # [B, T, q_rank or H*(n+r), + rank + r]
        q, latent, k_pe = a.split([a.shape[-1] - self.rank - rope, self.rank, rope], dim=-1)
        if self.q_a_layernorm is not None and self.q_b is not None:
            q = self.q_b(self.q_a_layernorm(q))  # [B, T, H*(n+r)]
        q = q.view(b, t, h, nope + rope) * self.scale  # the softmax scale, folded into q
        q_nope, q_pe = q.split([nope, rope], dim=-1)  # [B, T, H, n], [B, T, H, r]
        q_pe = rotate_pairs(q_pe, cos, sin)  # [B, T, H, r]
        latent = self.kv_a_layernorm(latent)  # [B, T, rank]
        k_pe = rotate_pairs(k_pe[:, :, None], cos, sin)[:, :, 0]  # [B, T, r]
        w_k, w_v = self.kv_b.split([nope, self.v_dim], dim=1)  # [H, n, rank], [H, v, rank]
        if t == 1:  # decode: kv_b folded into q and the output, attention in the latent space
            q_lat = torch.bmm(q_nope[:, 0].transpose(0, 1), w_k).transpose(0, 1)  # [B, H, rank]
            lat = [
                self._latent(q_lat[i], q_pe[i, 0], latent[i], k_pe[i], ctx, layer, i)
                for i in range(b)
            ]  # [H, rank] each
            # (bmm, not einsum: einsum took 6 ms for this [1, H, rank] x [H, v, rank] on a CPU)
            out = torch.bmm(torch.stack(lat, dim=1), w_v.transpose(1, 2))  # [H, B, v]
            out = out.transpose(0, 1)  # [B, H, v]
        else:
            q = torch.cat((q_nope, q_pe), dim=-1).transpose(1, 2)  # [B, H, T, n + r]
            items = [self._expanded(q[i], latent[i], k_pe[i], ctx, layer, i) for i in range(b)]
            out = torch.stack(items)  # [B, T, H, v]
        return self.out(out.reshape(b, t, h * self.v_dim))  # [B, T, hidden]

    def _latent(
        self,
        q_lat: Tensor,
        q_pe: Tensor,
        lat: Tensor,
        k_pe: Tensor,
        ctx: Context,
        layer: int,
        i: int,
    ) -> Tensor:
        """One item's decode step: q_lat [H, rank], q_pe [H, r] against its cache after writing
        lat [1, rank], k_pe [1, r] → the attended latent [H, rank]."""
        cache = ctx.caches[i]
        if ctx.positions is not None and ctx.visible is not None:  # fixed shapes: see Context
            keys, values = cache.layer(layer)  # [1, C, rank], [1, C, r]: the whole capacity
            keys.index_copy_(1, ctx.positions[i], lat[None].to(keys.dtype))
            values.index_copy_(1, ctx.positions[i], k_pe[None].to(values.dtype))
        else:
            keys, values = cache.update(layer, lat[None], k_pe[None])  # [1, S, rank], [1, S, r]
        scores = q_lat @ keys[0].T + q_pe @ values[0].T  # [H, S]
        if ctx.visible is not None:
            scores = scores.masked_fill(~ctx.visible[i], float("-inf"))
        return scores.softmax(dim=-1) @ keys[0]  # [H, rank]

    def _expanded(
        self, q: Tensor, lat: Tensor, k_pe: Tensor, ctx: Context, layer: int, i: int
    ) -> Tensor:
        """One item's chunk: q [H, T, n + r] against each head's keys and values expanded from
        its cache after writing lat [T, rank], k_pe [T, r] → [T, H, v]."""
        keys, values = ctx.caches[i].update(layer, lat[None], k_pe[None])  # [1, S, rank | r]
        s, h = keys.shape[1], self.h
        kv = F.linear(keys[0], self.kv_b.flatten(0, 1)).view(s, h, -1)  # [S, H, n + v]
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)  # [S, H, n], [S, H, v]
        k = torch.cat((k_nope, values[0][:, None].expand(s, h, self.rope)), dim=-1)  # [S, H, n+r]
        return F.scaled_dot_product_attention(
            q[None],  # [1, H, T, n + r], already scaled
            k.transpose(0, 1)[None],  # [1, H, S, n + r]
            v.transpose(0, 1)[None],  # [1, H, S, v]
            attn_mask=ctx.masks[i],
            is_causal=ctx.causal[i],
            scale=1.0,
        )[0].transpose(0, 1)  # [T, H, v]


class Router(nn.Module):
    """`mlp.gate`: the router's weight [E, hidden] and its choice-only bias [E]."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(args.num_experts, args.hidden_size))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(args.num_experts))


class MoE(FeedForward):
    """The sigmoid router `gate` (logits in float32), the chosen `experts`, and the
    `shared_experts` every row goes through."""

    def __init__(self, args: ModelArgs) -> None:
        super().__init__()
        self.args = args
        self.gate = Router(args)
        self.experts = Experts(args)
        shared = args.moe_intermediate_size * args.shared_experts
        self.shared_experts = llama.MLP(args, shared) if shared else None

    def pack(
        self, quant: Quant, device: torch.device, dtype: torch.dtype, packed: Packs = None
    ) -> None:
        """Put the experts in the weight format; the router stays in the engine's dtype."""
        self.experts.pack(quant, device, dtype, below(packed, "experts."))
        if self.shared_experts is not None:
            self.shared_experts.pack(quant, device, dtype, below(packed, "shared_experts."))

    def forward(self, x: Tensor) -> Tensor:
        a = self.args
        flat = x.reshape(-1, x.shape[-1])  # [N, hidden]
        logits = F.linear(flat.float(), self.gate.weight.float())  # [N, E]
        idx, weights = route_sigmoid(
            logits,
            self.gate.e_score_correction_bias,
            a.experts_per_token,
            a.n_group,
            a.topk_group,
            a.norm_topk_prob,
            a.routed_scaling_factor,
        )  # [N, k]
        out = self.experts(flat, idx, weights)  # [N, hidden]
        if self.shared_experts is not None:
            out = out + self.shared_experts(flat)
        return out.view(x.shape)  # [B, T, hidden]


class Model(llama.Model):
    """A deepseek_v3 shard: llama's modules with latent attention, the MoE and YaRN rope."""

    def register_rope(self, args: ModelArgs) -> None:
        rope = mla_rope(args)  # plain or YaRN, on the rotary part of q and k only
        self.attention_factor = rope.attention_factor  # on cos and sin
        self.inv_freq: Tensor  # [R/2], on the CPU even under a meta-device context
        self.register_buffer("inv_freq", torch.from_numpy(rope.inv_freq), persistent=False)

    def rotations(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
        """cos and sin [B, T, 1, R/2] of positions [B, T], the attention factor applied."""
        freqs = positions[..., None, None].float() * self.inv_freq  # [B, T, 1, R/2]
        cos = (freqs.cos() * self.attention_factor).to(dtype)  # [B, T, 1, R/2]
        sin = (freqs.sin() * self.attention_factor).to(dtype)  # [B, T, 1, R/2]
        return cos, sin

    def layer_attention(self, layer: int) -> LayerAttention:
        return Attention(self.args)

    def layer_mlp(self, layer: int) -> FeedForward:
        if self.args.is_moe_layer(layer):
            return MoE(self.args)
        return llama.MLP(self.args)
