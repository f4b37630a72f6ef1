"""MlxEngine: runs one shard of any model mlx-lm's files run here (model.py: the Llama family,
granite, phi3, qwen3_moe, deepseek_v3) with MLX (Metal on Apple Silicon, or CPU)."""

import logging
from collections.abc import Sequence

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import KVCache

from shoal.engines.base import ProgressFn, StepInput, WeightSource, check_batch
from shoal.engines.mlx.model import ShardModel
from shoal.engines.packed import dense
from shoal.errors import BadRequest
from shoal.types.ids import RequestId
from shoal.types.shard import Shard

log = logging.getLogger(__name__)

DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


class MlxEngine:
    """The Engine protocol over mlx-lm's model files; weights in `dtype`, I/O in float32."""

    name = "mlx"

    def __init__(self, dtype: str = "float32") -> None:
        if dtype not in DTYPES:
            raise BadRequest(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}", param="dtype")
        self.dtype = DTYPES[dtype]
        self._model: ShardModel | None = None
        # One mlx-lm KVCache per layer of the shard, per request.
        self._caches: dict[RequestId, list[KVCache]] = {}

    def load(self, shard: Shard, source: WeightSource, progress: ProgressFn | None = None) -> None:
        """Build the shard's modules, then fill them from source, strictly."""
        model = ShardModel(source.config, shard)
        # MLX-packed tensors as the float32 values they stand for (mx.dequantize's, exactly);
        # experts come one by one or stacked, and the model's sanitize takes either
        tensors = {name: dense(t) for name, t in source.tensors(shard).items()}
        model.load(tensors, self.dtype, progress)
        self._model = model
        self._caches.clear()
        log.info("loaded %s on %s (%s)", shard, mx.default_device(), self.dtype)

    def forward(self, batch: Sequence[StepInput], *, all_logits: bool = False) -> list[np.ndarray]:
        """Run each item after its cached prefix; the items are computed together, lazily."""
        model = self._loaded()
        self._check(batch)
        squeeze = model.shard.is_last and not all_logits  # logits [vocab] of the last position
        # Each item runs alone, as mlx-lm's KVCache holds one sequence; building every graph
        # before one mx.eval lets MLX schedule the whole batch at once.
        offsets = {item.request_id: self.cache_length(item.request_id) for item in batch}
        try:
            outs = [self._graph(model, item, all_logits) for item in batch]  # [T or 1, width]
            mx.eval(outs, [c.state for item in batch for c in self._caches[item.request_id]])
        except BaseException:
            self._rewind(offsets)
            raise
        return [np.array(out[-1] if squeeze else out) for out in outs]

    def free(self, request_id: RequestId) -> None:
        """Drop the request's cache; unknown ids are ignored."""
        self._caches.pop(request_id, None)

    def set_threads(self, threads: int) -> None:
        """Nothing to set: MLX chooses its own (Metal on a Mac, its CPU backend elsewhere)."""

    def close(self) -> None:
        """Release every cache and the weights."""
        self._model = None
        self._caches.clear()
        mx.clear_cache()

    def cache_length(self, request_id: RequestId) -> int:
        """Positions cached for the request (0 if none)."""
        caches = self._caches.get(request_id)
        return int(caches[0].offset) if caches else 0

    def cached_positions(self) -> int:
        """Positions the caches of every request hold together."""
        return sum(int(c[0].offset) for c in list(self._caches.values()) if c)

    def truncate(self, request_id: RequestId, length: int) -> None:
        """mlx-lm's caches trim from the end."""
        caches = self._caches.get(request_id)
        held = int(caches[0].offset) if caches else 0
        if held < length:
            raise ValueError(f"cannot keep {length} positions of {request_id}: it holds {held}")
        for cache in caches or []:
            cache.trim(held - length)

    def fork(self, source: RequestId, target: RequestId, length: int) -> None:
        """Not for mlx-lm's caches: ValueError (the choice is prefilled on its own instead)."""
        raise ValueError("the mlx engine cannot copy a request's cache")

    def _loaded(self) -> ShardModel:
        if self._model is None:
            raise RuntimeError("MlxEngine.forward before load()")
        return self._model

    def _check(self, batch: Sequence[StepInput]) -> None:
        """Refuse a batch that cannot run, before any cache changes."""
        model = self._loaded()
        check_batch(
            batch,
            self.cache_length,
            first=model.shard.is_first,
            hidden_size=model.args.hidden_size,
            vocab_size=model.args.vocab_size,
        )

    def _graph(self, model: ShardModel, item: StepInput, all_logits: bool) -> mx.array:
        """The item's output [T or 1, width] in float32, not yet computed; appends to its cache."""
        caches = self._caches.get(item.request_id)
        if caches is None:
            caches = self._caches[item.request_id] = model.make_cache()
        if model.shard.is_first:
            x = mx.array(item.data.astype(np.int32))[None]  # [1, T]
        else:
            x = mx.array(item.data.astype(np.float32)).astype(self.dtype)[None]  # [1, T, hidden]
        return model(x, caches, all_logits=all_logits)[0].astype(mx.float32)

    def _rewind(self, offsets: dict[RequestId, int]) -> None:
        """Undo a failed step: caches back to their lengths before it, new ones dropped."""
        # KVCache keeps everything before `offset` intact, so moving it back is a full undo.
        for rid, offset in offsets.items():
            if offset == 0:
                self._caches.pop(rid, None)
            else:
                for cache in self._caches[rid]:
                    cache.offset = offset
