"""The memory model: the bytes a pipeline stage of a model holds, and what a node offers.

The torch, numpy and native engines dequantize on load and hold a projection weight in the card's
`quant` (`weight_bytes`: none = the engine's dtype, fp16 = 2, int8 = 34/32 for Q8_0 blocks,
int4 = 20/32 for Q4_1 blocks; numpy has no fp16 and holds float32). llama.cpp and MLX keep the
file's format, but are still planned at `dtype_bytes` (the safe side, as before formats). So a
transformer layer costs its share of the file, scaled from the file's bits per weight to the
engine's:

    layer weights = (storage_bytes - embedding storage) / layers * 8 * weight_bytes / bits
    embeddings    = vocab * hidden * dtype_bytes, held by the first stage (a lookup table)
    head          = vocab * hidden * head bytes, held by the last stage (counted even when tied:
                    the engine holds its own copy on each stage that needs it); under int4 the
                    head is 8-bit on CPU and fp16 on CUDA, so it counts 2 bytes
    KV cache      = 2 * kv_heads * head_dim * dtype_bytes per layer per token, for `context`
                    tokens times `sequences` concurrent sequences
    headroom      = 10 % of the node's usable memory + 256 MiB, never planned into

Only one embedding is taken out of the file size, so a model with a separate head in the file is
slightly over-estimated per layer: the safe side. A node's usable memory is the free memory of its
GPUs (summed) when the stage's engine runs on them, except Apple "metal" GPUs, whose memory is the
unified RAM (ram_available, never both); otherwise its ram_available.
"""

import math
import re
from dataclasses import dataclass

from shoal.errors import BadRequest
from shoal.types.model_card import ModelCard
from shoal.types.profile import NodeProfile
from shoal.types.weights import Quant

MIB = 1 << 20
GIB = 1 << 30
HEADROOM_FRACTION = 0.10
HEADROOM_FIXED = 256 * MIB
DEFAULT_DTYPE_BYTES = 4  # the torch engine's float32
DEFAULT_CONTEXT = 4096  # tokens of KV cache planned when the caller names none
GPU_ENGINES = frozenset({"torch", "mlx", "llamacpp"})  # engines that run on a node's GPUs
# engines that hold weights in the card's quant
FORMAT_ENGINES = frozenset({"torch", "numpy", "native"})
_QUANT_BYTES: dict[Quant, float] = {"fp16": 2.0, "int8": 34 / 32, "int4": 20 / 32}

# Bits per weight of each quantization label, block scales included (lower case, "-" → "_").
_BITS: dict[str, float] = {
    "fp32": 32.0, "f32": 32.0, "float32": 32.0,
    "fp16": 16.0, "f16": 16.0, "bf16": 16.0, "float16": 16.0, "bfloat16": 16.0,
    "fp8": 8.0, "f8": 8.0,
    "q4_0": 4.5, "q4_1": 5.0, "q4_k": 4.8, "q4_k_m": 4.8, "q4_k_s": 4.6,
    "q5_0": 5.5, "q5_1": 6.0, "q5_k": 5.7, "q5_k_m": 5.7, "q5_k_s": 5.5,
    "q6_k": 6.6, "q8_0": 8.5,
}  # fmt: skip
UNKNOWN_BITS = 16.0


def bits_per_weight(quantization: str) -> float:
    """Stored bits per weight for a label ("4bit", "Q4_K_M", "bf16"); unknown labels count 16."""
    label = quantization.strip().lower().replace("-", "_")
    if label in _BITS:
        return _BITS[label]
    match = re.fullmatch(r"(\d+)_?bits?", label)  # mlx "4bit": group scales add ~0.5 bit
    if match:
        bits = int(match[1])
        return float(bits) if bits >= 16 else bits + 0.5
    return UNKNOWN_BITS


def held_bytes(card: ModelCard, engine: str | None, dtype_bytes: int) -> tuple[float, float]:
    """Bytes per weight an engine (None: torch) holds for projections and head."""
    if engine is not None and engine not in FORMAT_ENGINES:
        return float(dtype_bytes), float(dtype_bytes)
    quant = card.quant
    if engine == "numpy" and quant == "fp16":
        quant = "none"  # numpy has no half-precision matmul
    weight = _QUANT_BYTES.get(quant, float(dtype_bytes))
    return weight, (2.0 if quant == "int4" else weight)


@dataclass(frozen=True)
class MemoryModel:
    """Resident bytes of a model's parts in one engine's formats, for one planned context."""

    n_layers: int
    layer_bytes: int  # weights of one transformer layer
    kv_layer_bytes: int  # KV cache of one layer for the whole context and all sequences
    embed_bytes: int
    head_bytes: int
    dtype_bytes: int  # activations and KV cache
    context: int
    sequences: int
    weight_bytes: float = 4.0  # bytes per projection weight as held

    @property
    def per_layer(self) -> int:
        """Bytes one more layer costs a stage: its weights plus its KV cache."""
        return self.layer_bytes + self.kv_layer_bytes

    @property
    def params_per_layer(self) -> float:
        """Weights in one layer."""
        return self.layer_bytes / self.weight_bytes

    def stage_bytes(self, start: int, end: int) -> int:
        """Bytes a stage holding layers [start, end) needs, with embeddings/head at the ends."""
        first = self.embed_bytes if start == 0 else 0
        last = self.head_bytes if end == self.n_layers else 0
        return (end - start) * self.per_layer + first + last

    def total_bytes(self) -> int:
        """Bytes the whole model needs on one node."""
        return self.stage_bytes(0, self.n_layers)

    def kv_bytes(self) -> int:
        """KV cache bytes of the whole model."""
        return self.n_layers * self.kv_layer_bytes

    def max_layers(self, capacity: int, *, first: bool, last: bool) -> int:
        """The most layers a stage fits in `capacity` bytes, holding embeddings/head as told."""
        room = capacity - (self.embed_bytes if first else 0) - (self.head_bytes if last else 0)
        return 0 if room < 0 else min(self.n_layers, room // self.per_layer)


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
    weight, head = held_bytes(card, engine, dtype_bytes)
    embed_params = card.vocab_size * card.hidden_size
    layer_storage = max(card.storage_bytes - embed_params * bits / 8, 0.0) / card.layers
    return MemoryModel(
        n_layers=card.layers,
        layer_bytes=math.ceil(layer_storage * 8 * weight / bits),
        kv_layer_bytes=2 * card.kv_heads * card.head_dim * dtype_bytes * tokens * sequences,
        embed_bytes=embed_params * dtype_bytes,
        head_bytes=math.ceil(embed_params * head),
        dtype_bytes=dtype_bytes,
        context=tokens,
        sequences=sequences,
        weight_bytes=weight,
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
