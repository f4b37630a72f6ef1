"""The native CPU path: GGUF's block formats and a whole forward pass, compiled for this machine.

- build.py: compiles blocks.c and forward.c at first use (-march=native) and caches the library.
- abi.py: the C structs and function signatures as ctypes sees them.
- blocks.py: `BlockWeights`, a [n, k] matrix in Q8_0 ("q8") or Q4_1 ("q4") blocks, and its product;
  `blocks_of` turns MLX-packed weights into blocks exactly.
- decoder.py: `Decoder`, every layer of a shard over a batch of rows in one call (qwen3_moe's
  routed experts too: `RoutedExperts`).
- model.py: `Model`, a shard on blocks (embedding, decoder, final norm, 8-bit head), built from
  the shard's tensors.
- engine.py: `NativeEngine`, the Engine protocol over model.py; the torch and numpy engines hand
  int8/int4 shards on the CPU to it.

The engines import this package without compiling anything; `library()` compiles on first call.
"""

from shoal.engines.native.abi import Library
from shoal.engines.native.blocks import (
    BLOCK,
    LANES,
    BlockWeights,
    Kind,
    blocks_of,
    stacked_blocks,
)
from shoal.engines.native.build import library
from shoal.engines.native.decoder import Decoder, DecoderLayer, RoutedExperts

__all__ = [
    "BLOCK",
    "LANES",
    "BlockWeights",
    "Decoder",
    "DecoderLayer",
    "Kind",
    "Library",
    "RoutedExperts",
    "blocks_of",
    "library",
    "stacked_blocks",
]
