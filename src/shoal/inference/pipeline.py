"""A pipeline: the ordered stages of one model instance, seen by the scheduler as one step.

The last stage samples: a step sends token ids (or hidden states) in and gets token ids out, so
logits never cross a network. LocalPipeline runs every stage's engine in this process, on one
worker thread, so a long forward pass never blocks the event loop; remote stages plug in behind
the same interface.
"""

import asyncio
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np

from shoal.engines.base import Engine, StepInput
from shoal.errors import ShoalError
from shoal.inference.request import SamplingParams
from shoal.inference.sampling import make_rng, sample
from shoal.types.ids import RequestId

_T = TypeVar("_T")


class PipelineBroken(ShoalError):
    """A stage is gone mid-request; the caches are lost, the request can be replayed elsewhere."""


@dataclass(frozen=True)
class Step:
    """One request's part of a pipeline step; `sampling` None = no token wanted yet (prefill)."""

    item: StepInput
    sampling: SamplingParams | None


class Pipeline(Protocol):
    """Ordered stages of one model: token ids in, sampled token ids out."""

    async def forward(self, steps: Sequence[Step]) -> list[int | None]: ...

    async def free(self, request_id: RequestId) -> None: ...

    async def close(self) -> None: ...


class Sampler:
    """Per-request random state for the last stage, so a seeded request is reproducible."""

    def __init__(self) -> None:
        self._rngs: dict[RequestId, np.random.Generator] = {}

    def __call__(
        self, rid: RequestId, logits: np.ndarray, params: SamplingParams, position: int | None
    ) -> int:
        """The token at `position` (its absolute position: a seeded draw depends on it alone)."""
        if params.seed is not None and position is not None:
            return sample(logits, params, make_rng(params, position))
        rng = self._rngs.get(rid)
        if rng is None:
            rng = self._rngs[rid] = make_rng(params)
        return sample(logits, params, rng)

    def free(self, rid: RequestId) -> None:
        self._rngs.pop(rid, None)


def run_stages(engines: Sequence[Engine], batch: Sequence[StepInput]) -> list[np.ndarray]:
    """Push a batch through every engine in order; the last one's outputs are logits."""
    items = list(batch)
    outputs: list[np.ndarray] = []
    for engine in engines:
        outputs = engine.forward(items)
        items = [
            StepInput(it.request_id, out, it.start) for it, out in zip(items, outputs, strict=True)
        ]
    return outputs


class LocalPipeline:
    """All stages in this process; engine calls are serialized on one thread."""

    def __init__(self, engines: Sequence[Engine]) -> None:
        self._engines = list(engines)
        self._sampler = Sampler()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")

    def _step(self, steps: Sequence[Step]) -> list[int | None]:
        logits = run_stages(self._engines, [s.item for s in steps])
        return [
            None
            if s.sampling is None
            else self._sampler(s.item.request_id, out, s.sampling, s.item.start + s.item.length)
            for s, out in zip(steps, logits, strict=True)
        ]

    async def forward(self, steps: Sequence[Step]) -> list[int | None]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._step, steps)

    async def call(self, fn: Callable[..., _T], *args: Any) -> _T:
        """fn(*args) on the engine thread: load engines here, so that torch computes on one
        thread only (a second thread gets a second OpenMP pool, and the two slow each other)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def free(self, request_id: RequestId) -> None:
        loop = asyncio.get_running_loop()
        self._sampler.free(request_id)
        for engine in self._engines:
            await loop.run_in_executor(self._executor, engine.free, request_id)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        for engine in self._engines:
            await loop.run_in_executor(self._executor, engine.close)
        self._executor.shutdown(wait=False)
