"""The deepseek_v3 decoder (DeepSeek V3/V3.1, Kimi K2) for one shard, in numpy.

Multi-head latent attention (MLA), as transformers' DeepseekV3Attention computes it: q through
`q_a_proj` → `q_a_layernorm` → `q_b_proj` (or one `q_proj`), each head split into a non-rotary
and a rotary part; `kv_a_proj_with_mqa` gives the compressed kv (kv_lora_rank, normalised by
`kv_a_layernorm`) and one rotary key k_pe shared by every head; `kv_b_proj` expands the
compressed kv into each head's non-rotary key and value. The cache holds only the compressed kv
and the rotated k_pe (engines/cache.py cache_dims). A prompt expands its prefix per head; a
decode step folds kv_b_proj into the query and the output instead, attending in the latent
space (cheaper from a few cached positions on: see `ABSORB_BELOW`). Rope is DeepSeek's
interleaved pairs, plain or YaRN (engines/rope.py).

The first `first_dense_layers` layers have llama's dense MLP, the rest the routed experts of
moe.py behind a sigmoid router (`mlp.gate`, its `e_score_correction_bias` used for choosing only)
plus `shared_experts`, one SwiGLU always added. kv_b_proj stays float32 in every format: it is
used per head (H small matrices) where the block kernels take one matrix a call.
"""

import numpy as np

from shoal.engines.args import ModelArgs
from shoal.engines.checkpoint import Checkpoint
from shoal.engines.numpy import llama
from shoal.engines.numpy.llama import (
    F32,
    QUERY_BLOCK,
    Context,
    FeedForward,
    Formats,
    Linear,
    RMSNorm,
    take_fused,
)
from shoal.engines.numpy.moe import Experts, route_sigmoid
from shoal.engines.rope import mla_rope

ABSORB_BELOW = 2  # an item of fewer new rows than this attends in the latent space
LATENT_NORM_EPS = 1e-6  # q_a_layernorm and kv_a_layernorm, as transformers and mlx-lm build them


def rotate_pairs(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate x [N, heads, R] by cos, sin [N, R/2] in DeepSeek's interleaved pairs (x0, x1), ...;
    the result is laid out in halves, as transformers returns it (q and k alike, so q.k holds)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]  # [N, heads, R/2]
    c, s = cos[:, None], sin[:, None]  # [N, 1, R/2]
    return np.concatenate((x1 * c - x2 * s, x2 * c + x1 * s), axis=-1)  # [N, heads, R]


def attend(
    qa: np.ndarray,
    ka: np.ndarray,
    qb: np.ndarray,
    kb: np.ndarray,
    values: np.ndarray,
    start: int,
) -> np.ndarray:
    """softmax(qa.ka + qb.kb) @ values, causal, for queries at positions start..; q already scaled.

    qa [H, T, A], qb [H, T, B]; ka [1 or H, S, A], kb [1, S, B], values [1 or H, S, V] (1: one
    key shared by every head) → [H, T, V].
    """
    h, t, _ = qa.shape
    s = kb.shape[1]
    if ka.shape[0] == 1:  # every head against the same keys: one [H*T, S] product
        scores = qa.reshape(1, h * t, -1) @ ka.transpose(0, 2, 1)  # [1, H*T, S]
        scores = scores.reshape(h, t, s)  # [H, T, S]
    else:
        scores = qa @ ka.transpose(0, 2, 1)  # [H, T, S]
    scores += (qb.reshape(h * t, -1) @ kb[0].T).reshape(h, t, s)  # [H, T, S]
    if t > 1:  # a chunk must not see its own future
        mask = np.arange(s)[None, :] <= np.arange(start, start + t)[:, None]  # [T, S]
        scores = np.where(mask, scores, F32(-np.inf))  # [H, T, S]
    scores -= scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores, out=scores)  # [H, T, S]
    probs /= probs.sum(axis=-1, keepdims=True)
    if values.shape[0] == 1:
        return (probs.reshape(h * t, s) @ values[0]).reshape(h, t, -1)  # [H, T, V]
    return probs @ values  # [H, T, V]


class Attention:
    """Multi-head latent attention over each item's cached compressed kv plus its new rows."""

    def __init__(self, args: ModelArgs, ckpt: Checkpoint, name: str, formats: Formats) -> None:
        self.h, self.nope, self.rope = (
            args.num_attention_heads,
            args.qk_nope_head_dim,
            args.qk_rope_head_dim,
        )
        self.rank, self.v_dim = args.kv_lora_rank, args.v_head_dim
        self.q_rank = args.q_lora_rank
        self.scale = F32(mla_rope(args).softmax_scale)
        hidden, qk = args.hidden_size, self.h * (self.nope + self.rope)
        # x → [q_a | kv_a] (or [q | kv_a]) in one projection
        first = f"{name}.q_a_proj" if self.q_rank is not None else f"{name}.q_proj"
        names = [first, f"{name}.kv_a_proj_with_mqa"]
        sizes = [self.q_rank or qk, self.rank + self.rope]
        weight, _ = take_fused(ckpt, names, hidden, sizes, bias=False)
        bias = None
        if args.attention_bias:  # on q_a, kv_a and o (q_proj has none)
            q_bias = ckpt.take(f"{first}.bias", (sizes[0],)) if self.q_rank else np.zeros(qk, F32)
            bias = np.concatenate([q_bias, ckpt.take(f"{names[1]}.bias", (sizes[1],))])
        self.qkv_a = formats.fused(weight, bias, f"{name}.qkv_a")  # [N, hidden] → [N, Σ sizes]
        self.q_a_layernorm: RMSNorm | None = None
        self.q_b_proj: llama.Projection | None = None
        if self.q_rank is not None:
            self.q_a_layernorm = RMSNorm(
                ckpt, f"{name}.q_a_layernorm", self.q_rank, LATENT_NORM_EPS
            )
            q_b = f"{name}.q_b_proj.weight"
            self.q_b_proj = formats.projection(ckpt.take_packed(q_b, (qk, self.q_rank)), name=q_b)
        self.kv_a_layernorm = RMSNorm(ckpt, f"{name}.kv_a_layernorm", self.rank, LATENT_NORM_EPS)
        kv_b = ckpt.take(f"{name}.kv_b_proj.weight", (self.h * (self.nope + self.v_dim), self.rank))
        self.kv_b = kv_b.reshape(self.h, self.nope + self.v_dim, self.rank)  # [H, n + v, rank]
        self.kv_b_t = kv_b.T.copy()  # [rank, H * (n + v)]: the prefix expanded by one product
        o = f"{name}.o_proj"
        o_bias = ckpt.take(f"{o}.bias", (hidden,)) if args.attention_bias else None
        weight_o = ckpt.take_packed(f"{o}.weight", (hidden, self.h * self.v_dim))
        self.o_proj = formats.projection(weight_o, o_bias, name=f"{o}.weight")

    def __call__(
        self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray, ctx: Context, layer: int
    ) -> np.ndarray:
        n, h, nope = x.shape[0], self.h, self.nope
        a = self.qkv_a(x)  # [N, q_rank or H*(n+r), rank + r]
        split = a.shape[1] - self.rank - self.rope
        q = a[:, :split]
        if self.q_a_layernorm is not None and self.q_b_proj is not None:
            q = self.q_b_proj(self.q_a_layernorm(q))  # [N, H*(n+r)]
        q = q.reshape(n, h, nope + self.rope) * self.scale  # [N, H, n + r], softmax scale folded
        q_nope, q_pe = q[..., :nope], rotate_pairs(q[..., nope:], cos, sin)  # [N, H, n | r]
        latent = self.kv_a_layernorm(a[:, split : split + self.rank])  # [N, rank]
        k_pe = rotate_pairs(a[:, None, split + self.rank :], cos, sin)[:, 0]  # [N, r]
        out = np.empty((n, h, self.v_dim), F32)  # [N, H, v]
        w_v_t = self.kv_b[:, nope:].transpose(0, 2, 1)  # [H, rank, v]
        for cache, rows, start in zip(ctx.caches, ctx.rows, ctx.starts, strict=True):
            # [1, S, rank], [1, S, r] with S = start + T: the prefix and this item's new rows
            keys, values = cache.update(layer, latent[None, rows], k_pe[None, rows])
            qn, qp = q_nope[rows].transpose(1, 0, 2), q_pe[rows].transpose(1, 0, 2)  # [H, T, n|r]
            t = rows.stop - rows.start
            absorbed = t < ABSORB_BELOW
            if absorbed:  # kv_b folded into q (and below, the output): attend in the latent
                qa, ka, vals = qn @ self.kv_b[:, :nope], keys, keys  # [H, T, rank], [1, S, rank]
            else:  # each head's keys and values expanded from the prefix, once
                kv = (keys[0] @ self.kv_b_t).reshape(-1, h, nope + self.v_dim).transpose(1, 0, 2)
                qa, ka, vals = qn, kv[..., :nope], kv[..., nope:]  # [H, T | S | S, n | n | v]
            for lo in range(0, t, QUERY_BLOCK):  # blocks of queries bound a long prompt's scores
                hi = min(lo + QUERY_BLOCK, t)
                seen = start + hi  # the block's queries see positions < start + hi
                o = attend(
                    qa[:, lo:hi],
                    ka[:, :seen],
                    qp[:, lo:hi],
                    values[:, :seen],
                    vals[:, :seen],
                    start + lo,
                )  # [H, b, rank or v]
                if absorbed:
                    o = o @ w_v_t  # [H, b, v]
                out[rows.start + lo : rows.start + hi] = o.transpose(1, 0, 2)
        return self.o_proj(out.reshape(n, h * self.v_dim))  # [N, hidden]


class MoE:
    """The sigmoid router `gate` (float32 in every format), the chosen `experts`, and the
    `shared_experts` every row goes through."""

    def __init__(self, args: ModelArgs, ckpt: Checkpoint, name: str, formats: Formats) -> None:
        self.args = args
        hidden = args.hidden_size
        self.gate = Linear.take(ckpt, f"{name}.gate", hidden, args.num_experts)
        bias = f"{name}.gate.e_score_correction_bias"
        self.correction = ckpt.take(bias, (args.num_experts,))  # [E]
        self.experts = Experts(args, ckpt, f"{name}.experts", formats)
        shared = args.moe_intermediate_size * args.shared_experts
        self.shared_experts = (
            llama.MLP(args, ckpt, f"{name}.shared_experts", formats, shared) if shared else None
        )

    def __call__(self, x: np.ndarray) -> np.ndarray:
        a = self.args
        idx, weights = route_sigmoid(
            self.gate(x),  # [N, E]
            self.correction,
            a.experts_per_token,
            a.n_group,
            a.topk_group,
            a.norm_topk_prob,
            a.routed_scaling_factor,
        )  # [N, k]
        out = self.experts(x, idx, weights)  # [N, hidden]
        if self.shared_experts is not None:
            out += self.shared_experts(x)
        return out


class Model(llama.Model):
    """A deepseek_v3 shard: llama's Model with latent attention, the MoE and YaRN rope."""

    def init_rope(self, args: ModelArgs) -> None:
        rope = mla_rope(args)  # plain or YaRN, on the rotary part of q and k only
        self.inv_freq, self.attention_factor = rope.inv_freq, F32(rope.attention_factor)

    def rotations(self, positions: np.ndarray, ctx: Context) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin [N, R/2] of the rows' positions [N], the attention factor applied."""
        angles = positions.astype(F32)[:, None] * self.inv_freq  # [N, R/2]
        return np.cos(angles) * self.attention_factor, np.sin(angles) * self.attention_factor

    def layer_attention(
        self, ckpt: Checkpoint, name: str, formats: Formats, layer: int
    ) -> llama.LayerAttention:
        return Attention(self.args, ckpt, name, formats)

    def layer_mlp(self, ckpt: Checkpoint, name: str, formats: Formats, layer: int) -> FeedForward:
        if self.args.is_moe_layer(layer):
            return MoE(self.args, ckpt, name, formats)
        return llama.MLP(self.args, ckpt, name, formats)
