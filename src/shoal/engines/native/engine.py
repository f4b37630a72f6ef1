"""NativeEngine: one shard of a Llama-family model (qwen3_moe's routed experts too) in block
formats on the CPU, in native code.

The torch and numpy engines hand an int8 or int4 shard on the CPU to this engine where the kernels
compile (`runs`), so whichever of the two a node runs, a block-format CPU shard runs here.
"""

import logging
import os
from collections.abc import Callable, Sequence
from typing import cast

import numpy as np

from shoal.engines.adapt import adapt
from shoal.engines.args import ModelArgs, longrope_context
from shoal.engines.base import ProgressFn, StepInput, WeightSource, check_batch
from shoal.engines.cache import CacheStore
from shoal.engines.native.build import library
from shoal.engines.native.decoder import Decoder
from shoal.engines.native.model import Blocks, Model, supports
from shoal.engines.numpy.llama import rope_frequencies
from shoal.engines.numpy.models import model_args
from shoal.errors import BadRequest, UnsupportedModel
from shoal.types.ids import RequestId
from shoal.types.shard import Shard
from shoal.types.weights import Quant

log = logging.getLogger(__name__)

KINDS = {"int8": "q8", "int4": "q4"}  # the card's quant → the layers' block format
# inverse rotary frequencies [head_dim / 2], float32 (LongRoPE: the long ones if asked)
Rope = Callable[[ModelArgs, bool], np.ndarray]


def runs(quant: str, args: ModelArgs) -> bool:
    """Whether this engine runs a model of `args` in `quant` here: block formats, whole blocks,
    and kernels that compiled."""
    return quant in KINDS and supports(args) and library() is not None


def _zeros(shape: tuple[int, int, int, int]) -> np.ndarray:
    return np.zeros(shape, Decoder.CACHE_DTYPE)


class NativeEngine:
    """The Engine protocol over native/model.py; I/O in float32, KV cache in fp16.

    quant: int8 (Q8_0 blocks) or int4 (Q4_1 blocks); the head is Q8_0 under both. threads: the
    kernels' OpenMP threads (default: every CPU). rope: the inverse rotary frequencies, so an
    engine that hands its shards here keeps its own (default: numpy's).
    """

    name = "native"

    def __init__(
        self, quant: str = "int4", threads: int | None = None, rope: Rope | None = None
    ) -> None:
        if quant not in KINDS:
            raise BadRequest(f"native quant {quant!r} is not one of int8, int4", param="quant")
        self.quant = cast(Quant, quant)
        self.threads = max(1, threads or os.cpu_count() or 1)
        self._rope = rope or rope_frequencies
        self._model: Model | None = None
        self._caches: CacheStore[np.ndarray] | None = None

    def load(self, shard: Shard, source: WeightSource, progress: ProgressFn | None = None) -> None:
        """Take the shard's tensors into blocks, one layer at a time."""
        args = model_args(source.config, shard)  # refuse an unknown model before reading it
        lib = library()
        if lib is None:
            raise UnsupportedModel("the native kernels did not compile on this machine")
        if not supports(args):
            raise UnsupportedModel(f"{args.model_type}: widths not in blocks of 32, or heads")
        blocks = Blocks(lib, "q8" if self.quant == "int8" else "q4", self.threads)
        inv_freq = self._rope(args, False)
        long = self._rope(args, True) if longrope_context(args) is not None else None
        tensors = adapt(source.config, source.tensors(shard), blocks=True)  # granite, phi3
        self._model = Model(args, shard, tensors, blocks, inv_freq, progress, long)
        self._caches = CacheStore(
            shard.end - shard.start, args.num_key_value_heads, args.head_dim, _zeros
        )
        log.info("loaded %s on native (%s blocks, %d threads)", shard, blocks.kind, self.threads)

    def set_threads(self, threads: int) -> None:
        """The kernels' OpenMP threads from the next call on (each call names its count)."""
        self.threads = max(1, threads)
        if self._model is not None:
            self._model.threads = self.threads

    def forward(self, batch: Sequence[StepInput], *, all_logits: bool = False) -> list[np.ndarray]:
        """Run every item after its cached prefix, all their rows in one native pass."""
        model, caches = self._loaded()
        check_batch(
            batch,
            caches.length,
            first=model.shard.is_first,
            hidden_size=model.args.hidden_size,
            vocab_size=model.args.vocab_size,
        )
        if not batch:
            return []
        first = model.shard.is_first
        lengths = [item.length for item in batch]
        offsets = np.cumsum([0, *lengths])  # [items + 1]
        x = np.concatenate([item.data.astype(np.int64 if first else np.float32) for item in batch])
        item = np.repeat(np.arange(len(batch), dtype=np.int64), lengths)  # [N]
        positions = np.concatenate(
            [np.arange(i.start, i.start + i.length, dtype=np.int64) for i in batch]
        )  # [N]
        kv = [caches.get(i.request_id) for i in batch]
        for cache, t in zip(kv, lengths, strict=True):
            cache.reserve(cache.length + t)
        addresses = (
            np.array([c.k.ctypes.data for c in kv], np.uint64),
            np.array([c.v.ctypes.data for c in kv], np.uint64),
            np.array([c.capacity for c in kv], np.int64),
        )
        last = None if all_logits or not model.shard.is_last else offsets[1:] - 1
        out = model(x, item, positions, addresses, last)  # [N or items, width]
        for cache, t in zip(kv, lengths, strict=True):
            cache.advance(t)
        if last is not None:
            return list(out)  # logits [vocab] of each item's last position
        return [out[a:b] for a, b in zip(offsets[:-1], offsets[1:], strict=True)]

    def free(self, request_id: RequestId) -> None:
        """Drop the request's cache; unknown ids are ignored."""
        if self._caches is not None:
            self._caches.free(request_id)

    def close(self) -> None:
        """Release every cache and the weights."""
        self._model = None
        self._caches = None

    def cache_length(self, request_id: RequestId) -> int:
        """Positions cached for the request (0 if none)."""
        return self._caches.length(request_id) if self._caches is not None else 0

    def cached_positions(self) -> int:
        """Positions the caches of every request hold together."""
        return self._caches.positions if self._caches is not None else 0

    def fork(self, source: RequestId, target: RequestId, length: int) -> None:
        """target's cache := source's first `length` positions (n choices of one prompt share its
        prefill); ValueError if source holds fewer."""
        self._loaded()[1].fork(source, target, length)

    def truncate(self, request_id: RequestId, length: int) -> None:
        """Keep only the first `length` positions of the request's cache (what a speculative
        step wrote past its accepted tokens goes); ValueError if it holds fewer."""
        self._loaded()[1].truncate(request_id, length)

    def _loaded(self) -> tuple[Model, CacheStore[np.ndarray]]:
        if self._model is None or self._caches is None:
            raise RuntimeError("NativeEngine.forward before load()")
        return self._model, self._caches
