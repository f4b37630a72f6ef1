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
from shoal.inference.prefix import Retained
from shoal.inference.request import SamplingParams, TokenLogprob
from shoal.inference.sampling import make_rng, sample, token_logprob
from shoal.types.ids import RequestId

_T = TypeVar("_T")


class PipelineBroken(ShoalError):
    """A stage is gone mid-request; the caches are lost, the request can be replayed elsewhere."""


@dataclass(frozen=True)
class Step:
    """One request's part of a pipeline step; `sampling` None = no token wanted yet (prefill)."""

    item: StepInput
    sampling: SamplingParams | None
    # before the step, every stage makes this request's cache a copy of the first item.start
    # positions of `fork`'s (n choices share one prefill of their prompt)
    fork: RequestId | None = None
    mask: np.ndarray | None = None  # uint32 bitmask of the tokens allowed (constrained decoding)
    # with penalties: the prompt's length, and the last stage keeps these token ids to count
    prompt_len: int | None = None
    # speculative decoding: the data is the last token and drafts after it; the last stage
    # answers the greedy token at every position (Sampled.following), greedy requests only
    verify: bool = False
    rewind: bool = False  # first drop what the caches hold from item.start on (rejected drafts)


class Sampled(int):
    """A sampled token id, with its logprobs when the request asked for them; for a verify
    step, the greedy tokens at the positions after it (`following`)."""

    logprob: TokenLogprob | None
    following: tuple[int, ...]

    def __new__(
        cls, token: int, logprob: TokenLogprob | None = None, following: tuple[int, ...] = ()
    ) -> "Sampled":
        self = super().__new__(cls, token)
        self.logprob = logprob
        self.following = following
        return self


def verified(logits: np.ndarray) -> Sampled:
    """A verify step's answer from its logits [T, vocab]: the greedy token at each position."""
    picks = np.argmax(logits, axis=-1)
    return Sampled(int(picks[0]), following=tuple(int(t) for t in picks[1:]))


class Pipeline(Protocol):
    """Ordered stages of one model: token ids in, sampled token ids out. `depth`: the stages a
    step passes one after another, so that many batches sent at once overlap (1: none do)."""

    depth: int

    async def forward(self, steps: Sequence[Step]) -> Sequence[int | None]:
        """One token per step that wants one (a Sampled where logprobs were asked), else None."""
        ...

    async def forward_all(
        self, batches: Sequence[Sequence[Step]]
    ) -> Sequence[Sequence[int | None]]:
        """Several forwards in order, sent at once: the stages work on them concurrently (stage
        k on batch i while stage k + 1 is on batch i - 1); each batch's tokens."""
        ...

    async def free(self, request_id: RequestId, keep: bool = False) -> None:
        """Drop the request's caches; keep: hold them for later requests to `fork` from (every
        stage as its budget allows: inference/prefix.py)."""
        ...

    async def close(self) -> None: ...


class Sampler:
    """Per-request state of the last stage: random generators, so a seeded request is
    reproducible, and the tokens seen so far by position, for penalties.

    The tokens come with the steps (`observe`), never from what this stage sampled, so a
    request replayed from its prompt and tokens rebuilds exactly the same state.
    """

    def __init__(self) -> None:
        self._rngs: dict[RequestId, np.random.Generator] = {}
        self._seen: dict[RequestId, tuple[int, list[int]]] = {}  # (prompt length, ids)

    def observe(
        self, rid: RequestId, start: int, tokens: Sequence[int] | np.ndarray, prompt_len: int
    ) -> None:
        """The token ids at positions [start, start + len(tokens)) (a replay rewrites them)."""
        _, seen = self._seen.setdefault(rid, (prompt_len, []))
        if len(seen) < start:
            raise ValueError(f"request {rid}: penalty tokens from {start}, {len(seen)} seen")
        del seen[start:]
        seen.extend(int(t) for t in tokens)
        self._seen[rid] = (prompt_len, seen)

    def __call__(
        self,
        rid: RequestId,
        logits: np.ndarray,
        params: SamplingParams,
        position: int | None,
        mask: np.ndarray | None = None,
    ) -> Sampled:
        """The token at `position` (its absolute position: a seeded draw depends on it alone)."""
        history, prompt_len = None, 0
        if params.penalized and rid in self._seen:
            prompt_len, seen = self._seen[rid]
            history = np.asarray(seen[:position], dtype=np.int64)
        if params.seed is not None and position is not None:
            rng = make_rng(params, position)
        else:
            rng = self._rngs.get(rid) or self._rngs.setdefault(rid, make_rng(params))
        token = sample(logits, params, rng, history=history, prompt_len=prompt_len, mask=mask)
        if params.logprobs is None:
            return Sampled(token)
        return Sampled(token, token_logprob(logits, token, params.logprobs))

    def free(self, rid: RequestId) -> None:
        self._rngs.pop(rid, None)
        self._seen.pop(rid, None)


def run_stages(
    engines: Sequence[Engine], batch: Sequence[StepInput], *, all_logits: bool = False
) -> list[np.ndarray]:
    """Push a batch through every engine in order; the last one's outputs are logits (of
    every position with all_logits)."""
    items = list(batch)
    outputs: list[np.ndarray] = []
    for i, engine in enumerate(engines):
        outputs = engine.forward(items, all_logits=all_logits and i == len(engines) - 1)
        items = [
            StepInput(it.request_id, out, it.start) for it, out in zip(items, outputs, strict=True)
        ]
    return outputs


class LocalPipeline:
    """All stages in this process; engine calls are serialized on one thread. Caches freed with
    `keep` stay, up to `keep_positions` positions together (inference/prefix.py)."""

    depth = 1  # one thread runs every stage: batches never overlap

    def __init__(self, engines: Sequence[Engine], keep_positions: int = 0) -> None:
        self._engines = list(engines)
        self._retained = Retained(keep_positions)
        self._sampler = Sampler()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")

    def _step(self, steps: Sequence[Step]) -> list[Sampled | None]:
        for s in steps:
            if s.rewind:
                for engine in self._engines:
                    engine.truncate(s.item.request_id, s.item.start)
            if s.fork is not None:
                self._retained.touch(s.fork)
                for engine in self._engines:
                    engine.fork(s.fork, s.item.request_id, s.item.start)
            if s.prompt_len is not None:
                self._sampler.observe(s.item.request_id, s.item.start, s.item.data, s.prompt_len)
        every = any(s.verify for s in steps)
        logits = run_stages(self._engines, [s.item for s in steps], all_logits=every)
        return [
            None
            if s.sampling is None
            else verified(out)
            if s.verify
            else self._sampler(
                s.item.request_id,
                out[-1] if every else out,
                s.sampling,
                s.item.start + s.item.length,
                s.mask,
            )
            for s, out in zip(steps, logits, strict=True)
        ]

    async def forward(self, steps: Sequence[Step]) -> list[Sampled | None]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._step, steps)

    async def forward_all(self, batches: Sequence[Sequence[Step]]) -> list[list[Sampled | None]]:
        """One stage thread here: the batches in order (nothing to overlap in one process)."""
        return [await self.forward(steps) for steps in batches]

    async def call(self, fn: Callable[..., _T], *args: Any) -> _T:
        """fn(*args) on the engine thread: load engines here, so that torch computes on one
        thread only (a second thread gets a second OpenMP pool, and the two slow each other)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def free(self, request_id: RequestId, keep: bool = False) -> None:
        loop = asyncio.get_running_loop()
        self._sampler.free(request_id)
        self._retained.discard(request_id)
        gone = [request_id]
        if keep:  # held for later requests, unless the budget says otherwise
            gone = self._retained.keep(request_id, self._engines[0].cache_length(request_id))
        for rid in gone:
            for engine in self._engines:
                await loop.run_in_executor(self._executor, engine.free, rid)

    async def close(self) -> None:
        loop = asyncio.get_running_loop()
        for engine in self._engines:
            await loop.run_in_executor(self._executor, engine.close)
        self._executor.shutdown(wait=False)
