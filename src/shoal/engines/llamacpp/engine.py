"""LlamaCppEngine: a whole GGUF model run by llama.cpp through llama-cpp-python's C API.

llama.cpp reads the GGUF file itself (quantized weights stay quantized), so this engine runs
whole models only: it cannot take or hand over hidden states, and placement never gives it a
partial layer range. All requests share ONE llama context. Each request gets its own sequence
id in that context's KV cache (a pool of `n_seq_max` ids); `forward` appends its tokens at its
positions under that id, and `free` removes the sequence with `llama_memory_seq_rm`. The cache
is unified: its `n_ctx` cells are one budget shared by every live request, and any one request
may use all of it. (The high-level `llama_cpp.Llama` keeps a single sequence per object, so it
would need a context, and a KV cache of n_ctx, per request.)

`pip install llama-cpp-python` compiles llama.cpp for the CPU. For a GPU, compile it with the
backend on (add `--force-reinstall --no-cache-dir` to replace a CPU build) and pass n_gpu_layers
(-1 = every layer):

    CMAKE_ARGS="-DGGML_CUDA=on" pip install llama-cpp-python    # NVIDIA (needs the CUDA toolkit)
    CMAKE_ARGS="-DGGML_METAL=on" pip install llama-cpp-python   # Apple Silicon (on by default)
"""

import ctypes
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

import llama_cpp
import numpy as np

from shoal.engines.base import ProgressFn, StepInput, WeightSource, check_batch
from shoal.errors import ContextOverflow, ModelUnavailable, UnsupportedModel
from shoal.types.ids import RequestId
from shoal.types.shard import Shard

log = logging.getLogger(__name__)
native_log = logging.getLogger(__name__ + ".native")  # llama.cpp's own messages

WHOLE_GGUF_ONLY = "the llamacpp engine runs whole GGUF models only"
UBATCH = 512  # tokens per physical step inside llama_decode

# ggml_log_level → logging level; llama.cpp's INFO is chatty (every tensor), so it goes to DEBUG.
_LOG_LEVELS = {1: logging.DEBUG, 2: logging.DEBUG, 3: logging.WARNING, 4: logging.ERROR}


@llama_cpp.llama_log_callback
def _route_log(level: int, text: bytes, _user_data: ctypes.c_void_p) -> None:
    """llama.cpp's log lines into Python logging (instead of raw stderr)."""
    message = text.decode("utf-8", errors="replace").rstrip()
    if message:
        native_log.log(_LOG_LEVELS.get(level, logging.DEBUG), "%s", message)


@runtime_checkable
class _FileSource(Protocol):
    """A weight source that knows its file (GGUFSource does)."""

    path: Path


def gguf_path(shard: Shard, source: WeightSource) -> Path:
    """The GGUF file to load for shard; UnsupportedModel unless whole model and GGUF file."""
    if not shard.is_whole:
        raise UnsupportedModel(f"{WHOLE_GGUF_ONLY}; asked for layers {shard}")
    if not isinstance(source, _FileSource):
        raise UnsupportedModel(f"{WHOLE_GGUF_ONLY}; {type(source).__name__} is not a GGUF file")
    path = Path(source.path)
    magic = b""
    if path.is_file():
        with path.open("rb") as f:
            magic = f.read(4)
    if magic != b"GGUF":
        raise UnsupportedModel(f"{WHOLE_GGUF_ONLY}; {path} is not a GGUF file")
    return path


class SequencePool:
    """Sequence ids [0, size) of one context, lent to requests, with each one's cached length."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._spare = list(range(size - 1, -1, -1))  # pop() gives the lowest
        self._ids: dict[RequestId, int] = {}
        self._lengths: dict[RequestId, int] = {}

    def __contains__(self, rid: RequestId) -> bool:
        return rid in self._ids

    def __len__(self) -> int:
        return len(self._ids)

    def spare(self) -> int:
        """Sequence ids not lent."""
        return len(self._spare)

    def length(self, rid: RequestId) -> int:
        """Positions cached for the request (0 if none)."""
        return self._lengths.get(rid, 0)

    def total(self) -> int:
        """Positions cached over all requests."""
        return sum(self._lengths.values())

    def take(self, rid: RequestId) -> int:
        """The request's sequence id, lending the lowest spare one to a new request."""
        if rid not in self._ids:
            self._ids[rid] = self._spare.pop()
            self._lengths[rid] = 0
        return self._ids[rid]

    def advance(self, rid: RequestId, n: int) -> None:
        self._lengths[rid] += n

    def release(self, rid: RequestId) -> int | None:
        """Forget the request; the sequence id to clear, or None if it had none."""
        seq = self._ids.pop(rid, None)
        self._lengths.pop(rid, None)
        if seq is not None:
            self._spare.append(seq)
            self._spare.sort(reverse=True)
        return seq


class _Native:
    """The llama.cpp objects of one loaded model: model, context, its memory, one token batch."""

    def __init__(
        self,
        path: Path,
        engine: "LlamaCppEngine",
        progress: Callable[[float, ctypes.c_void_p], bool] | None,
    ) -> None:
        llama_cpp.llama_log_set(_route_log, ctypes.c_void_p(0))
        llama_cpp.llama_backend_init()
        mparams = llama_cpp.llama_model_default_params()
        mparams.n_gpu_layers = engine.n_gpu_layers
        if engine.tensor_split:  # the share of the offloaded layers each GPU holds, by index
            shares = list(engine.tensor_split)[: llama_cpp.LLAMA_MAX_DEVICES]
            shares += [0.0] * (llama_cpp.LLAMA_MAX_DEVICES - len(shares))
            self._split = (ctypes.c_float * llama_cpp.LLAMA_MAX_DEVICES)(*shares)  # kept alive
            mparams.tensor_split = self._split
        if progress is not None:
            mparams.progress_callback = progress
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), mparams)
        if not model:
            raise UnsupportedModel(f"llama.cpp could not load {path} (its log says why)")
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = engine.n_ctx
        cparams.n_batch = engine.n_ctx  # a step may be as long as the context; llama.cpp cuts it
        cparams.n_ubatch = min(UBATCH, engine.n_ctx)
        cparams.n_seq_max = engine.n_seq_max
        # One cache for all sequences, so one request may use the whole n_ctx. Split (llama.cpp's
        # default), each of n_seq_max sequences would get n_ctx / n_seq_max cells.
        cparams.kv_unified = True
        cparams.n_threads = cparams.n_threads_batch = engine.n_threads
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            llama_cpp.llama_model_free(model)
            raise ModelUnavailable(f"llama.cpp could not make a context of {engine.n_ctx} tokens")
        self.model, self.ctx = model, ctx
        self.memory = llama_cpp.llama_get_memory(ctx)
        self.n_ctx = int(llama_cpp.llama_n_ctx(ctx))
        self.n_seq = int(llama_cpp.llama_n_seq_max(ctx))
        self.n_layers = int(llama_cpp.llama_model_n_layer(model))
        vocab = llama_cpp.llama_model_get_vocab(model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(vocab))
        self.batch = llama_cpp.llama_batch_init(self.n_ctx, 0, 1)
        # numpy views of the batch's arrays, so a step fills them a slice at a time
        self.tokens = np.ctypeslib.as_array(self.batch.token, shape=(self.n_ctx,))
        self.positions = np.ctypeslib.as_array(self.batch.pos, shape=(self.n_ctx,))
        self.outputs = np.ctypeslib.as_array(self.batch.logits, shape=(self.n_ctx,))
        np.ctypeslib.as_array(self.batch.n_seq_id, shape=(self.n_ctx,))[:] = 1

    def decode(self, items: Sequence[tuple[int, np.ndarray, int]], all_logits: bool) -> np.ndarray:
        """One llama_decode of (sequence id, tokens [T], start) items; logits [outputs, vocab]."""
        at = 0
        for seq, tokens, start in items:
            t = len(tokens)
            self.tokens[at : at + t] = tokens
            self.positions[at : at + t] = np.arange(start, start + t)
            self.outputs[at : at + t] = 1 if all_logits else 0
            self.outputs[at + t - 1] = 1
            for i in range(at, at + t):
                self.batch.seq_id[i][0] = seq
            at += t
        self.batch.n_tokens = at
        code = llama_cpp.llama_decode(self.ctx, self.batch)
        if code != 0:
            why = "no room in its KV cache" if code == 1 else f"llama_decode returned {code}"
            raise ModelUnavailable(f"llama.cpp step failed: {why}")
        rows = int(np.count_nonzero(self.outputs[:at]))
        logits = llama_cpp.llama_get_logits(self.ctx)  # one row per output, in batch order
        return np.ctypeslib.as_array(logits, shape=(rows, self.n_vocab))

    def forget(self, seq: int, start: int = 0) -> None:
        """Drop the sequence's cached positions from start on."""
        llama_cpp.llama_memory_seq_rm(self.memory, seq, start, -1)

    def copy(self, source: int, target: int, length: int) -> None:
        """Positions [0, length) of sequence `source` become sequence `target`'s too."""
        llama_cpp.llama_memory_seq_cp(self.memory, source, target, 0, length)

    def close(self) -> None:
        llama_cpp.llama_batch_free(self.batch)
        llama_cpp.llama_free(self.ctx)
        llama_cpp.llama_model_free(self.model)


class LlamaCppEngine:
    """The Engine protocol over llama.cpp for whole GGUF models: one context, a sequence each."""

    name = "llamacpp"

    def __init__(
        self,
        n_gpu_layers: int = 0,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        n_seq_max: int = 16,
        tensor_split: Sequence[float] = (),
    ) -> None:
        self.n_gpu_layers = n_gpu_layers  # layers offloaded to the GPU: -1 all, 0 none (CPU)
        self.tensor_split = tuple(tensor_split)  # per GPU index; () = llama.cpp's own split
        self.n_ctx = n_ctx  # KV cache cells, shared by all requests
        self.n_threads = n_threads or os.cpu_count() or 1
        self.n_seq_max = n_seq_max  # requests holding a cache at once
        self._native: _Native | None = None
        self._pool = SequencePool(n_seq_max)

    def load(self, shard: Shard, source: WeightSource, progress: ProgressFn | None = None) -> None:
        """Load the whole model from its GGUF file and make the shared context."""
        path = gguf_path(shard, source)
        layers = source.config.num_hidden_layers
        if layers != shard.n_layers:
            raise UnsupportedModel(f"{path.name} has {layers} layers, not {shard.n_layers}")
        if self.n_gpu_layers != 0 and not llama_cpp.llama_supports_gpu_offload():
            log.info("llama-cpp-python is built without GPU support here: running on the CPU")
        last = [-1]

        def on_progress(fraction: float, _user_data: ctypes.c_void_p) -> bool:
            done = min(layers, int(fraction * layers))  # as layers, like the other engines
            if progress is not None and done != last[0]:
                last[0] = done
                progress(done, layers)
            return True  # go on loading

        # a local, so the C callback stays alive until the load returns
        callback = llama_cpp.llama_progress_callback(on_progress) if progress else None
        self.close()
        native = _Native(path, self, callback)
        if native.n_layers != layers:
            native.close()
            raise UnsupportedModel(f"llama.cpp reads {native.n_layers} layers in {path.name}")
        self._native, self._pool = native, SequencePool(native.n_seq)
        log.info(
            "loaded %s with llama.cpp (%d GPU layers%s, %d-token context, %d sequences, "
            "%d threads)",
            shard,
            self.n_gpu_layers,
            f" split {list(self.tensor_split)}" if self.tensor_split else "",
            native.n_ctx,
            native.n_seq,
            self.n_threads,
        )

    def forward(self, batch: Sequence[StepInput], *, all_logits: bool = False) -> list[np.ndarray]:
        """Append each item's tokens to its sequence in one llama_decode; logits per item."""
        native = self._loaded()
        self._check(native, batch)
        new = {item.request_id for item in batch if item.request_id not in self._pool}
        items = [(self._pool.take(item.request_id), item.data, item.start) for item in batch]
        try:
            rows = native.decode(items, all_logits)
        except BaseException:
            for item, (seq, _, start) in zip(batch, items, strict=True):
                native.forget(seq, start)  # whatever a failed step left in the cache
                if item.request_id in new:
                    self._pool.release(item.request_id)
            raise
        outputs, at = [], 0
        for item in batch:
            self._pool.advance(item.request_id, item.length)
            n = item.length if all_logits else 1
            block = rows[at : at + n]
            outputs.append(np.array(block if all_logits else block[0]))  # copies out of llama.cpp
            at += n
        return outputs

    def free(self, request_id: RequestId) -> None:
        """Drop the request's cache and give back its sequence id; unknown ids are ignored."""
        seq = self._pool.release(request_id)
        if seq is not None and self._native is not None:
            self._native.forget(seq)

    def set_threads(self, threads: int) -> None:
        """llama.cpp's threads for decoding and for prompts, from the next llama_decode on."""
        self.n_threads = max(1, threads)
        if self._native is not None:
            llama_cpp.llama_set_n_threads(self._native.ctx, self.n_threads, self.n_threads)

    def close(self) -> None:
        """Release every cache, the context and the model."""
        if self._native is not None:
            self._native.close()
            self._native = None
        self._pool = SequencePool(self.n_seq_max)

    def cache_length(self, request_id: RequestId) -> int:
        """Positions cached for the request (0 if none)."""
        return self._pool.length(request_id)

    def cached_positions(self) -> int:
        """Positions the caches of every request hold together."""
        return self._pool.total()

    def truncate(self, request_id: RequestId, length: int) -> None:
        """Drop the sequence's positions from `length` on (llama_memory_seq_rm)."""
        held = self._pool.length(request_id)
        if held < length:
            raise ValueError(f"cannot keep {length} positions of {request_id}: it holds {held}")
        if request_id in self._pool and held > length:
            self._loaded().forget(self._pool.take(request_id), length)
            self._pool.advance(request_id, length - held)

    def fork(self, source: RequestId, target: RequestId, length: int) -> None:
        """target := source's first `length` positions: llama.cpp copies them to target's
        sequence (in the unified cache the cells are shared, not duplicated)."""
        native = self._loaded()
        held = self._pool.length(source)
        if source not in self._pool or held < length:
            raise ValueError(f"cannot fork {length} positions of {source}: it holds {held}")
        if target in self._pool:
            self.free(target)
        if not self._pool.spare():
            raise ValueError(f"no sequence is free for {target} (at most {self._pool.size})")
        seq = self._pool.take(target)
        native.copy(self._pool.take(source), seq, length)
        self._pool.advance(target, length)

    def _loaded(self) -> _Native:
        if self._native is None:
            raise RuntimeError("LlamaCppEngine.forward before load()")
        return self._native

    def _check(self, native: _Native, batch: Sequence[StepInput]) -> None:
        """Refuse a batch that cannot run, before any cache changes."""
        check_batch(batch, self._pool.length, first=True, hidden_size=0, vocab_size=native.n_vocab)
        for item in batch:
            rid = item.request_id
            if item.start + item.length > native.n_ctx:
                raise ContextOverflow(
                    f"request {rid}: {item.start + item.length} positions do not fit the "
                    f"llamacpp context of {native.n_ctx}"
                )
        held, adding = self._pool.total(), sum(item.length for item in batch)
        if held + adding > native.n_ctx:
            raise ModelUnavailable(
                f"the llamacpp KV cache holds {native.n_ctx} tokens: {len(self._pool)} requests "
                f"hold {held} and this step adds {adding}"
            )
        fresh = sum(1 for item in batch if item.request_id not in self._pool)
        if fresh > self._pool.spare():
            raise ModelUnavailable(
                f"the llamacpp context runs {self._pool.size} requests at once: {len(self._pool)} "
                f"are running and {fresh} more do not fit"
            )
