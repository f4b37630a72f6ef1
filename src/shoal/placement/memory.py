"""The memory model: the bytes a pipeline stage of a model holds, and what a node offers.

Each engine holds a model's weights in its own format (`held`):

    torch, numpy, native  the card's `quant`: none = the engine's dtype (numpy: float32, it has no
                          fp16, so fp16 is float32 there too), fp16 = 16 bits, int8 = Q8_0 blocks
                          (8.5 bits a weight), int4 = Q4_1 blocks (5 bits); under int8 and int4 the
                          head is 8-bit blocks (8.5 bits) on the CPU, but torch on CUDA keeps it
                          fp16, so torch's int4 head is planned at 16 bits (the safe side).
                          MLX-packed weights (the first source they read is an mlx repo) keep
                          their format in the block kernels under int8 and int4: Q4_1 (5 bits)
                          up to 4 bits, 8-bit blocks with a minimum (9 bits) above, the head
                          too; numpy and native keep the embedding table packed (4.5 / 8.5)
    llamacpp              the GGUF file's own bits (the card's GGUF source): every projection at
                          the file's average (Q4_K_M ≈ 4.89, Q8_0 8.5, ...), the embedding table
                          too, the head at 8.5 bits where the file is smaller (llama.cpp writes it
                          at Q6_K or Q8_0)
    mlx                   the engine's dtype: shoal's MLX engine casts every tensor on load

So a transformer layer costs its share of the card's file, scaled from the file's bits per weight
to the engine's:

    layer weights = (storage_bytes - embedding storage) / layers * held bits / file bits
    embeddings    = vocab * hidden * embedding bytes, held by the first stage (a lookup table;
                    dtype_bytes except in llama.cpp)
    head          = vocab * hidden * head bytes, held by the last stage (counted even when tied:
                    the engine holds its own copy on each stage that needs it)
    KV cache      = the card's kv_values_per_token * dtype_bytes per layer per token (keys and
                    values, 2 * kv_heads * head_dim; latent attention's kv_lora_rank +
                    qk_rope_head_dim), for `context` tokens times `sequences` concurrent sequences
    headroom      = 10 % of the node's usable memory + 256 MiB, never planned into

A mixture of experts holds every expert, so its layers' share of the file is split by the
weights each layer has (shape.py): a layer with experts costs (attention + all experts + router)
x the file's bytes per weight (the layers' file bytes / their weights), the card's first
`dense_layers` layers their own smaller share. What a token reads of a layer
(`active_layer_bytes`, the speed model's figure) is its active share, attention + router +
shared + experts_per_token routed experts, at the same bytes per weight; for a dense model, the
whole layer.

The file's bits count block scales: MLX 4-bit stores 4 bits and an f16 scale and bias per 64
weights (4.5 bits), 8-bit 8.5; GGUF types as `GGUF_BITS`. Only one embedding is taken out of the
file size, so a model with a separate head in the file is slightly over-estimated per layer: the
safe side. A node's usable memory is the free memory of its GPUs (summed) when the stage's engine
runs on them, except Apple "metal" GPUs, whose memory is the unified RAM (ram_available, never
both); otherwise its ram_available.
"""

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass

from shoal.errors import BadRequest
from shoal.placement.shape import layer_shape, model_params, sparse_layers
from shoal.types.model_card import HubWeights, ModelCard
from shoal.types.profile import GpuInfo, NodeProfile
from shoal.types.weights import Quant

MIB = 1 << 20
GIB = 1 << 30
HEADROOM_FRACTION = 0.10
HEADROOM_FIXED = 256 * MIB
DEFAULT_DTYPE_BYTES = 4  # the torch engine's float32
DEFAULT_CONTEXT = 4096  # tokens of KV cache planned when the caller names none
GPU_ENGINES = frozenset({"torch", "mlx", "llamacpp"})  # engines that run on a node's GPUs
# engines placed per CUDA GPU, a stage's last layers spilling to the CPU (placement/plans.py)
SLOT_ENGINES = frozenset({"torch", "llamacpp"})
# engines that hold weights in the card's quant
FORMAT_ENGINES = frozenset({"torch", "numpy", "native"})
# Bits per weight of the engines' block formats: Q8_0 (34 bytes per 32) and Q4_1 (20 per 32).
_QUANT_BITS: dict[Quant, float] = {"fp16": 16.0, "int8": 8.5, "int4": 5.0}
HEAD_BLOCK_BITS = 8.5  # the head under int8/int4 in the block kernels, and llama.cpp's floor
MLX_Q8_BITS = 9.0  # MLX 5-8 bit weights as 8-bit blocks with a minimum: 36 bytes per 32

# Bits per weight of each GGUF tensor type, its block scales included (block bytes * 8 / weights).
GGUF_BITS: dict[str, float] = {
    "f32": 32.0, "f16": 16.0, "bf16": 16.0,
    "q4_0": 4.5, "q4_1": 5.0, "q5_0": 5.5, "q5_1": 6.0, "q8_0": 8.5, "q8_1": 9.0,
    "q2_k": 2.625, "q3_k": 3.4375, "q4_k": 4.5, "q5_k": 5.5, "q6_k": 6.5625, "q8_k": 9.125,
    "iq4_nl": 4.5, "iq4_xs": 4.25,
}  # fmt: skip
# A GGUF file named after a llama.cpp mix holds several types: the average over a Llama-shaped
# model's tensors (as llama.cpp's quantize reports for Llama 3.1 8B; the mix varies a little).
GGUF_MIX_BITS: dict[str, float] = {
    "q2_k": 3.16, "q3_k_s": 3.64, "q3_k_m": 4.00, "q3_k_l": 4.22,
    "q4_k_s": 4.67, "q4_k_m": 4.89, "q5_k_s": 5.57, "q5_k_m": 5.70,
}  # fmt: skip
# Other labels cards use for a whole file.
_BITS: dict[str, float] = {
    "fp32": 32.0, "float32": 32.0, "fp16": 16.0, "float16": 16.0, "bfloat16": 16.0,
    "fp8": 8.0, "f8": 8.0,
    "int4": 4.5,  # compressed-tensors int4, an f16/bf16 scale per 32 weights
}  # fmt: skip
UNKNOWN_BITS = 16.0
MLX_GROUP = 64  # mlx-lm's default group size: one f16 scale and one f16 bias per 64 weights


def bits_per_weight(quantization: str) -> float:
    """Stored bits per weight for a label ("4bit", "Q4_K_M", "bf16"); unknown labels count 16."""
    label = quantization.strip().lower().replace("-", "_")
    for table in (GGUF_MIX_BITS, GGUF_BITS, _BITS):
        if label in table:
            return table[label]
    match = re.fullmatch(r"(\d+)_?bits?", label)  # mlx "4bit": 32 bits of scales per group
    if match:
        bits = int(match[1])
        return float(bits) if bits >= 16 else bits + 32 / MLX_GROUP
    return UNKNOWN_BITS


@dataclass(frozen=True)
class Held:
    """Bits per weight an engine holds for the projections, the head and the embedding table."""

    layer: float
    head: float
    embed: float


def gguf_quantization(card: ModelCard) -> str | None:
    """The format of the GGUF file llama.cpp would load for the card (its first GGUF source)."""
    for where in card.weights:
        if where.format == "gguf":
            own = where.quantization if isinstance(where, HubWeights) else None
            return own or card.quantization
    return None


def mlx_packed_bits(card: ModelCard) -> int | None:
    """The bits of the MLX-quantized weights the torch and numpy engines load for the card
    (its first source they read), or None when those are not MLX-packed."""
    for where in card.weights:
        if where.format == "gguf":
            continue  # llama.cpp's; the others take the next source
        label = (where.quantization if isinstance(where, HubWeights) else None) or ""
        label = label or (card.quantization if where.format == "mlx" else "")
        match = re.fullmatch(r"(\d+)_?bits?", label.strip().lower())
        if where.format != "mlx" or match is None or int(match[1]) >= 16:
            return None
        return int(match[1])
    return None


def held_bits(card: ModelCard, engine: str | None, dtype_bytes: int) -> Held:
    """Bits per weight `engine` (None: torch) holds the card's weights in."""
    dense = 8.0 * dtype_bytes
    if engine == "llamacpp" and (label := gguf_quantization(card)) is not None:
        bits = bits_per_weight(label)
        return Held(bits, max(bits, HEAD_BLOCK_BITS), bits)
    if engine is not None and engine not in FORMAT_ENGINES:
        return Held(dense, dense, dense)  # mlx (and llama.cpp without a GGUF): the dtype
    quant = card.quant
    if engine in ("numpy", "native") and quant == "fp16":
        quant = "none"  # numpy has no half-precision matmul
    layer = _QUANT_BITS.get(quant, dense)
    packed = mlx_packed_bits(card)
    if packed is not None and engine in ("numpy", "native") and quant in ("int8", "int4"):
        # MLX-packed weights keep their own format in the block kernels, whatever the quant:
        # Q4_1 blocks for up to 4 bits, 8-bit blocks with minimums (9 bits) above; the head
        # too, and the embedding table stays packed at the file's bits
        blocks = _QUANT_BITS["int4"] if packed <= 4 else MLX_Q8_BITS
        return Held(blocks, blocks, packed + 32 / MLX_GROUP)
    if quant not in ("int8", "int4"):
        return Held(layer, layer, dense)
    if packed is not None:  # torch on a CPU hands them to the same blocks (the safe side)
        layer = max(layer, _QUANT_BITS["int4"] if packed <= 4 else MLX_Q8_BITS)
    # torch on CUDA keeps an int4 model's head fp16; the block kernels hold it 8-bit
    head = 16.0 if quant == "int4" and engine in (None, "torch") else HEAD_BLOCK_BITS
    return Held(layer, head, dense)


def held_bytes(card: ModelCard, engine: str | None, dtype_bytes: int) -> tuple[float, float]:
    """Bytes per weight an engine (None: torch) holds for projections and head."""
    held = held_bits(card, engine, dtype_bytes)
    return held.layer / 8, held.head / 8


@dataclass(frozen=True)
class MemoryModel:
    """Resident bytes of a model's parts in one engine's formats, for one planned context."""

    n_layers: int
    layer_bytes: int  # weights of one transformer layer (with experts: one that has them)
    kv_layer_bytes: int  # KV cache of one layer for the whole context and all sequences
    embed_bytes: int
    head_bytes: int
    dtype_bytes: int  # activations and KV cache
    context: int
    sequences: int
    weight_bytes: float = 4.0  # bytes per projection weight as held
    dense_layers: int = 0  # the first layers, each `dense_layer_bytes` instead of layer_bytes
    dense_layer_bytes: int = 0
    active_layer_bytes: int | None = None  # bytes a token reads per layer (mean); None: all

    @property
    def per_layer(self) -> int:
        """Bytes the largest layer costs a stage: its weights plus its KV cache."""
        return max(self.layer_bytes, self.dense_layer_bytes) + self.kv_layer_bytes

    @property
    def read_per_layer(self) -> int:
        """Weight bytes one decoded token reads per layer, on average over the layers."""
        return self.layer_bytes if self.active_layer_bytes is None else self.active_layer_bytes

    @property
    def params_per_layer(self) -> float:
        """Weights one decoded token multiplies per layer, on average over the layers."""
        return self.read_per_layer / self.weight_bytes

    def stage_bytes(self, start: int, end: int) -> int:
        """Bytes a stage holding layers [start, end) needs, with embeddings/head at the ends."""
        first = self.embed_bytes if start == 0 else 0
        last = self.head_bytes if end == self.n_layers else 0
        dense = max(0, min(end, self.dense_layers) - start)
        weights = dense * self.dense_layer_bytes + (end - start - dense) * self.layer_bytes
        return weights + (end - start) * self.kv_layer_bytes + first + last

    def total_bytes(self) -> int:
        """Bytes the whole model needs on one node."""
        return self.stage_bytes(0, self.n_layers)

    def kv_bytes(self) -> int:
        """KV cache bytes of the whole model."""
        return self.n_layers * self.kv_layer_bytes

    def max_layers(self, capacity: int, *, first: bool, last: bool) -> int:
        """The most layers a stage fits in `capacity` bytes, holding embeddings/head as told.
        A first stage begins with the dense layers; any other is sized by the largest layer."""
        room = capacity - (self.embed_bytes if first else 0) - (self.head_bytes if last else 0)
        if room < 0:
            return 0
        if not first or not self.dense_layers:
            return min(self.n_layers, room // self.per_layer)
        dense = self.dense_layer_bytes + self.kv_layer_bytes
        if room < self.dense_layers * dense:
            return room // dense
        room -= self.dense_layers * dense
        return min(
            self.n_layers, self.dense_layers + room // (self.layer_bytes + self.kv_layer_bytes)
        )


def memory_model(
    card: ModelCard,
    *,
    context: int | None = None,
    sequences: int = 1,
    dtype_bytes: int = DEFAULT_DTYPE_BYTES,
    engine: str | None = None,
) -> MemoryModel:
    """The memory model of `card` on `engine` (None: torch's), activations and KV cache at
    `dtype_bytes`, with KV cache for context × sequences."""
    tokens = default_context(card) if context is None else context
    if tokens < 1 or sequences < 1 or dtype_bytes < 1:
        raise BadRequest("context, sequences and dtype_bytes must be at least 1", param="context")
    bits = bits_per_weight(card.quantization)
    held = held_bits(card, engine, dtype_bytes)
    embed_params = card.vocab_size * card.hidden_size
    layers_storage = max(card.storage_bytes - embed_params * bits / 8, 0.0)
    to_held = held.layer / bits  # the file's bytes as the engine holds them
    layer = dense = active = layers_storage / card.layers
    if card.moe:  # the file's layer bytes split by the weights each layer has
        shape, (weights, token) = layer_shape(card), model_params(card)
        per_weight = layers_storage / weights
        layer, dense = shape.sparse * per_weight, shape.dense * per_weight
        active = token * per_weight / card.layers
    return MemoryModel(
        n_layers=card.layers,
        layer_bytes=math.ceil(layer * to_held),
        kv_layer_bytes=card.kv_values_per_token * dtype_bytes * tokens * sequences,
        embed_bytes=math.ceil(embed_params * held.embed / 8),
        head_bytes=math.ceil(embed_params * held.head / 8),
        dtype_bytes=dtype_bytes,
        context=tokens,
        sequences=sequences,
        weight_bytes=held.layer / 8,
        dense_layers=card.layers - sparse_layers(card) if card.moe else 0,
        dense_layer_bytes=math.ceil(dense * to_held) if card.moe else 0,
        active_layer_bytes=math.ceil(active * to_held) if card.moe else None,
    )


def default_context(card: ModelCard) -> int:
    """Tokens of KV cache planned when the caller names none: the card's, at most 4096."""
    return min(card.context_length, DEFAULT_CONTEXT)


# --- what a node offers ---------------------------------------------------------------------------


def usable_memory(profile: NodeProfile, engine: str) -> int:
    """Bytes free for `engine` on this node: its GPUs' free memory if it runs on them, else RAM."""
    if engine not in GPU_ENGINES or not profile.gpus:
        return profile.ram_available
    if any(gpu.backend == "metal" for gpu in profile.gpus):
        return profile.ram_available  # unified memory: the GPU's share is RAM
    return sum(gpu.memory_free for gpu in profile.gpus)


def cuda_gpus(profile: NodeProfile) -> tuple[GpuInfo, ...]:
    """The node's CUDA GPUs (not Apple's unified memory), by index."""
    return tuple(sorted((g for g in profile.gpus if g.backend == "cuda"), key=lambda g: g.index))


def spill_memory(profile: NodeProfile, engine: str) -> int:
    """Bytes of RAM a node adds for `engine` behind its CUDA GPUs (a stage's last layers on the
    CPU); 0 where the engine's memory is the RAM already."""
    if engine in SLOT_ENGINES and cuda_gpus(profile):
        return profile.ram_available
    return 0


def need_per_engine(
    card: ModelCard, engines: Iterable[str], *, context: int | None = None
) -> dict[str, int]:
    """Bytes the whole model needs on each engine, KV cache for the planned context included."""
    return {e: memory_model(card, engine=e, context=context).total_bytes() for e in engines}


def offered_per_engine(profiles: Iterable[NodeProfile], engines: Iterable[str]) -> dict[str, int]:
    """Bytes the nodes offer each engine after headroom: summed over the nodes that run it (a
    pipeline splits the model), but the largest one alone for llama.cpp (whole models only)."""
    offered: dict[str, int] = {}
    for engine in engines:
        room = [
            capacity(usable_memory(p, engine)) + capacity(spill_memory(p, engine))
            for p in profiles
            if engine in p.engines
        ]
        offered[engine] = max(room, default=0) if engine == "llamacpp" else sum(room)
    return offered


def headroom(usable: int) -> int:
    """Bytes left unplanned on a node with `usable` bytes: 10 % plus 256 MiB."""
    return int(usable * HEADROOM_FRACTION) + HEADROOM_FIXED


def capacity(usable: int) -> int:
    """Bytes a plan may use on a node with `usable` bytes free."""
    return max(0, usable - headroom(usable))


def fmt_bytes(n_bytes: float) -> str:
    """`n_bytes` for people: "38.1 GiB", or "742 MiB" under one GiB."""
    if abs(n_bytes) < GIB:
        return f"{n_bytes / MIB:.0f} MiB"
    return f"{n_bytes / GIB:.1f} GiB"
