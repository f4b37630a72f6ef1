"""A pipeline: the ordered stages of one model instance, seen by the scheduler as one forward.

LocalPipeline runs every stage's engine in this process, on one worker thread, so a long
forward pass never blocks the event loop. Stages on other nodes plug in behind the same
interface.
"""

import asyncio
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Protocol

import numpy as np

from shoal.engines.base import Engine, StepInput
from shoal.types.ids import RequestId


class Pipeline(Protocol):
    """Ordered stages of one model: token ids in, last-position logits out."""

    async def forward(self, batch: Sequence[StepInput]) -> list[np.ndarray]: ...

    async def free(self, request_id: RequestId) -> None: ...

    async def close(self) -> None: ...


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
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")

    async def forward(self, batch: Sequence[StepInput]) -> list[np.ndarray]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, run_stages, self._engines, batch)

    async def free(self, request_id: RequestId) -> None:
        loop = asyncio.get_running_loop()
        for engine in self._engines:
            await loop.run_in_executor(self._executor, engine.free, request_id)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        for engine in self._engines:
            await loop.run_in_executor(self._executor, engine.close)
        self._executor.shutdown(wait=False)
