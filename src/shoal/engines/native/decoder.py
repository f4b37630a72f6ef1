"""The whole pass: a shard's layers over a batch of rows in one native call (forward.c)."""

import ctypes
from dataclasses import dataclass

import numpy as np

from shoal.engines.args import ModelArgs
from shoal.engines.native.abi import Dims, Layer, Library, Matrix, Rows
from shoal.engines.native.blocks import BlockWeights, address, threads_or_all


@dataclass
class RoutedExperts:
    """A qwen3_moe layer's feed-forward: a float32 router and E SwiGLU experts in blocks; each
    row runs its top_k experts (softmax routing, renormalised if norm_topk_prob)."""

    router: np.ndarray  # [experts, hidden] float32
    gate_up: list[BlockWeights]  # [experts] of [2 * moe_inter, hidden]: gate and up fused
    down: list[BlockWeights]  # [experts] of [hidden, moe_inter]
    top_k: int
    norm_topk_prob: bool


@dataclass
class DecoderLayer:
    """One Llama-family layer for `Decoder`: block matrices and float32 vectors; a routed layer
    has `experts` and no gate_up or down."""

    qkv: BlockWeights  # q, k, v fused: [(heads + 2 kv_heads) * head_dim, hidden]
    o: BlockWeights  # [hidden, heads * head_dim]
    gate_up: BlockWeights | None  # gate and up fused: [2 * inter, hidden]
    down: BlockWeights | None  # [hidden, inter]
    attn_norm: np.ndarray  # [hidden]
    mlp_norm: np.ndarray  # [hidden]
    qkv_bias: np.ndarray | None = None  # [(heads + 2 kv_heads) * head_dim] (qwen2)
    q_norm: np.ndarray | None = None  # [head_dim] (qwen3)
    k_norm: np.ndarray | None = None  # [head_dim] (qwen3)
    experts: RoutedExperts | None = None  # in place of gate_up and down (qwen3_moe)


def _vector(array: np.ndarray | None, size: int) -> int | None:
    return None if array is None else address(array, np.float32, (size,))


def _check(m: BlockWeights | None, name: str, shape: tuple[int, int]) -> BlockWeights:
    """m, if it is a matrix of `shape`."""
    if m is None or (m.n, m.k) != shape:
        raise ValueError(f"{name} is {m and (m.n, m.k)}, expected {shape}")
    return m


def _experts(
    experts: RoutedExperts, hidden: int, moe_inter: int
) -> tuple[int, "ctypes.Array[Matrix]", "ctypes.Array[Matrix]"]:
    """The router's address and the experts' matrices as C arrays, after checking the shapes."""
    count = len(experts.gate_up)
    if not 1 <= experts.top_k <= count or len(experts.down) != count or moe_inter <= 0:
        raise ValueError(f"top {experts.top_k} of {count} experts of width {moe_inter}")
    router = address(experts.router, np.float32, (count, hidden))
    gate_up = [_check(m, "expert gate_up", (2 * moe_inter, hidden)) for m in experts.gate_up]
    down = [_check(m, "expert down", (hidden, moe_inter)) for m in experts.down]
    matrices = (
        (Matrix * count)(*[m.matrix for m in gate_up]),
        (Matrix * count)(*[m.matrix for m in down]),
    )
    return router, *matrices


class Decoder:
    """A forward pass through a shard's layers in a single native call (forward.c shoal_forward).

    Per layer: RMSNorm, the fused q/k/v product, q/k norms and rotation, every row's keys and
    values written into its item's cache, causal attention over the item's cached positions, the
    output product added to the residual, RMSNorm, gate/up, SiLU(gate) * up, the down product
    added to the residual; or, on a routed layer, each row's top k experts (RoutedExperts), each
    used expert once over the rows that chose it, their weighted outputs added in ascending
    expert order. Every step is per row and in a fixed order, so a row's result does not
    depend on the rest of the batch, nor on whether it came in a prompt or alone: replaying a
    request's tokens as one prompt (failover) rebuilds exactly the cache and logits it had.
    """

    MAX_HEAD_DIM = 512
    CACHE_DTYPE = np.float16  # keys and values: half the bytes a step reads, as llama.cpp's cache

    def __init__(
        self,
        lib: Library,
        *,
        hidden: int,
        heads: int,
        kv_heads: int,
        head_dim: int,
        inter: int,
        eps: float,
        inv_freq: np.ndarray,
        layers: list[DecoderLayer],
        inv_freq_long: np.ndarray | None = None,
        moe_inter: int = 0,
    ) -> None:
        if head_dim > self.MAX_HEAD_DIM or head_dim % 2 or heads % kv_heads:
            raise ValueError(f"no native forward for {heads}/{kv_heads} heads of {head_dim}")
        width = (heads + 2 * kv_heads) * head_dim
        expected = {
            "qkv": (width, hidden),
            "o": (hidden, heads * head_dim),
            "gate_up": (2 * inter, hidden),
            "down": (hidden, inter),
        }
        structs = []
        self._matrices: list[ctypes.Array[Matrix]] = []  # experts' C arrays the structs point into
        for layer in layers:
            routed = layer.experts
            for name, shape in expected.items():
                if routed is None or name in ("qkv", "o"):
                    _check(getattr(layer, name), name, shape)
            struct = Layer(
                layer.qkv.matrix,
                layer.o.matrix,
                Matrix() if layer.gate_up is None else layer.gate_up.matrix,
                Matrix() if layer.down is None else layer.down.matrix,
                _vector(layer.attn_norm, hidden),
                _vector(layer.mlp_norm, hidden),
                _vector(layer.qkv_bias, width),
                _vector(layer.q_norm, head_dim),
                _vector(layer.k_norm, head_dim),
            )
            if routed is not None:
                router, gate_up, down = _experts(routed, hidden, moe_inter)
                struct.experts, struct.top_k = len(routed.gate_up), routed.top_k
                struct.norm_topk_prob = int(routed.norm_topk_prob)
                struct.router = router
                struct.expert_gate_up = ctypes.addressof(gate_up)
                struct.expert_down = ctypes.addressof(down)
                self._matrices += [gate_up, down]
            structs.append(struct)
        self.lib = lib
        self.hidden, self.head_dim, self.eps = hidden, head_dim, eps
        self.inv_freq = np.ascontiguousarray(inv_freq, dtype=np.float32)
        freq = _vector(self.inv_freq, head_dim // 2)
        self.dims = Dims(hidden, heads, kv_heads, head_dim, inter, moe_inter, eps, freq)
        # LongRoPE's long frequencies: a second set of dimensions, chosen per pass
        self.inv_freq_long = np.ascontiguousarray(
            inv_freq if inv_freq_long is None else inv_freq_long, dtype=np.float32
        )
        long = _vector(self.inv_freq_long, head_dim // 2)
        self.dims_long = Dims(hidden, heads, kv_heads, head_dim, inter, moe_inter, eps, long)
        self._layers = (Layer * len(structs))(*structs)
        self._count = len(structs)
        self._keep = layers  # the arrays the structs point into

    @classmethod
    def for_model(
        cls,
        lib: Library,
        args: ModelArgs,
        inv_freq: np.ndarray,
        layers: list[DecoderLayer],
        inv_freq_long: np.ndarray | None = None,
    ) -> "Decoder":
        """The decoder of a Llama-family model file's layers (its arguments and rope; LongRoPE's
        long frequencies too, if it has them; qwen3_moe's expert width)."""
        return cls(
            lib,
            hidden=args.hidden_size,
            heads=args.num_attention_heads,
            kv_heads=args.num_key_value_heads,
            head_dim=args.head_dim,
            inter=args.intermediate_size,
            eps=args.rms_norm_eps,
            inv_freq=inv_freq,
            layers=layers,
            inv_freq_long=inv_freq_long,
            moe_inter=args.moe_intermediate_size,
        )

    def forward(
        self,
        h: int,
        item: np.ndarray,
        position: np.ndarray,
        k: np.ndarray,
        v: np.ndarray,
        capacity: np.ndarray,
        threads: int | None = None,
        long: bool = False,
    ) -> None:
        """Advance h [rows, hidden] (float32 at address h) through every layer, in place
        (rotating with the long frequencies if `long`: LongRoPE).

        Row r is position position[r] of item item[r] (int64 [rows]). k, v: uint64 [items],
        addresses of each item's CACHE_DTYPE cache [layers, kv_heads, capacity, head_dim]; capacity:
        int64 [items]. Every row's keys and values are written at its position.
        """
        rows, items = len(item), len(k)
        address(item, np.int64, (rows,))
        address(position, np.int64, (rows,))
        for array, dtype in ((k, np.uint64), (v, np.uint64), (capacity, np.int64)):
            address(array, dtype, (items,))
        if rows and (item.min() < 0 or item.max() >= items):
            raise ValueError("a row names an item that has no cache")
        if rows and np.any((position < 0) | (position >= capacity[item])):
            raise ValueError("a cache has no room for the position it is to write")
        frame = Rows(item.ctypes.data, position.ctypes.data, k.ctypes.data, v.ctypes.data,
                     capacity.ctypes.data)  # fmt: skip
        dims = self.dims_long if long else self.dims
        status = self.lib.lib.shoal_forward(
            ctypes.byref(dims), self._layers, self._count, h, rows, ctypes.byref(frame),
            threads_or_all(threads),
        )  # fmt: skip
        if status:
            raise MemoryError(f"no memory for a native pass of {rows} rows")

    def rms_norm(
        self, x: int, rows: int, weight: np.ndarray, out: int, threads: int | None
    ) -> None:
        """out [rows, hidden] = RMSNorm(x) with weight [hidden], at raw float32 addresses: the
        final norm, by the same code as the layers' so a row is the same in any batch."""
        w = _vector(weight, self.hidden)
        self.lib.lib.shoal_rms_norm(x, rows, self.hidden, w, self.eps, out, threads_or_all(threads))
