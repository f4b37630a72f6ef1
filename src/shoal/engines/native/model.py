"""A Llama-family shard (llama, mistral, qwen2, qwen3, qwen3_moe, granite, phi3) on blocks, in one
native call.

The shard's tensors under Hugging Face names are taken once: q, k, v fused into one block matrix,
gate and up into another, o and down, each in q8 (int8) or q4 (int4) blocks; the norms, the qwen2
q/k/v bias and the qwen3 q/k norms stay float32. A qwen3_moe routed layer has, in place of
gate/up and down, a float32 router (as the numpy model file's, so the choice of experts does not
move with the weights' format) and each expert's fused gate/up and down in blocks. The embedding
stays float32 and the head is q8 blocks whatever the layers' format (4 bits cost accuracy there,
so GGUFs keep it at 6-8 bits). MLX-quantized (packed) weights keep their own format instead,
exactly: 4-bit as q4 blocks, 8-bit as q8 blocks with minimums, a packed embedding packed (rows
dequantized per lookup).
A pass is an embedding lookup, `Decoder.forward` through every layer, the final norm and the head:
the same code for a prompt's rows and a decode step's, so a row's result never depends on the
rest of the batch.
"""

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from shoal.engines.args import ModelArgs, longrope_context
from shoal.engines.base import ProgressFn
from shoal.engines.checkpoint import Checkpoint
from shoal.engines.native.abi import Library
from shoal.engines.native.blocks import BLOCK, BlockWeights, Kind, blocks_of, stacked_blocks
from shoal.engines.native.decoder import Decoder, DecoderLayer, RoutedExperts
from shoal.engines.packed import Packed
from shoal.types.shard import Shard

F32 = np.float32
# granite and phi3 arrive in the llama layout (engines/adapt.py). placement/plans.py names native
# for these dense ones only, from a card; the runner hands qwen3_moe shards over all the same
# (deepseek_v3's latent attention is not in forward.c)
ARCHITECTURES = frozenset({"llama", "mistral", "qwen2", "qwen3", "granite", "phi3"})
ROUTED = frozenset({"qwen3_moe"})  # routed experts (decoder.py RoutedExperts)


def supports(args: ModelArgs) -> bool:
    """Whether every projection's input is whole blocks and the heads fit the native pass."""
    d = args.head_dim
    layers = range(args.num_hidden_layers)
    routed = [args.is_moe_layer(i) for i in layers]
    widths = [args.hidden_size, args.num_attention_heads * d]
    if not all(routed):  # a dense layer's MLP
        widths.append(args.intermediate_size)
    if any(routed):
        widths.append(args.moe_intermediate_size)
        if not 1 <= args.experts_per_token <= args.num_experts:
            return False
    return (
        args.model_type in ARCHITECTURES | ROUTED
        and all(w > 0 and w % BLOCK == 0 for w in widths)
        and d <= Decoder.MAX_HEAD_DIM
        and d % 2 == 0
        and args.num_attention_heads % args.num_key_value_heads == 0
    )


@dataclass(frozen=True)
class Blocks:
    """How weights become block matrices: the library, the layers' format and the threads."""

    lib: Library
    kind: Kind
    threads: int

    def __call__(
        self, weight: np.ndarray | Packed, name: str, kind: Kind | None = None
    ) -> BlockWeights:
        """A float weight in `kind` (default: the layers' format); a packed one exactly in its
        own where it can be (native/blocks.py blocks_of)."""
        return blocks_of(self.lib, weight, kind or self.kind, self.threads, name)

    def stacked(self, parts: Sequence[np.ndarray | Packed], name: str) -> BlockWeights:
        """Weights stacked along their rows as one block matrix (blocks.py stacked_blocks)."""
        return stacked_blocks(self.lib, parts, self.kind, self.threads, name)


def _mlp(
    ckpt: Checkpoint, name: str, hidden: int, inter: int, blocks: Blocks
) -> tuple[BlockWeights, BlockWeights]:
    """A SwiGLU feed-forward under `name` ({gate,up,down}_proj): gate/up fused, and down."""
    gate_up = [ckpt.take_packed(f"{name}.{p}_proj.weight", (inter, hidden)) for p in ("gate", "up")]
    down = f"{name}.down_proj.weight"
    return (
        blocks.stacked(gate_up, f"{name}.gate_up"),  # [2 * inter, hidden]
        blocks(ckpt.take_packed(down, (hidden, inter)), down),  # [hidden, inter]
    )


def _experts(ckpt: Checkpoint, args: ModelArgs, name: str, blocks: Blocks) -> RoutedExperts:
    """qwen3_moe's `{name}.gate` (the router, float32) and `{name}.experts.{e}`."""
    hidden, inter = args.hidden_size, args.moe_intermediate_size
    router = ckpt.take(f"{name}.gate.weight", (args.num_experts, hidden))  # [E, hidden]
    mlps = [
        _mlp(ckpt, f"{name}.experts.{e}", hidden, inter, blocks) for e in range(args.num_experts)
    ]
    return RoutedExperts(
        router=np.ascontiguousarray(router, dtype=F32),
        gate_up=[gate_up for gate_up, _ in mlps],
        down=[down for _, down in mlps],
        top_k=args.experts_per_token,
        norm_topk_prob=args.norm_topk_prob,
    )


def _layer(ckpt: Checkpoint, args: ModelArgs, index: int, blocks: Blocks) -> DecoderLayer:
    """Layer `index` from the checkpoint: fused q/k/v and gate/up (or routed experts), every
    projection in blocks."""
    name = f"model.layers.{index}"
    hidden, inter, d = args.hidden_size, args.intermediate_size, args.head_dim
    sizes = {"q": args.num_attention_heads * d, "k": args.num_key_value_heads * d}
    sizes["v"] = sizes["k"]
    attn = f"{name}.self_attn"
    qkv = [ckpt.take_packed(f"{attn}.{p}_proj.weight", (n, hidden)) for p, n in sizes.items()]
    bias = None
    if args.attention_bias:
        bias = np.concatenate([ckpt.take(f"{attn}.{p}_proj.bias", (n,)) for p, n in sizes.items()])
    experts = gate_up = down = None
    if args.is_moe_layer(index):
        experts = _experts(ckpt, args, f"{name}.mlp", blocks)
    else:
        gate_up, down = _mlp(ckpt, f"{name}.mlp", hidden, inter, blocks)
    o = f"{attn}.o_proj.weight"
    return DecoderLayer(
        qkv=blocks.stacked(qkv, f"{attn}.qkv"),  # [(H + 2 KV) * D, hidden]
        o=blocks(ckpt.take_packed(o, (hidden, sizes["q"])), o),
        gate_up=gate_up,
        down=down,
        attn_norm=ckpt.take(f"{name}.input_layernorm.weight", (hidden,)),
        mlp_norm=ckpt.take(f"{name}.post_attention_layernorm.weight", (hidden,)),
        qkv_bias=bias,
        q_norm=ckpt.take(f"{attn}.q_norm.weight", (d,)) if args.qk_norm else None,
        k_norm=ckpt.take(f"{attn}.k_norm.weight", (d,)) if args.qk_norm else None,
        experts=experts,
    )


class Model:
    """The shard of a causal LM on blocks: ids or hidden states in, hidden states or logits out."""

    def __init__(
        self,
        args: ModelArgs,
        shard: Shard,
        tensors: Mapping[str, np.ndarray | Packed],
        blocks: Blocks,
        inv_freq: np.ndarray,
        progress: ProgressFn | None = None,
        inv_freq_long: np.ndarray | None = None,
    ) -> None:
        self.args, self.shard, self.threads = args, shard, blocks.threads
        hidden, vocab = args.hidden_size, args.vocab_size
        ckpt = Checkpoint(tensors)
        total = shard.end - shard.start
        if progress is not None:
            progress(0, total)
        # [vocab, hidden]; a packed (MLX) table stays packed, its rows dequantized per lookup
        self.embed_tokens = (
            ckpt.take_packed("model.embed_tokens.weight", (vocab, hidden))
            if shard.is_first
            else None
        )
        layers = []
        for done, index in enumerate(range(shard.start, shard.end), start=1):
            layers.append(_layer(ckpt, args, index, blocks))
            if progress is not None:
                progress(done, total)
        self.norm = ckpt.take("model.norm.weight", (hidden,)) if shard.is_last else None
        head = ckpt.take_packed("lm_head.weight", (vocab, hidden)) if shard.is_last else None
        # [vocab, hidden] blocks: q8 from floats, a packed head exactly in its own format
        self.head = None if head is None else blocks(head, "lm_head.weight", kind="q8")
        ckpt.finish(f"{args.model_type} shard {shard}")
        self.decoder = Decoder.for_model(blocks.lib, args, inv_freq, layers, inv_freq_long)
        self.long_after = longrope_context(args)  # LongRoPE's original context, if it is that

    def __call__(
        self,
        x: np.ndarray,
        item: np.ndarray,
        positions: np.ndarray,
        caches: tuple[np.ndarray, np.ndarray, np.ndarray],
        last: np.ndarray | None,
    ) -> np.ndarray:
        """ids [N] or hidden [N, hidden] → hidden [N, hidden], or logits if this is the last shard.

        Row r is position positions[r] of item item[r]; caches: the items' key and value cache
        addresses and capacities (Decoder.forward). Logits are of the rows `last` picks ([items,
        vocab]), or of every row when last is None ([N, vocab]).
        """
        if self.embed_tokens is not None:
            h = self.embed_tokens[x]  # [N, hidden], a copy: advanced in place
        else:
            h = np.array(x, dtype=F32, order="C")
        self._layers(h, item, positions, caches)
        if self.norm is None or self.head is None:
            return h
        if last is not None:
            h = np.ascontiguousarray(h[last])  # [items, hidden]
        normed = np.empty_like(h)
        rows = h.shape[0]
        self.decoder.rms_norm(h.ctypes.data, rows, self.norm, normed.ctypes.data, self.threads)
        return self.head.matmul(normed, self.threads)  # [N or items, vocab]

    def _layers(
        self,
        h: np.ndarray,
        item: np.ndarray,
        positions: np.ndarray,
        caches: tuple[np.ndarray, np.ndarray, np.ndarray],
    ) -> None:
        """h [N, hidden] through every layer, in place. LongRoPE: the items whose rows reach its
        original context rotate with the long frequencies, the rest with the short, in a pass
        each (a row's result never depends on the other rows)."""
        k, v, capacity = caches
        long = None
        if self.long_after is not None and len(item):
            last = np.full(len(k), -1, np.int64)
            np.maximum.at(last, item, positions)  # [items]: each item's last position
            long = last[item] >= self.long_after  # [N]
        if long is None or not long.any() or long.all():
            reach = long is not None and bool(long.all())
            self.decoder.forward(
                h.ctypes.data, item, positions, k, v, capacity, self.threads, reach
            )
            return
        for rows in (~long, long):
            part = np.ascontiguousarray(h[rows])  # [n, hidden]
            at = (part.ctypes.data, item[rows], positions[rows], k, v, capacity, self.threads)
            self.decoder.forward(*at, rows is long)
            h[rows] = part
