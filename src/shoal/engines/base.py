"""The engine interface every backend implements, and the weight-source contract it reads.

An engine runs the layers [start, end) of one model for many requests, each with its own KV cache.
Data crosses this boundary as numpy arrays so that stages of different engines (and machines)
can feed each other: token ids go into the first stage, hidden states between stages, logits
come out of the last.
"""

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from shoal.engines.packed import Packed
from shoal.types.ids import RequestId
from shoal.types.model_config import ModelConfig
from shoal.types.shard import Shard

ProgressFn = Callable[[int, int], None]  # (done, total) while loading


class WeightSource(Protocol):
    """Weights of one model on this machine (a GGUF file, a safetensors directory, ...)."""

    @property
    def config(self) -> ModelConfig: ...

    def tensors(self, shard: Shard) -> Mapping[str, np.ndarray | Packed]:
        """Tensors of the shard only, under Hugging Face names with global layer indices.

        Layers [start, end) as `model.layers.{i}.…`; `model.embed_tokens.weight` on the first
        shard; `model.norm.weight` and `lm_head.weight` on the last (the embedding matrix under
        the head's name when embeddings are tied, the same object). Float arrays, dequantized;
        except that a source may return an MLX-quantized matrix (projections, embeddings, head)
        as `Packed` (engines/packed.py) under its `weight` name: an engine that wants floats calls
        `packed.dense()` on it (exactly MLX's float32 values), one with its own integer formats
        may take it as it is. GGUF sources dequantize; safetensors sources return MLX checkpoints
        packed.
        """
        ...


@dataclass(frozen=True)
class StepInput:
    """One request's slice of a forward pass.

    data: int token ids [T] on the first stage, float hidden states [T, hidden] after it.
    start: absolute position of data[0]; the request's cache holds exactly `start` positions.
    """

    request_id: RequestId
    data: np.ndarray
    start: int

    @property
    def length(self) -> int:
        return int(self.data.shape[0])


class Engine(Protocol):
    """One shard of one model, serving many requests. Not thread-safe: one caller at a time."""

    name: str

    def load(self, shard: Shard, source: WeightSource, progress: ProgressFn | None = None) -> None:
        """Read the shard's tensors from source and get ready to run."""
        ...

    def forward(self, batch: Sequence[StepInput], *, all_logits: bool = False) -> list[np.ndarray]:
        """Run each item through the shard, appending to its cache; one output per item.

        Not the last shard: float32 hidden states [T, hidden].
        The last shard: float32 logits [vocab] of the last position, or [T, vocab] if all_logits.
        """
        ...

    def free(self, request_id: RequestId) -> None:
        """Drop the request's cache; unknown ids are ignored."""
        ...

    def cache_length(self, request_id: RequestId) -> int:
        """Positions cached for the request (0 if none)."""
        ...

    def cached_positions(self) -> int:
        """Positions the caches of every request hold together (the KV cache's use)."""
        ...

    def fork(self, source: RequestId, target: RequestId, length: int) -> None:
        """target's cache := source's first `length` positions (the choices of one request share
        its prompt's prefill); ValueError when source holds fewer or the engine cannot."""
        ...

    def truncate(self, request_id: RequestId, length: int) -> None:
        """Keep only the first `length` positions of the request's cache (a speculative step's
        rejected drafts go); ValueError when it holds fewer or the engine cannot."""
        ...

    def set_threads(self, threads: int) -> None:
        """Run the next steps' CPU work on this many threads (a node shares its cores among its
        runners). Call it on the thread that runs the steps: torch's and OpenMP's thread counts
        are the calling thread's."""
        ...

    def close(self) -> None:
        """Release every cache and the weights."""
        ...


def check_batch(
    batch: Sequence[StepInput],
    cached: Callable[[RequestId], int],
    *,
    first: bool,
    hidden_size: int,
    vocab_size: int,
) -> None:
    """Refuse a batch no engine can run (ValueError), before any cache changes.

    Every engine calls this first: ids unique in the batch, each step continuing its cache
    exactly, token ids on the first shard and hidden states [T, hidden] after it.
    """
    seen: set[RequestId] = set()
    for item in batch:
        rid, data = item.request_id, item.data
        if rid in seen:
            raise ValueError(f"request {rid} appears twice in one batch")
        seen.add(rid)
        # Positions must continue the cache exactly: a gap or an overlap would make the new
        # keys sit at the wrong positions, silently corrupting every later token.
        held = cached(rid)
        if item.start != held:
            raise ValueError(
                f"request {rid}: step starts at {item.start} but its cache holds {held} "
                "positions; free() it to start again"
            )
        if first:
            if data.ndim != 1 or data.dtype.kind not in "iu":
                raise ValueError(f"request {rid}: the first shard takes int token ids [T]")
        elif data.ndim != 2 or data.shape[1] != hidden_size or data.dtype.kind != "f":
            raise ValueError(
                f"request {rid}: this shard takes float hidden states [T, {hidden_size}]"
            )
        if data.shape[0] == 0:
            raise ValueError(f"request {rid}: empty step")
        if first and (data.min() < 0 or data.max() >= vocab_size):
            raise ValueError(f"request {rid}: token id outside [0, {vocab_size})")
