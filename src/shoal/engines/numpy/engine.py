"""NumpyEngine: runs one shard of a Llama-family model with numpy only, on any CPU."""

import contextlib
import logging
from collections.abc import Iterator, Sequence
from typing import Any, cast

import numpy as np
from threadpoolctl import ThreadpoolController

from shoal.engines.adapt import adapt
from shoal.engines.base import ProgressFn, StepInput, WeightSource, check_batch
from shoal.engines.cache import CacheStore, cache_dims
from shoal.engines.native import engine as native
from shoal.engines.numpy.llama import Context, Formats, Model
from shoal.engines.numpy.models import build_model, model_args
from shoal.errors import BadRequest
from shoal.types.ids import RequestId
from shoal.types.shard import Shard
from shoal.types.weights import QUANTS, Quant

log = logging.getLogger(__name__)

# numpy has no fast half-precision matmul, so float32 is the only choice; the option exists so
# that `create_engine(name, dtype=...)` means the same for every engine.
DTYPES = {"float32": np.float32}


class NumpyEngine:
    """The Engine protocol over the numpy model files; I/O in float32.

    quant int8 or int4: the shard runs on the native engine (native/engine.py: block weights,
    fp16 KV cache, one native call a pass) where its kernels compile, and this engine passes every
    call through; none and fp16 (numpy has no fast half-precision matmul) keep float32 weights
    and cache in llama.py. threads: the block kernels' threads (default: every CPU).
    """

    name = "numpy"

    def __init__(
        self, dtype: str = "float32", quant: str = "none", threads: int | None = None
    ) -> None:
        if dtype not in DTYPES:
            raise BadRequest(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}", param="dtype")
        if quant not in QUANTS:
            raise BadRequest(f"quant {quant!r} is not one of {', '.join(QUANTS)}", param="quant")
        self.dtype = DTYPES[dtype]
        self.quant = cast(Quant, quant)
        self.threads = threads
        self._blas: ThreadpoolController | None = None  # held to one thread around native calls
        self._blas_limit: Any = None  # set_threads' limit on BLAS (threadpoolctl's), while held
        self._model: Model | None = None
        self._caches: CacheStore[np.ndarray] | None = None
        self._native: native.NativeEngine | None = None  # the int8/int4 shard, where it runs

    def load(self, shard: Shard, source: WeightSource, progress: ProgressFn | None = None) -> None:
        """Build the shard's modules from exactly its tensors, transposed once for `x @ W`."""
        args = model_args(source.config, shard)  # refuse an unknown model before reading it
        if native.runs(self.quant, args):
            self._native = native.NativeEngine(self.quant, self.threads)
            self._native.load(shard, source, progress)
            return
        formats = Formats.of(self.quant, self.threads)
        # granite, phi3 as llama (scales rounded for blocks where the projections are blocks)
        tensors = adapt(source.config, source.tensors(shard), blocks=formats.lib is not None)
        self._model = build_model(args, shard, tensors, progress, formats)
        dims = cache_dims(args)  # per key/value head, or deepseek_v3's latent
        dtype = self.dtype
        self._caches = CacheStore(
            shard.end - shard.start,
            dims.heads,
            dims.key_dim,
            lambda shape: np.zeros(shape, dtype),
            value_dim=dims.value_dim,
        )
        if formats.lib is not None:
            # BLAS threads spin for a while after each call, on the cores the kernels' OpenMP
            # threads need: a 128-token prefill took 4x as long with both pools at 2 threads.
            self._blas = ThreadpoolController().select(user_api="blas")
        held = "float32" if formats.lib is None else f"{formats.kind} blocks"
        log.info("loaded %s on numpy (weights %s)", shard, held)

    def forward(self, batch: Sequence[StepInput], *, all_logits: bool = False) -> list[np.ndarray]:
        """Run every item after its cached prefix, all their rows in one pass."""
        if self._native is not None:
            return self._native.forward(batch, all_logits=all_logits)
        self._check(batch)
        with self._one_blas_thread():
            return self._pass(batch, all_logits)

    @contextlib.contextmanager
    def _one_blas_thread(self) -> Iterator[None]:
        if self._blas is None:
            yield
            return
        with self._blas.limit(limits=1):
            yield

    def _pass(self, batch: Sequence[StepInput], all_logits: bool) -> list[np.ndarray]:
        """One pass over checked items: their rows concatenated."""
        model, caches = self._loaded()
        if not batch:
            return []
        first = model.shard.is_first
        lengths = [item.length for item in batch]
        offsets = np.cumsum([0, *lengths])  # [items + 1]
        rows = [slice(int(a), int(b)) for a, b in zip(offsets[:-1], offsets[1:], strict=True)]
        data = [item.data.astype(np.int64 if first else np.float32) for item in batch]
        x = np.concatenate(data)  # [N] ids or [N, hidden]
        positions = np.concatenate(
            [np.arange(item.start, item.start + item.length) for item in batch]
        )  # [N]
        kv = [caches.get(item.request_id) for item in batch]
        for cache, t in zip(kv, lengths, strict=True):
            cache.reserve(cache.length + t)
        ctx = Context(kv, rows, [item.start for item in batch])
        out = model(x, positions, ctx, all_logits=all_logits)  # [N or items, width]
        for cache, t in zip(kv, lengths, strict=True):
            cache.advance(t)
        if model.shard.is_last and not all_logits:
            return list(out)  # logits [vocab] of each item's last position
        return [out[r] for r in rows]

    def free(self, request_id: RequestId) -> None:
        """Drop the request's cache; unknown ids are ignored."""
        if self._native is not None:
            self._native.free(request_id)
        if self._caches is not None:
            self._caches.free(request_id)

    def set_threads(self, threads: int) -> None:
        """The native kernels' threads where the shard runs there; otherwise BLAS's (the block
        projections of numpy's own path keep the count they were loaded with)."""
        self.threads = max(1, threads)
        if self._native is not None:
            self._native.set_threads(self.threads)
            return
        if self._blas_limit is not None:
            self._blas_limit.restore_original_limits()
        self._blas_limit = ThreadpoolController().limit(limits=self.threads, user_api="blas")

    def close(self) -> None:
        """Release every cache and the weights (and BLAS's threads, if set_threads limited them:
        the limit is the process's)."""
        if self._blas_limit is not None:
            self._blas_limit.restore_original_limits()
            self._blas_limit = None
        if self._native is not None:
            self._native.close()
        self._native = None
        self._model = None
        self._caches = None

    def cache_length(self, request_id: RequestId) -> int:
        """Positions cached for the request (0 if none)."""
        if self._native is not None:
            return self._native.cache_length(request_id)
        return self._caches.length(request_id) if self._caches is not None else 0

    def cached_positions(self) -> int:
        """Positions the caches of every request hold together."""
        if self._native is not None:
            return self._native.cached_positions()
        return self._caches.positions if self._caches is not None else 0

    def fork(self, source: RequestId, target: RequestId, length: int) -> None:
        """target's cache := source's first `length` positions (n choices of one prompt share its
        prefill); ValueError if source holds fewer."""
        if self._native is not None:
            self._native.fork(source, target, length)
            return
        self._loaded()[1].fork(source, target, length)

    def truncate(self, request_id: RequestId, length: int) -> None:
        """Keep only the first `length` positions of the request's cache (what a speculative
        step wrote past its accepted tokens goes); ValueError if it holds fewer."""
        if self._native is not None:
            self._native.truncate(request_id, length)
            return
        self._loaded()[1].truncate(request_id, length)

    def _loaded(self) -> tuple[Model, CacheStore[np.ndarray]]:
        if self._model is None or self._caches is None:
            raise RuntimeError("NumpyEngine.forward before load()")
        return self._model, self._caches

    def _check(self, batch: Sequence[StepInput]) -> None:
        """Refuse a batch that cannot run, before any cache changes."""
        model, caches = self._loaded()
        check_batch(
            batch,
            caches.length,
            first=model.shard.is_first,
            hidden_size=model.args.hidden_size,
            vocab_size=model.args.vocab_size,
        )
