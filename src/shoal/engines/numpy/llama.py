"""The Llama-family decoder (llama, mistral, qwen2, qwen3, granite, phi3) for one shard, in numpy.

The same math and names as the torch model file, with no framework: float32 arrays, weights
transposed once at load so every projection is `x @ W`. Module names match Hugging Face checkpoint
keys, so `model.layers.12.self_attn.q_proj.weight` is taken by the module of that name; q, k, v
become one projection, as do gate and up. The rows of one pass are every item's tokens
concatenated ([N] ids or [N, hidden]); only attention, which needs each item's own prefix, runs
per item.

Int8 and int4 shards run on the native engine (NumpyEngine hands them to native/engine.py); this
file runs them itself only where that engine cannot (a width that is not whole blocks of 32):
then each projection is a block matrix (shoal.engines.native), the head in int8. Without a C
compiler they stay float32. MLX-quantized (packed) weights become blocks in their own format
exactly where blocks are used, and float32 elsewhere; a packed embedding table stays packed.
"""

import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from shoal.engines import native
from shoal.engines.args import ModelArgs, longrope_context
from shoal.engines.base import ProgressFn
from shoal.engines.cache import KVCache
from shoal.engines.checkpoint import Checkpoint
from shoal.engines.packed import Packed, dense
from shoal.errors import UnsupportedModel
from shoal.types.shard import Shard
from shoal.types.weights import Quant

F32 = np.float32
QUERY_BLOCK = 256  # queries attended at once: bounds the scores of a long prefill


def transpose(w: np.ndarray, block: int = 256) -> np.ndarray:
    """w [out, in] as a contiguous float32 [in, out], copied in blocks of rows."""
    # A block of rows fits in the CPU cache; one whole-matrix transpose thrashes it (2-8x slower).
    out = np.empty((w.shape[1], w.shape[0]), F32)  # [in, out]
    for i in range(0, w.shape[0], block):
        out[:, i : i + block] = w[i : i + block].T
    return out


class Linear:
    """x @ W (+ b), W [in, out]: the checkpoint's [out, in] weight transposed once at load."""

    def __init__(self, weight: np.ndarray, bias: np.ndarray | None = None) -> None:
        self.weight = transpose(weight)  # [in, out]
        self.bias = bias

    @classmethod
    def take(
        cls, ckpt: Checkpoint, name: str, n_in: int, n_out: int, bias: bool = False
    ) -> "Linear":
        w = ckpt.take(f"{name}.weight", (n_out, n_in))
        return cls(w, ckpt.take(f"{name}.bias", (n_out,)) if bias else None)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = x @ self.weight  # [N, out]
        if self.bias is not None:
            y += self.bias
        return y


class BlockLinear:
    """x @ W.T (+ b) with W in blocks of 32 (native.BlockWeights), quantized once at load."""

    def __init__(self, blocks: native.BlockWeights, bias: np.ndarray | None, threads: int) -> None:
        self.blocks, self.bias, self.threads = blocks, bias, threads

    def __call__(self, x: np.ndarray) -> np.ndarray:
        y = self.blocks.matmul(x, self.threads)  # [N, out]
        if self.bias is not None:
            y += self.bias
        return y


Projection = Linear | BlockLinear


@dataclass(frozen=True)
class Formats:
    """How the model holds its projections: float32, or native blocks ("q8"/"q4") and threads."""

    lib: native.Library | None = None
    kind: native.Kind = "q8"
    threads: int = 1

    @classmethod
    def of(cls, quant: Quant, threads: int | None) -> "Formats":
        """Blocks for int8/int4 where the kernels compile; float32 for none, fp16 or no compiler."""
        lib = native.library() if quant in ("int8", "int4") else None
        if lib is None:
            return cls()
        return cls(lib, "q8" if quant == "int8" else "q4", max(1, threads or os.cpu_count() or 1))

    def projection(
        self,
        weight: np.ndarray | Packed,
        bias: np.ndarray | None = None,
        *,
        kind: native.Kind | None = None,
        name: str = "",
    ) -> Projection:
        """The [out, in] weight as a projection in this format (kind overrides q8/q4; a packed
        weight keeps its own block format where it maps exactly)."""
        if self.lib is None or weight.shape[1] % native.BLOCK:
            return Linear(dense(weight), bias)
        blocks = native.blocks_of(self.lib, weight, kind or self.kind, self.threads, name)
        return BlockLinear(blocks, bias, self.threads)

    def fused(
        self, parts: Sequence[np.ndarray | Packed], bias: np.ndarray | None, name: str
    ) -> Projection:
        """Several [out, in] weights stacked along their rows as one projection."""
        if self.lib is None or parts[0].shape[1] % native.BLOCK:
            return Linear(np.concatenate([dense(p) for p in parts]), bias)
        blocks = native.stacked_blocks(self.lib, parts, self.kind, self.threads, name)
        return BlockLinear(blocks, bias, self.threads)


def take_fused(
    ckpt: Checkpoint, names: Sequence[str], n_in: int, sizes: Sequence[int], bias: bool
) -> tuple[list[np.ndarray | Packed], np.ndarray | None]:
    """The [out, in] weights of several projections, to stack into one (and their biases)."""
    pairs = zip(names, sizes, strict=True)
    weight = [ckpt.take_packed(f"{n}.weight", (size, n_in)) for n, size in pairs]
    if not bias:
        return weight, None
    biases = [ckpt.take(f"{n}.bias", (size,)) for n, size in zip(names, sizes, strict=True)]
    return weight, np.concatenate(biases)


class RMSNorm:
    """Root-mean-square norm over the last dim."""

    def __init__(self, ckpt: Checkpoint, name: str, dim: int, eps: float) -> None:
        self.weight = ckpt.take(f"{name}.weight", (dim,))
        self.eps = F32(eps)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        mean_square = (x * x).sum(axis=-1, keepdims=True) / F32(x.shape[-1])  # [..., 1]
        scale = 1 / np.sqrt(mean_square + self.eps)  # [..., 1]
        return self.weight * (x * scale)  # [..., dim]


def rope_frequencies(args: ModelArgs, long: bool = False) -> np.ndarray:
    """Inverse frequencies [head_dim / 2] of the rotary embedding, with rope_scaling applied
    (LongRoPE: its long factors if `long`, else its short ones)."""
    dim = args.head_dim
    exponents = np.arange(0, dim, 2, dtype=F32) / F32(dim)  # [D/2]
    inv_freq = 1 / (F32(args.rope_theta) ** exponents)  # [D/2]
    scaling = args.rope_scaling or {}
    kind = scaling.get("rope_type", scaling.get("type", "default"))
    if kind == "default":
        return inv_freq
    if kind == "linear":
        return inv_freq / F32(scaling["factor"])
    if kind == "llama3":
        return _llama3_frequencies(inv_freq, scaling)
    if kind == "longrope":  # as transformers: 1 / (factor * theta^(2i/D))
        factors = np.asarray(scaling["long_factor" if long else "short_factor"], F32)  # [D/2]
        return (1 / (factors * F32(args.rope_theta) ** exponents)).astype(F32)
    raise UnsupportedModel(
        f"rope_scaling type {kind!r} is not implemented (llama3, linear, longrope)"
    )


def _llama3_frequencies(inv_freq: np.ndarray, scaling: dict[str, Any]) -> np.ndarray:
    """Llama 3.1: slow down long wavelengths by `factor`, keep short ones, blend in between."""
    factor = F32(scaling["factor"])
    low, high = F32(scaling["low_freq_factor"]), F32(scaling["high_freq_factor"])
    context = F32(scaling["original_max_position_embeddings"])
    wavelen = F32(2 * math.pi) / inv_freq  # [D/2]
    scaled = np.where(wavelen > context / low, inv_freq / factor, inv_freq)  # [D/2]
    smooth = (context / wavelen - low) / (high - low)  # [D/2]
    blended = (1 - smooth) * scaled / factor + smooth * scaled  # [D/2]
    medium = (wavelen >= context / high) & (wavelen <= context / low)  # [D/2]
    return np.where(medium, blended, scaled).astype(F32)


def rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotate x [N, heads, D] by cos, sin [N, D/2] (halves layout, as in HF checkpoints)."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]  # [N, heads, D/2]
    c, s = cos[:, None], sin[:, None]  # [N, 1, D/2]
    return np.concatenate((x1 * c - x2 * s, x2 * c + x1 * s), axis=-1)  # [N, heads, D]


@dataclass
class Context:
    """Where each item of the pass lies: its cache, its rows, and its first position."""

    caches: Sequence[KVCache[np.ndarray]]
    rows: Sequence[slice]  # item i is rows[i] of the [N, ...] arrays
    starts: Sequence[int]


def attend(q: np.ndarray, keys: np.ndarray, values: np.ndarray, start: int) -> np.ndarray:
    """Causal attention of q [T, H, D] at positions start.. over keys, values [KV, S, D]."""
    t, n_heads, d = q.shape
    n_kv, s, _ = keys.shape
    g = n_heads // n_kv  # query heads per key/value head, which serves heads kv*g .. kv*g+g-1
    q = q * F32(d**-0.5)  # [T, H, D]
    qg = q.reshape(t, n_kv, g, d).transpose(1, 2, 0, 3).reshape(n_kv, g * t, d)  # [KV, G*T, D]
    scores = qg @ keys.transpose(0, 2, 1)  # [KV, G*T, S]
    if t > 1:  # one query sees the whole prefix; a chunk must not see its own future
        mask = np.arange(s)[None, :] <= np.arange(start, start + t)[:, None]  # [T, S]
        scores = np.where(np.tile(mask, (g, 1)), scores, F32(-np.inf))  # [KV, G*T, S]
    scores -= scores.max(axis=-1, keepdims=True)
    probs = np.exp(scores, out=scores)  # [KV, G*T, S]
    probs /= probs.sum(axis=-1, keepdims=True)
    out = probs @ values  # [KV, G*T, D]
    return out.reshape(n_kv, g, t, d).transpose(2, 0, 1, 3).reshape(t, n_heads * d)  # [T, H*D]


class Attention:
    """Grouped-query attention over each item's cached prefix plus its new rows."""

    def __init__(self, args: ModelArgs, ckpt: Checkpoint, name: str, formats: Formats) -> None:
        self.n_heads, self.n_kv_heads = args.num_attention_heads, args.num_key_value_heads
        self.head_dim = d = args.head_dim
        hidden = args.hidden_size
        names = [f"{name}.{p}_proj" for p in "qkv"]
        sizes = [self.n_heads * d, self.n_kv_heads * d, self.n_kv_heads * d]
        weight, bias = take_fused(ckpt, names, hidden, sizes, args.attention_bias)
        # [N, hidden] → [N, (H + 2 KV) * D]
        self.qkv = formats.fused(weight, bias, f"{name}.qkv")
        o = f"{name}.o_proj.weight"
        self.o_proj = formats.projection(ckpt.take_packed(o, (hidden, sizes[0])), name=o)
        eps = args.rms_norm_eps
        self.q_norm = RMSNorm(ckpt, f"{name}.q_norm", d, eps) if args.qk_norm else None
        self.k_norm = RMSNorm(ckpt, f"{name}.k_norm", d, eps) if args.qk_norm else None

    def __call__(
        self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray, ctx: Context, layer: int
    ) -> np.ndarray:
        n, h, kv, d = x.shape[0], self.n_heads, self.n_kv_heads, self.head_dim
        qkv = self.qkv(x).reshape(n, h + 2 * kv, d)  # [N, H + 2 KV, D]
        q, k, v = qkv[:, :h], qkv[:, h : h + kv], qkv[:, h + kv :]  # [N, H | KV | KV, D]
        if self.q_norm is not None and self.k_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)  # [N, H, D], [N, KV, D]
        out = np.empty((n, self.n_heads * self.head_dim), F32)  # [N, H*D]
        for cache, rows, start in zip(ctx.caches, ctx.rows, ctx.starts, strict=True):
            # [KV, S, D] with S = start + T: the prefix and this item's new keys and values.
            keys, values = cache.update(
                layer, k[rows].transpose(1, 0, 2), v[rows].transpose(1, 0, 2)
            )
            # Queries go in blocks, each against only the keys it may see, so a long prompt's
            # scores stay [KV, G*block, S] rather than [KV, G*T, S].
            for lo in range(rows.start, rows.stop, QUERY_BLOCK):
                hi = min(lo + QUERY_BLOCK, rows.stop)
                pos = start + lo - rows.start  # position of query row lo
                seen = pos + hi - lo
                out[lo:hi] = attend(q[lo:hi], keys[:, :seen], values[:, :seen], pos)  # [b, H*D]
        return self.o_proj(out)  # [N, hidden]


FeedForward = Callable[[np.ndarray], np.ndarray]  # a layer's feed-forward: [N, hidden] → same


class MLP:
    """SiLU-gated feed-forward, `inner` wide (default args.intermediate_size)."""

    def __init__(
        self,
        args: ModelArgs,
        ckpt: Checkpoint,
        name: str,
        formats: Formats,
        inner: int | None = None,
    ) -> None:
        hidden, inner = args.hidden_size, inner or args.intermediate_size
        names = [f"{name}.gate_proj", f"{name}.up_proj"]
        weight, _ = take_fused(ckpt, names, hidden, [inner, inner], bias=False)
        self.inner = inner
        # [N, hidden] → [N, 2 * inner]
        self.gate_up = formats.fused(weight, None, f"{name}.gate_up")
        down = f"{name}.down_proj.weight"
        self.down_proj = formats.projection(ckpt.take_packed(down, (hidden, inner)), name=down)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        gate_up = self.gate_up(x)  # [N, 2 * inner]
        gate, up = gate_up[:, : self.inner], gate_up[:, self.inner :]  # [N, inner] each
        # silu(g) = g * sigmoid(g), with sigmoid as tanh: no overflow for large negative g.
        act = gate * (F32(0.5) + F32(0.5) * np.tanh(F32(0.5) * gate))  # [N, inner]
        return self.down_proj(act * up)  # [N, hidden]


class LayerAttention(Protocol):
    """A layer's attention: normed x [N, hidden] → [N, hidden], writing its items' caches."""

    def __call__(
        self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray, ctx: Context, layer: int
    ) -> np.ndarray: ...


class Block:
    """One decoder layer: pre-norm attention `attn` and pre-norm feed-forward `mlp` (built from
    the checkpoint under `{name}.self_attn` and `{name}.mlp`), each with a residual."""

    def __init__(
        self,
        args: ModelArgs,
        ckpt: Checkpoint,
        name: str,
        mlp: FeedForward,
        attn: "LayerAttention",
    ) -> None:
        eps = args.rms_norm_eps
        self.self_attn = attn
        self.mlp = mlp
        self.input_layernorm = RMSNorm(ckpt, f"{name}.input_layernorm", args.hidden_size, eps)
        self.post_attention_layernorm = RMSNorm(
            ckpt, f"{name}.post_attention_layernorm", args.hidden_size, eps
        )

    def __call__(
        self, x: np.ndarray, cos: np.ndarray, sin: np.ndarray, ctx: Context, layer: int
    ) -> np.ndarray:
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, ctx, layer)  # [N, hidden]
        return h + self.mlp(self.post_attention_layernorm(h))  # [N, hidden]


class Model:
    """The shard of a causal LM: token ids or hidden states in, hidden states or logits out."""

    def __init__(
        self,
        args: ModelArgs,
        shard: Shard,
        ckpt: Checkpoint,
        progress: ProgressFn | None = None,
        formats: Formats | None = None,
    ) -> None:
        self.args, self.shard = args, shard
        formats = formats or Formats()
        hidden, vocab, eps = args.hidden_size, args.vocab_size, args.rms_norm_eps
        total = shard.end - shard.start
        if progress is not None:
            progress(0, total)
        embed = (
            ckpt.take_packed("model.embed_tokens.weight", (vocab, hidden))
            if shard.is_first
            else None
        )
        # Keyed by global index: `model.layers.12.…` on a shard [10, 20) is layers[12].
        self.layers: dict[int, Block] = {}
        for i in range(shard.start, shard.end):
            name = f"model.layers.{i}"
            mlp = self.layer_mlp(ckpt, f"{name}.mlp", formats, i)
            attn = self.layer_attention(ckpt, f"{name}.self_attn", formats, i)
            self.layers[i] = Block(args, ckpt, name, mlp, attn)
            if progress is not None:
                progress(i - shard.start + 1, total)
        self.norm = RMSNorm(ckpt, "model.norm", hidden, eps) if shard.is_last else None
        # The head stays 8-bit under int4, as GGUFs keep it (4 bits cost accuracy there).
        # (A packed head keeps its own format in blocks, exactly.)
        head = ckpt.take_packed("lm_head.weight", (vocab, hidden)) if shard.is_last else None
        self.lm_head = (
            None if head is None else formats.projection(head, kind="q8", name="lm_head.weight")
        )
        # [vocab, hidden]; tied on a whole float model, a view of the head's [hidden, vocab]; a
        # packed table stays packed, its rows dequantized per lookup.
        self.embed_tokens: np.ndarray | Packed | None = embed
        tied = isinstance(self.lm_head, Linear) and args.tie_word_embeddings
        if isinstance(embed, np.ndarray) and tied:
            assert isinstance(self.lm_head, Linear)
            self.embed_tokens = self.lm_head.weight.T
        self.init_rope(args)

    def init_rope(self, args: ModelArgs) -> None:
        """The rotary frequencies (LongRoPE: both sets)."""
        self.inv_freq = rope_frequencies(args)  # [D/2]
        self.long_after = longrope_context(args)  # LongRoPE's original context, if it is that
        self.inv_freq_long = rope_frequencies(args, long=True)  # [D/2]

    def rotations(self, positions: np.ndarray, ctx: Context) -> tuple[np.ndarray, np.ndarray]:
        """cos and sin [N, D/2] of the rows' positions [N]."""
        inv_freq = self.inv_freq  # [D/2]
        if self.long_after is not None:  # an item whose pass reaches past it: the long factors
            reaches = [positions[rows].max(initial=-1) >= self.long_after for rows in ctx.rows]
            long = np.repeat(reaches, [rows.stop - rows.start for rows in ctx.rows])  # [N]
            inv_freq = np.where(long[:, None], self.inv_freq_long, self.inv_freq)  # [N, D/2]
        angles = positions.astype(F32)[:, None] * inv_freq  # [N, D/2]
        return np.cos(angles), np.sin(angles)

    def layer_mlp(self, ckpt: Checkpoint, name: str, formats: Formats, layer: int) -> FeedForward:
        """The feed-forward of decoder layer `layer` (global index): a dense MLP here."""
        return MLP(self.args, ckpt, name, formats)

    def layer_attention(
        self, ckpt: Checkpoint, name: str, formats: Formats, layer: int
    ) -> "LayerAttention":
        """The attention of decoder layer `layer` (global index): grouped-query here."""
        return Attention(self.args, ckpt, name, formats)

    def __call__(
        self, x: np.ndarray, positions: np.ndarray, ctx: Context, *, all_logits: bool = True
    ) -> np.ndarray:
        """ids [N] or hidden [N, hidden] → hidden [N, hidden], or logits if last.

        Logits are [N, vocab] with all_logits, else [items, vocab] of each item's last row.
        Writes each item's keys and values into its cache; the caller commits them.
        """
        h = self.embed_tokens[x] if self.embed_tokens is not None else x  # [N, hidden]
        cos, sin = self.rotations(positions, ctx)  # [N, D/2] (deepseek_v3: its own)
        for layer, block in enumerate(self.layers.values()):
            h = block(h, cos, sin, ctx, layer)  # [N, hidden]
        if self.norm is None or self.lm_head is None:
            return h
        if not all_logits:
            h = h[[rows.stop - 1 for rows in ctx.rows]]  # [items, hidden]
        return self.lm_head(self.norm(h))  # [N or items, vocab]
