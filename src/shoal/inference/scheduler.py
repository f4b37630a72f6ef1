"""The decode scheduler: continuous batching over one pipeline.

Every step runs one forward holding every decoding request (one token each) plus at most one
prefill chunk, so a long prompt never stalls the streams already running and requests join and
leave between steps. Sampling, detokenisation and stop handling happen here, per request.
"""

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncGenerator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from shoal.engines.base import StepInput
from shoal.inference.pipeline import Pipeline, PipelineBroken, Step
from shoal.inference.request import (
    Finished,
    FinishReason,
    GenerationEvent,
    GenerationRequest,
    TextDelta,
)
from shoal.inference.stops import StopMatcher

log = logging.getLogger(__name__)

Recover = Callable[[PipelineBroken], Awaitable[Pipeline]]  # a working pipeline, or raises


class TextStream(Protocol):
    def push(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


class Detokenizer(Protocol):
    """What the scheduler needs of a tokenizer."""

    @property
    def eos_token_ids(self) -> frozenset[int]: ...

    def stream(self) -> TextStream: ...


@dataclass
class _Sequence:
    """One request's progress through generation."""

    req: GenerationRequest
    text: TextStream
    stops: StopMatcher
    queue: asyncio.Queue[GenerationEvent | BaseException] = field(default_factory=asyncio.Queue)
    pending: list[int] = field(default_factory=list)  # tokens to feed next
    fed: int = 0  # positions in the pipeline's cache
    tokens: list[int] = field(default_factory=list)  # generated so far (replayed on failover)
    unsent: list[int] = field(default_factory=list)  # token ids whose text is not out yet
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    cancelled: bool = False  # the caller went away
    finished: bool = False

    @property
    def rid(self) -> str:
        return self.req.request_id


class Scheduler:
    """Owns the pipeline of one instance; `generate` streams one request's events."""

    def __init__(
        self,
        pipeline: Pipeline,
        tokenizer: Detokenizer,
        *,
        context_length: int,
        max_batch: int = 8,
        prefill_chunk: int = 512,
        recover: Recover | None = None,
    ) -> None:
        self._pipeline = pipeline
        self._recover = recover
        self._tokenizer = tokenizer
        self._context = context_length
        self._max_batch = max_batch
        self._prefill_chunk = prefill_chunk
        self._waiting: deque[_Sequence] = deque()
        self._active: list[_Sequence] = []
        self._wake = asyncio.Event()

    @property
    def load(self) -> int:
        """Requests running or queued here."""
        return len(self._active) + len(self._waiting)

    async def generate(self, req: GenerationRequest) -> AsyncGenerator[GenerationEvent, None]:
        """Queue the request and yield its events until Finished; closing early cancels it."""
        seq = _Sequence(
            req=req,
            text=self._tokenizer.stream(),
            stops=StopMatcher(req.sampling.stop),
            pending=list(req.prompt_tokens),
        )
        self._waiting.append(seq)
        self._wake.set()
        try:
            while True:
                event = await seq.queue.get()
                if isinstance(event, BaseException):
                    raise event
                yield event
                if isinstance(event, Finished):
                    return
        finally:
            seq.cancelled = True
            self._wake.set()

    async def run(self) -> None:
        """Step forever: admit, drop the cancelled, run one forward, sample."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._waiting and len(self._active) < self._max_batch:
                self._active.append(self._waiting.popleft())
            for seq in [s for s in self._active if s.cancelled]:
                await self._retire(seq)
            self._waiting = deque(s for s in self._waiting if not s.cancelled)
            if not self._active:
                continue
            await self._step()
            self._wake.set()

    async def _step(self) -> None:
        batch: list[tuple[_Sequence, Step]] = []
        prefill_budget = self._prefill_chunk
        for seq in self._active:
            if seq.fed and len(seq.pending) == 1:  # decoding
                take = 1
            elif prefill_budget > 0:
                take = min(len(seq.pending), prefill_budget)
                prefill_budget -= take
            else:
                continue
            data = np.asarray(seq.pending[:take], dtype=np.int64)
            wants_token = take == len(seq.pending)
            step = Step(
                StepInput(seq.req.request_id, data, seq.fed),
                seq.req.sampling if wants_token else None,
            )
            batch.append((seq, step))
        try:
            tokens = await self._pipeline.forward([step for _, step in batch])
        except PipelineBroken as exc:
            if self._recover is not None:
                await self._failover(exc)
                return
            await self._fail([seq for seq, _ in batch], exc)
            return
        except Exception as exc:  # an engine failure ends these requests, not the node
            log.exception("forward failed for %d request(s)", len(batch))
            await self._fail([seq for seq, _ in batch], exc)
            return
        for (seq, step), token in zip(batch, tokens, strict=True):
            seq.fed += step.item.length
            del seq.pending[: step.item.length]
            if token is not None and not seq.cancelled:
                self._advance(seq, token)
        for seq in [s for s in self._active if s.cancelled or s.finished]:
            await self._retire(seq)

    async def _failover(self, exc: PipelineBroken) -> None:
        """Get a new pipeline and replay every running request onto it: prompt + tokens so far."""
        assert self._recover is not None
        log.warning(
            "pipeline broken (%s): %d request(s) wait for the model to come back",
            exc,
            len(self._active),
        )
        broken, started = self._pipeline, time.perf_counter()
        try:
            self._pipeline = await self._recover(exc)
        except Exception as err:  # no capacity came back: these requests end with the reason
            await self._fail(list(self._active), err)
            return
        finally:
            with contextlib.suppress(Exception):
                await broken.close()
        for seq in self._active:
            await self._pipeline.free(seq.req.request_id)  # stale caches on surviving stages
            seq.pending = [*seq.req.prompt_tokens, *seq.tokens]
            seq.fed = 0
        log.info(
            "resumed %d request(s) after %.2f s, replaying their tokens as prefill",
            len(self._active),
            time.perf_counter() - started,
        )

    async def _fail(self, seqs: list[_Sequence], exc: BaseException) -> None:
        for seq in seqs:
            seq.finished = True
            await self._retire(seq)
            seq.queue.put_nowait(exc)  # after the retire: the caller sees the error, cache freed

    def _advance(self, seq: _Sequence, token: int) -> None:
        """Take one sampled token: emit its text, or finish the sequence."""
        now = time.perf_counter()
        if seq.first_token_at is None:
            seq.first_token_at = now
        if token in self._tokenizer.eos_token_ids:
            return self._finish(seq, "stop")
        seq.tokens.append(token)
        seq.unsent.append(token)
        emit, stopped = seq.stops.push(seq.text.push(token))
        if emit:
            seq.queue.put_nowait(TextDelta(emit, tuple(seq.unsent)))
            seq.unsent.clear()
        if stopped:
            return self._finish(seq, "stop", flush=False)
        limit = seq.req.sampling.max_tokens
        if (limit is not None and len(seq.tokens) >= limit) or seq.fed + 1 >= self._context:
            return self._finish(seq, "length")
        seq.pending = [token]

    def _finish(self, seq: _Sequence, reason: FinishReason, *, flush: bool = True) -> None:
        if flush:
            tail, _ = seq.stops.push(seq.text.flush())
            tail += seq.stops.flush()
            if tail or seq.unsent:
                seq.queue.put_nowait(TextDelta(tail, tuple(seq.unsent)))
        first = seq.first_token_at or time.perf_counter()
        decode_s = time.perf_counter() - first
        rate = (len(seq.tokens) - 1) / decode_s if len(seq.tokens) > 1 and decode_s > 0 else 0.0
        done = Finished(
            reason, len(seq.req.prompt_tokens), len(seq.tokens), first - seq.started, rate
        )
        seq.queue.put_nowait(done)
        seq.finished = True  # retired after this step
        log.info(
            "request %s: %d prompt tokens, TTFT %.0f ms, %d tokens at %.1f tok/s, %s",
            seq.rid,
            done.prompt_tokens,
            done.ttft_s * 1000,
            done.completion_tokens,
            rate,
            reason,
        )

    async def _retire(self, seq: _Sequence) -> None:
        """Free the request's cache on every stage, then leave the batch (and the load count)."""
        if not seq.finished:
            log.info("request %s cancelled after %d tokens", seq.rid, len(seq.tokens))
        try:
            await self._pipeline.free(seq.req.request_id)
        except Exception as exc:  # a broken pipeline holds no cache worth freeing
            log.debug("freeing %s on a broken pipeline: %s", seq.rid, exc)
        finally:
            self._active.remove(seq)
