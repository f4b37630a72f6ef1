"""One shard run by several engines in one process: its first layers on a GPU, the rest on the CPU.

A model a little too big for a GPU keeps what fits there and runs its last layers on the CPU, as
llama.cpp's partial offload does, without a second runner and a hop between them. Each part is
an ordinary engine holding a sub-shard (the first holds the embeddings, the last the head); a step
runs the parts in order, the hidden states of one going into the next as the engines' numpy
arrays, which is the copy between devices. Every request has a cache in each part; freeing one
frees all.
"""

from collections.abc import Sequence

import numpy as np

from shoal.engines.base import Engine, ProgressFn, StepInput, WeightSource
from shoal.types.ids import RequestId
from shoal.types.shard import Shard


class SplitEngine:
    """Engines over consecutive parts of one shard: `parts` are (engine, layers) in order."""

    def __init__(self, parts: Sequence[tuple[Engine, int]]) -> None:
        if len(parts) < 2 or any(layers < 1 for _, layers in parts):
            raise ValueError("a split engine needs two or more parts of at least one layer")
        self._parts = tuple(parts)
        self.name = parts[0][0].name  # the placed engine; `engines` names every part

    @property
    def engines(self) -> tuple[Engine, ...]:
        return tuple(engine for engine, _ in self._parts)

    def load(self, shard: Shard, source: WeightSource, progress: ProgressFn | None = None) -> None:
        if sum(layers for _, layers in self._parts) != shard.end - shard.start:
            raise ValueError(f"the parts do not add up to the layers of {shard}")
        at, total = shard.start, shard.end - shard.start
        for engine, layers in self._parts:
            part = Shard(
                model_id=shard.model_id, start=at, end=at + layers, n_layers=shard.n_layers
            )
            done = at - shard.start

            def report(n: int, _: int, done: int = done) -> None:
                if progress is not None:
                    progress(done + n, total)

            engine.load(part, source, report)
            at += layers

    def forward(self, batch: Sequence[StepInput], *, all_logits: bool = False) -> list[np.ndarray]:
        items = list(batch)
        for engine in self.engines[:-1]:
            hidden = engine.forward(items)
            items = [
                StepInput(i.request_id, h, i.start) for i, h in zip(items, hidden, strict=True)
            ]
        return self.engines[-1].forward(items, all_logits=all_logits)

    def cache_length(self, request_id: RequestId) -> int:
        """Positions cached for the request (every part holds the same)."""
        return self.engines[0].cache_length(request_id)

    def cached_positions(self) -> int:
        """Positions the caches of every request hold together (in each part)."""
        return self.engines[0].cached_positions()

    def fork(self, source: RequestId, target: RequestId, length: int) -> None:
        """target := source's first `length` positions, in every part."""
        for engine in self.engines:
            engine.fork(source, target, length)

    def truncate(self, request_id: RequestId, length: int) -> None:
        """Keep the first `length` positions, in every part."""
        for engine in self.engines:
            engine.truncate(request_id, length)

    def free(self, request_id: RequestId) -> None:
        for engine in self.engines:
            engine.free(request_id)

    def set_threads(self, threads: int) -> None:
        """Every part's (a GPU part's few CPU threads included)."""
        for engine in self.engines:
            engine.set_threads(threads)

    def close(self) -> None:
        for engine in self.engines:
            engine.close()
