"""The decode scheduler: continuous batching over one pipeline.

Every step runs one forward holding every decoding request (one token each) plus at most one
prefill chunk (shortest prompt first), so a long prompt delays the streams already running by at
most one chunk a step, and requests join and leave between steps. Sampling, detokenisation and
stop handling happen here, per request.

One request never hurts another: a request is checked before it joins (`admit`), and a step
that fails for a reason no one request owns is retried request by request (each replayed from
its prompt and tokens so far, alone) before anyone is failed.
"""

import asyncio
import contextlib
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from shoal.engines.base import StepInput
from shoal.errors import BadRequest, ContextOverflow, Overloaded
from shoal.inference.metrics import ModelMetrics
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

ATTENTION_SCALE = 2.0  # a prompt token at position p costs 1 + p / (2 · hidden size): see below
MAX_SEED = 2**63 - 1  # seeds travel as JSON integers and seed numpy's generator: 0 ..= int64 max


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
    last_token_at: float | None = None  # when the latest token was generated
    cancelled: bool = False  # the caller went away
    finished: bool = False
    alone: bool = False  # in a step that failed: runs by itself until it samples again

    @property
    def rid(self) -> str:
        return self.req.request_id

    def replay(self) -> None:
        """Feed prompt + tokens so far again from position 0 (its caches are gone)."""
        self.pending = [*self.req.prompt_tokens, *self.tokens]
        self.fed = 0


class RequestStream:
    """One request's events until Finished; closing it, or dropping it, cancels the request."""

    def __init__(self, seq: _Sequence, wake: asyncio.Event) -> None:
        self._seq = seq
        self._wake = wake
        self._done = False

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> GenerationEvent:
        if self._done:
            raise StopAsyncIteration
        try:
            event = await self._seq.queue.get()
        except BaseException:  # cancelled while waiting: the caller is gone
            self._cancel()
            raise
        if isinstance(event, BaseException):
            self._cancel()
            raise event
        if isinstance(event, Finished):
            self._done = True
        return event

    async def aclose(self) -> None:
        self._cancel()

    def _cancel(self) -> None:
        self._done = True
        if not self._seq.cancelled:
            self._seq.cancelled = True
            self._wake.set()

    def __del__(self) -> None:
        # a stream nobody iterates or closes (its HTTP response never started) stops generating
        self._seq.cancelled = True


class Scheduler:
    """Owns the pipeline of one instance; `generate` streams one request's events."""

    def __init__(
        self,
        pipeline: Pipeline,
        tokenizer: Detokenizer,
        *,
        context_length: int,
        vocab_size: int | None = None,
        hidden_size: int | None = None,
        max_batch: int = 8,
        max_queue: int = 64,
        prefill_chunk: int = 256,
        recover: Recover | None = None,
        metrics: ModelMetrics | None = None,  # counters and histograms, updated as things happen
    ) -> None:
        self._pipeline = pipeline
        self._metrics = metrics
        self._recover = recover
        self._tokenizer = tokenizer
        self._context = context_length
        self._vocab = vocab_size
        # A prompt token at position p costs its projections plus attention over p positions:
        # about 24·h² + 4·h·p FLOPs a layer for hidden size h, so 1 + p / (6·h) tokens' worth of
        # a token at position 0 if both ran equally fast. Attention runs slower per FLOP than
        # the block matmuls: SmolLM2 (h = 576) on the native CPU path prefilled 4096 tokens at
        # 2.4-2.8x the first 256-token chunk's time per chunk, which 1 + p / (2·h) fits. The
        # prefill budget counts that cost, so a chunk deep in a long prompt takes about what
        # the first one does (None: every token costs 1).
        self._attention_scale = ATTENTION_SCALE * hidden_size if hidden_size else None
        self._max_batch = max_batch
        self._max_queue = max_queue
        self._prefill_chunk = prefill_chunk
        self._waiting: deque[_Sequence] = deque()
        self._active: list[_Sequence] = []
        self._wake = asyncio.Event()

    @property
    def load(self) -> int:
        """Requests running or queued here."""
        return len(self._active) + len(self._waiting)

    @property
    def running(self) -> int:
        """Requests in the batch (prefilling or decoding)."""
        return len(self._active)

    @property
    def waiting(self) -> int:
        """Requests queued for a place in the batch."""
        return len(self._waiting)

    def generate(self, req: GenerationRequest) -> RequestStream:
        """Check and queue the request now (BadRequest, Overloaded); its events come from the
        stream returned, until Finished."""
        self.check(req)
        if len(self._waiting) >= self._max_queue:
            raise Overloaded(
                f"{len(self._waiting)} requests are already queued for this instance; retry shortly"
            )
        seq = _Sequence(
            req=req,
            text=self._tokenizer.stream(),
            stops=StopMatcher(req.sampling.stop),
            pending=list(req.prompt_tokens),
        )
        self._waiting.append(seq)
        self._wake.set()
        return RequestStream(seq, self._wake)

    def check(self, req: GenerationRequest) -> None:
        """Refuse, naming the field, what would fail inside a batched step."""
        prompt, seed = req.prompt_tokens, req.sampling.seed
        if not prompt:
            raise BadRequest("the prompt is empty", param="prompt")
        if len(prompt) >= self._context:
            raise ContextOverflow(
                f"this model's maximum context length is {self._context} tokens, "
                f"but the prompt has {len(prompt)} tokens",
                param="prompt",
            )
        if self._vocab is not None and not 0 <= min(prompt) <= max(prompt) < self._vocab:
            bad = next(t for t in prompt if not 0 <= t < self._vocab)
            raise BadRequest(
                f"token id {bad} is outside the vocabulary [0, {self._vocab})", param="prompt"
            )
        if seed is not None and not 0 <= seed <= MAX_SEED:
            raise BadRequest(f"seed must be between 0 and {MAX_SEED}", param="seed")

    async def run(self) -> None:
        """Step forever: admit, drop the cancelled, run one forward, sample."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._waiting and len(self._active) < self._max_batch:
                self._active.append(self._waiting.popleft())
            for seq in [s for s in self._active if s.cancelled]:
                await self._retire(seq)
            if self._metrics is not None:
                for seq in self._waiting:
                    if seq.cancelled:
                        self._metrics.ended("cancelled", None, None)
            self._waiting = deque(s for s in self._waiting if not s.cancelled)
            if not self._active:
                continue
            await self._step()
            self._wake.set()

    async def _step(self) -> None:
        """One forward of the batch, then one of a request running alone, if any."""
        together = self._batch([s for s in self._active if not s.alone])
        if together and not await self._run(together):
            return
        alone = self._batch([s for s in self._active if s.alone][:1])
        if alone:
            await self._run(alone)
        for seq in [s for s in self._active if s.cancelled or s.finished]:
            await self._retire(seq)

    def _batch(self, seqs: list[_Sequence]) -> list[tuple[_Sequence, Step]]:
        """Every decoding request, then prefill chunks shortest prompt first within the budget."""
        decoding = [s for s in seqs if s.fed and len(s.pending) == 1]
        prefilling = sorted((s for s in seqs if s not in decoding), key=lambda s: len(s.pending))
        batch: list[tuple[_Sequence, Step]] = []
        budget = float(self._prefill_chunk)
        for seq in decoding + prefilling:
            take = 1 if seq in decoding else self._affordable(seq, budget)
            if take == 0:
                continue
            if seq not in decoding:
                budget -= self._cost(seq.fed, take)
            data = np.asarray(seq.pending[:take], dtype=np.int64)
            wants_token = take == len(seq.pending)
            step = Step(
                StepInput(seq.req.request_id, data, seq.fed),
                seq.req.sampling if wants_token else None,
            )
            batch.append((seq, step))
        return batch

    def _cost(self, start: int, n: int) -> float:
        """The prefill budget n prompt tokens from position start use."""
        if self._attention_scale is None:
            return float(n)
        return n * (1.0 + (start + n / 2) / self._attention_scale)

    def _affordable(self, seq: _Sequence, budget: float) -> int:
        """How many of seq's pending tokens fit the budget (one at least, if nothing else did)."""
        if self._attention_scale is None:
            n = int(budget)
        else:  # the largest n with n·(1 + (start + n/2)/S) <= budget
            s, scale = seq.fed, self._attention_scale
            a = 1.0 + s / scale
            n = int((math.sqrt(a * a + 2.0 * budget / scale) - a) * scale)
        if budget >= self._prefill_chunk:
            n = max(n, 1)
        return max(0, min(len(seq.pending), n))

    async def _run(self, batch: list[tuple[_Sequence, Step]]) -> bool:
        """Forward one batch and take its tokens; False when the step failed."""
        try:
            tokens = await self._pipeline.forward([step for _, step in batch])
        except PipelineBroken as exc:
            if self._recover is not None:
                await self._failover(exc)
            else:
                await self._fail([seq for seq, _ in batch], exc)
            return False
        except Exception as exc:  # an engine failure ends its own request, not the node
            await self._isolate([seq for seq, _ in batch], exc)
            return False
        for (seq, step), token in zip(batch, tokens, strict=True):
            seq.fed += step.item.length
            del seq.pending[: step.item.length]
            if token is not None and not seq.cancelled:
                seq.alone = False
                self._advance(seq, token)
        return True

    async def _isolate(self, seqs: list[_Sequence], exc: Exception) -> None:
        """A step failed: alone, the request is the cause; together, each is retried alone.

        The failed step may have written some stages' caches, so the retried requests replay
        from their prompt and tokens so far (as after a failover), each by itself, until it
        samples a token again; one that fails alone is failed alone.
        """
        if len(seqs) == 1:
            log.warning("request %s failed: %s: %s", seqs[0].rid, type(exc).__name__, exc)
            await self._fail(seqs, exc)
            return
        log.warning(
            "a step of %d requests failed (%s: %s); retrying each alone",
            len(seqs),
            type(exc).__name__,
            exc,
        )
        for seq in seqs:
            await self._free(seq)
            seq.replay()
            seq.alone = True

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
            if self._metrics is not None:
                self._metrics.failover(resumed=False, replayed=0)
            await self._fail(list(self._active), err)
            return
        finally:
            with contextlib.suppress(Exception):
                await broken.close()
        for seq in self._active:
            await self._pipeline.free(seq.req.request_id)  # stale caches on surviving stages
            seq.replay()
        if self._metrics is not None:
            self._metrics.failover(resumed=True, replayed=len(self._active))
        log.info(
            "resumed %d request(s) after %.2f s, replaying their tokens as prefill",
            len(self._active),
            time.perf_counter() - started,
        )

    async def _fail(self, seqs: list[_Sequence], exc: BaseException) -> None:
        """End these requests with exc (their streams raise it), caches freed first."""
        for seq in seqs:
            if self._metrics is not None and not seq.finished:
                self._metrics.ended("error", None, None)
            seq.finished = True
            await self._retire(seq)
            seq.queue.put_nowait(exc)  # after the retire: the caller sees the error, cache freed

    def _advance(self, seq: _Sequence, token: int) -> None:
        """Take one sampled token: emit its text, or finish the sequence."""
        now = time.perf_counter()
        if seq.first_token_at is None:
            seq.first_token_at = now
            if self._metrics is not None:
                self._metrics.first_token(len(seq.req.prompt_tokens), now - seq.started)
        if token in self._tokenizer.eos_token_ids:
            return self._finish(seq, "stop")
        if self._metrics is not None:
            last = seq.last_token_at
            self._metrics.token(None if last is None else now - last)
        seq.last_token_at = now
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
        if self._metrics is not None:
            tpot = decode_s / (len(seq.tokens) - 1) if len(seq.tokens) > 1 else None
            self._metrics.ended(reason, time.perf_counter() - seq.started, tpot)
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
            if self._metrics is not None:
                self._metrics.ended("cancelled", None, None)
        try:
            await self._free(seq)
        finally:
            self._active.remove(seq)

    async def _free(self, seq: _Sequence) -> None:
        try:
            await self._pipeline.free(seq.req.request_id)
        except Exception as exc:  # a broken pipeline holds no cache worth freeing
            log.debug("freeing %s on a broken pipeline: %s", seq.rid, exc)
