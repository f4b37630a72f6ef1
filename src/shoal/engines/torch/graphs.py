"""CUDA graphs of decode steps: one launch replays every kernel of a step.

A decode step of a small model on a GPU is hundreds of tiny kernels, and launching them from
Python takes longer than running them (SmolLM2 on an H100: 11-17 ms a step eagerly). A graph
bakes in shapes and memory addresses, so the step runs at fixed shapes (llama.py Context.fixed:
each item writes at a position tensor and attends over its cache's whole capacity, masked), and a
graph is keyed by its caches' storage and capacity. It is replayed while the same requests decode
together and their caches do not grow (every 256 positions), and captured again otherwise.
On an H100 (bench/engine_step.py, SmolLM2's shape), a step went from 13.7-16.6 to 2.4-2.9 ms
for 1 request and from 30-32 to 8.8-9.6 ms for 8 (int8: 19 to 5.5, 47 to 13.4), and a capture
took 50-210 ms. SHOAL_CUDA_GRAPHS=0 turns graphs off.
"""

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from shoal.engines.cache import KVCache
from shoal.engines.torch.llama import Context, Model
from shoal.settings import runtime

LIMIT = 8  # graphs kept, least recently used dropped first


def enabled(device: torch.device) -> bool:
    """Whether decode steps on device run as CUDA graphs."""
    return device.type == "cuda" and runtime().cuda_graphs


@dataclass
class _Graph:
    graph: torch.cuda.CUDAGraph
    x: Tensor  # the step's inputs, copied in before each replay
    positions: Tensor
    out: Tensor  # overwritten by each replay


class DecodeGraphs:
    """Decode steps (one new position per item) as CUDA graphs, captured per batch of caches."""

    def __init__(self) -> None:
        self._graphs: OrderedDict[tuple[Any, ...], _Graph] = OrderedDict()
        self._pool: Any = None  # one memory pool shared by every graph
        self.captured = 0

    def step(
        self,
        model: Model,
        caches: Sequence[KVCache[torch.Tensor]],
        x: Tensor,
        positions: Tensor,
        all_logits: bool,
    ) -> Tensor:
        """model(x, positions) for one position per item; the result is valid until the next
        step (a replay overwrites it)."""
        key = (
            tuple((c.k.data_ptr(), c.v.data_ptr(), c.capacity) for c in caches),
            tuple(x.shape),
            x.dtype,
            all_logits,
        )
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._capture(model, caches, x, positions, all_logits)
            self._graphs[key] = graph
            while len(self._graphs) > LIMIT:
                self._graphs.popitem(last=False)
            return graph.out
        self._graphs.move_to_end(key)
        graph.x.copy_(x)
        graph.positions.copy_(positions)
        graph.graph.replay()
        return graph.out

    def _capture(
        self,
        model: Model,
        caches: Sequence[KVCache[torch.Tensor]],
        x: Tensor,
        positions: Tensor,
        all_logits: bool,
    ) -> _Graph:
        """Run the step once on a side stream (warm-up, as capture requires), then record it.
        The recording computes nothing, so the step's result is the replay that follows."""
        x, positions = x.clone(), positions.clone()

        def run() -> Tensor:
            ctx = Context.fixed(caches, positions)
            return model(x, positions, ctx, all_logits=all_logits)

        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._pool):
            out = run()
        self._pool = graph.pool()
        graph.replay()
        self.captured += 1
        return _Graph(graph, x, positions, out)
