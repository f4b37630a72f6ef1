"""The decode scheduler: continuous batching over one pipeline.

Every step runs one forward holding every decoding request (one token each) plus at most one
prefill chunk (shortest prompt first), so a long prompt delays the streams already running by at
most one chunk a step, and requests join and leave between steps. Sampling, detokenisation and
stop handling happen here, per request.

A request of n choices is n sequences sharing one event queue: the first prefills the prompt but
its last token; the others then start from a copy of that cache (the step's `fork`) and all n
feed the last prompt token in one step, each sampling its own first token. A constrained request
asks each choice's Constraint for the mask before every step that samples, and advances it with
the token.

With a prefix index (inference/prefix.py), a finished request's caches are kept on the stages,
and a new request whose prompt begins with tokens one of them holds starts from a copy of it
(its first step's `fork`, run alone: if a stage no longer holds it, only that request fails the
step, and it is prefilled from scratch).

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
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Protocol

import numpy as np

from shoal.engines.base import StepInput
from shoal.errors import BadRequest, ContextOverflow, Overloaded
from shoal.inference.constraint import Constraint
from shoal.inference.metrics import ModelMetrics
from shoal.inference.pipeline import Pipeline, PipelineBroken, Sampled, Step
from shoal.inference.prefix import PrefixIndex
from shoal.inference.request import (
    Finished,
    FinishReason,
    GenerationEvent,
    GenerationRequest,
    SamplingParams,
    TextDelta,
    TokenLogprob,
)
from shoal.inference.sampling import MAX_TOP_LOGPROBS
from shoal.inference.speculate import SKIP_AFTER_MISS, prompt_lookup
from shoal.inference.stops import StopMatcher
from shoal.net.frames import MAX_LOGIT_BIAS, MAX_VERIFY
from shoal.types.ids import RequestId

log = logging.getLogger(__name__)

Recover = Callable[[PipelineBroken], Awaitable[Pipeline]]  # a working pipeline, or raises

ATTENTION_SCALE = 2.0  # a prompt token at position p costs 1 + p / (2 · hidden size): see below
MAX_SEED = 2**63 - 1  # seeds travel as JSON integers and seed numpy's generator: 0 ..= int64 max


def choice_seed(seed: int | None, index: int) -> int | None:
    """Choice index's seed: the request's for the first, a distinct one (still replay-safe:
    a function of the seed and the index alone) for the others."""
    if seed is None or index == 0:
        return seed
    return (seed * 0x9E3779B97F4A7C15 + index) % (MAX_SEED + 1)


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
    """One choice's progress through generation (a request of n choices has n)."""

    req: GenerationRequest
    text: TextStream
    stops: StopMatcher
    sampling: SamplingParams  # the request's, with this choice's seed
    rid: RequestId  # the request's id for the first choice, `<id>.<index>` for the others
    index: int = 0
    constraint: Constraint | None = None
    # a choice waiting to start from a copy of the first choice's prompt cache (None: started)
    parent: "_Sequence | None" = None
    children: list["_Sequence"] = field(default_factory=list)  # the first choice's others
    queue: asyncio.Queue[GenerationEvent | BaseException] = field(default_factory=asyncio.Queue)
    pending: list[int] = field(default_factory=list)  # tokens to feed next
    fed: int = 0  # positions in the pipeline's cache
    tokens: list[int] = field(default_factory=list)  # generated so far (replayed on failover)
    unsent: list[int] = field(default_factory=list)  # token ids whose text is not out yet
    unsent_logprobs: list[TokenLogprob] = field(default_factory=list)
    started: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    last_token_at: float | None = None  # when the latest token was generated
    cancelled: bool = False  # the caller went away
    finished: bool = False
    failed: bool = False  # ended by an error: its caches are not worth keeping
    donor: RequestId | None = None  # a kept cache its first step starts from (prefix caching)
    cached: int = 0  # prompt tokens it took from a kept cache instead of prefilling
    rewind: bool = False  # its caches hold rejected drafts: its next step drops them first
    no_drafts: int = 0  # decode steps to take without drafting (after a verify that kept none)
    alone: bool = False  # in a step that failed: runs by itself until it samples again

    @property
    def waiting_fork(self) -> list["_Sequence"]:
        """The other choices still waiting for this one's prompt cache."""
        return [c for c in self.children if c.parent is self and not c.cancelled]

    def replay(self) -> None:
        """Feed prompt + tokens so far again from position 0 (its caches are gone); a choice
        still waiting for its fork keeps waiting (it has no cache yet)."""
        if self.parent is not None:
            return
        self.pending = [*self.req.prompt_tokens, *self.tokens]
        self.fed = 0
        if self.donor is not None:  # its kept cache was never used: it prefills it all
            self.cached = 0
        self.donor = None
        self.rewind = False


class RequestStream:
    """One request's events until every choice's Finished; closing it, or dropping it, cancels
    the request."""

    def __init__(self, seqs: list[_Sequence], wake: asyncio.Event) -> None:
        self._seqs = seqs
        self._queue = seqs[0].queue  # the choices share it
        self._wake = wake
        self._done = False
        self._finished = 0

    def __aiter__(self) -> "RequestStream":
        return self

    async def __anext__(self) -> GenerationEvent:
        if self._done:
            raise StopAsyncIteration
        try:
            event = await self._queue.get()
        except BaseException:  # cancelled while waiting: the caller is gone
            self._cancel()
            raise
        if isinstance(event, BaseException):
            self._cancel()
            raise event
        if isinstance(event, Finished):
            self._finished += 1
            self._done = self._finished == len(self._seqs)
        return event

    async def aclose(self) -> None:
        self._cancel()

    def _cancel(self) -> None:
        self._done = True
        if not all(seq.cancelled for seq in self._seqs):
            for seq in self._seqs:
                seq.cancelled = True
            self._wake.set()

    def __del__(self) -> None:
        # a stream nobody iterates or closes (its HTTP response never started) stops generating
        for seq in self._seqs:
            seq.cancelled = True


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
        prefix: PrefixIndex | None = None,  # kept caches to start prompts from (None: none kept)
        speculate: int = 0,  # draft tokens a greedy decode step verifies (inference/speculate.py)
    ) -> None:
        self._pipeline = pipeline
        self._metrics = metrics
        self._prefix = prefix
        self._speculate = max(0, min(speculate, MAX_VERIFY - 1))
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
        self._waiting: deque[list[_Sequence]] = deque()  # requests: each its choices
        self._active: list[_Sequence] = []
        self._wake = asyncio.Event()

    @property
    def load(self) -> int:
        """Requests running or queued here."""
        return self.running + len(self._waiting)

    @property
    def running(self) -> int:
        """Requests in the batch (prefilling or decoding)."""
        return sum(1 for s in self._active if s.index == 0)

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
        seqs = self._choices(req)
        self._waiting.append(seqs)
        self._wake.set()
        return RequestStream(seqs, self._wake)

    def _choices(self, req: GenerationRequest) -> list[_Sequence]:
        """The request's n choices; after the first, each waits to fork its prompt cache."""
        queue: asyncio.Queue[GenerationEvent | BaseException] = asyncio.Queue()
        prompt = list(req.prompt_tokens)
        seqs: list[_Sequence] = []
        for i in range(req.n):
            seq = _Sequence(
                req=req,
                text=self._tokenizer.stream(),
                stops=StopMatcher(req.sampling.stop),
                sampling=replace(req.sampling, seed=choice_seed(req.sampling.seed, i)),
                rid=req.request_id if i == 0 else RequestId(f"{req.request_id}.{i}"),
                index=i,
                constraint=None if req.constraint is None else req.constraint(),
                queue=queue,
                pending=list(prompt),
            )
            if i and len(prompt) > 1:  # starts from choice 0's cache of prompt[:-1]
                seq.parent, seq.fed, seq.pending = seqs[0], len(prompt) - 1, prompt[-1:]
                seqs[0].children.append(seq)
            seqs.append(seq)
        return seqs

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
        if not 1 <= req.n <= self._max_batch:
            raise BadRequest(f"n must be between 1 and {self._max_batch} here", param="n")
        self._check_sampling(req.sampling)

    def _check_sampling(self, s: SamplingParams) -> None:
        if s.repetition_penalty <= 0:
            raise BadRequest("repetition_penalty must be above 0", param="repetition_penalty")
        if not 0.0 <= s.min_p <= 1.0:
            raise BadRequest("min_p must be between 0 and 1", param="min_p")
        if s.logprobs is not None and not 0 <= s.logprobs <= MAX_TOP_LOGPROBS:
            raise BadRequest(f"at most {MAX_TOP_LOGPROBS} top logprobs", param="top_logprobs")
        if len(s.logit_bias) > MAX_LOGIT_BIAS:
            raise BadRequest(f"at most {MAX_LOGIT_BIAS} logit_bias entries", param="logit_bias")
        bad = [t for t, _ in s.logit_bias if not 0 <= t < (self._vocab or t + 1)]
        if bad:
            raise BadRequest(
                f"token id {bad[0]} is outside the vocabulary [0, {self._vocab})",
                param="logit_bias",
            )

    async def run(self) -> None:
        """Step forever: admit, drop the cancelled, run one forward, sample."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._waiting and len(self._active) + len(self._waiting[0]) <= self._max_batch:
                group = self._waiting.popleft()
                self._reuse(group[0])
                self._active.extend(group)
            for seq in [s for s in self._active if s.cancelled]:
                await self._retire(seq)
            if self._metrics is not None:
                for group in self._waiting:
                    if group[0].cancelled:
                        self._metrics.ended("cancelled", None, None)
            self._waiting = deque(g for g in self._waiting if not g[0].cancelled)
            if not self._active:
                continue
            await self._step()
            self._wake.set()

    def _reuse(self, seq: _Sequence) -> None:
        """Start the request's prompt from the kept cache holding most of it, if any."""
        if self._prefix is None or seq.sampling.penalized or seq.cancelled:
            return  # penalties count every prompt token the last stage is sent
        prompt = seq.req.prompt_tokens
        hit = self._prefix.lookup(prompt)
        reused = 0
        if hit is not None:
            seq.donor, reused = hit
            seq.fed, seq.pending, seq.cached = reused, list(prompt[reused:]), reused
            seq.alone = True  # if the stages let go of it, this step alone fails
        if self._metrics is not None:
            self._metrics.prefix(len(prompt), reused)

    async def _step(self) -> None:
        """One forward of the batch, then one of a request running alone, if any (or the one
        request's whole prompt, its chunks pipelined)."""
        if (long := self._pipelined()) is not None:
            await self._prefill_pipelined(long)
            for seq in [s for s in self._active if s.cancelled or s.finished]:
                await self._retire(seq)
            return
        together = self._batch([s for s in self._ready() if not s.alone])
        if together and not await self._run(together):
            return
        alone = self._batch([s for s in self._ready() if s.alone][:1])
        if alone:
            await self._run(alone)
        for seq in [s for s in self._active if s.cancelled or s.finished]:
            await self._retire(seq)

    def _ready(self) -> list[_Sequence]:
        """The sequences a step may hold (a choice waiting to fork joins its first choice's)."""
        return [s for s in self._active if s.parent is None and not s.finished]

    def _batch(self, seqs: list[_Sequence]) -> list[tuple[_Sequence, Step]]:
        """Every decoding request, then prefill chunks shortest prompt first within the budget."""
        decoding = [s for s in seqs if s.fed and len(s.pending) == 1]
        prefilling = sorted((s for s in seqs if s not in decoding), key=lambda s: len(s.pending))
        batch: list[tuple[_Sequence, Step]] = []
        budget = float(self._prefill_chunk)
        speculating = self._speculate > 0 and not prefilling  # logits at every position: small
        for seq in decoding + prefilling:
            take = 1 if seq in decoding else self._affordable(seq, budget)
            drafts = self._drafts(seq) if speculating else []
            if seq.waiting_fork:  # stop before the last prompt token: the choices fork there
                take = min(take, max(len(seq.req.prompt_tokens) - 1 - seq.fed, 1))
            if take == 0:
                continue
            if seq not in decoding:
                budget -= self._cost(seq.fed, take)
            if (step := self._step_of(seq, take, drafts=drafts)) is not None:
                batch.append((seq, step))
            if seq.waiting_fork and seq.fed == len(seq.req.prompt_tokens) - 1:
                for child in seq.waiting_fork:  # from a copy of seq's cache, before this step
                    if (forked := self._step_of(child, 1, fork=seq.rid)) is not None:
                        batch.append((child, forked))
        return batch

    def _drafts(self, seq: _Sequence) -> list[int]:
        """Tokens for seq's next step to verify (prompt lookup); [] when it should not."""
        s = seq.sampling
        plain = s.temperature == 0.0 and not (s.penalized or s.logit_bias or s.logprobs is not None)
        if not plain or seq.constraint is not None or seq.children:
            return []
        if seq.no_drafts:
            seq.no_drafts -= 1
            return []
        room = min(self._speculate, self._context - seq.fed - 2)
        if s.max_tokens is not None:
            room = min(room, s.max_tokens - len(seq.tokens) - 1)
        return prompt_lookup([*seq.req.prompt_tokens, *seq.tokens], room) if room > 0 else []

    def _step_of(
        self,
        seq: _Sequence,
        take: int,
        fork: RequestId | None = None,
        drafts: Sequence[int] = (),
    ) -> Step | None:
        """The step feeding seq's next `take` tokens (and drafts to verify after them); None if
        its constraint allows nothing (it is finished then)."""
        data = np.asarray([*seq.pending[:take], *drafts], dtype=np.int64)
        wants_token = take == len(seq.pending)
        mask = None
        if wants_token and seq.constraint is not None:
            mask = seq.constraint.allowed()
            if mask is not None and not mask.any():
                self._finish(seq, "stop")
                return None
        return Step(
            StepInput(seq.rid, data, seq.fed),
            seq.sampling if wants_token else None,
            fork=fork or seq.donor,
            mask=mask,
            prompt_len=len(seq.req.prompt_tokens) if seq.sampling.penalized else None,
            verify=bool(drafts),
            rewind=seq.rewind,
        )

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
        except Exception as exc:
            speculative = any(s.verify or s.rewind for _, s in batch)
            if speculative and not isinstance(exc, PipelineBroken):
                # an engine that cannot drop positions, say: no more speculation here, and
                # every request of the step is replayed alone (one at fault fails then)
                log.warning("a speculative step failed (%s): speculating no more here", exc)
                self._speculate = 0
                for seq, _ in batch:
                    await self._free(seq)
                    seq.replay()
                    seq.alone = True
                return False
            await self._failed([seq for seq, _ in batch], exc)
            return False
        self._took(batch, tokens)
        return True

    def _pipelined(self) -> _Sequence | None:
        """The one request running, when what is left of its prompt spans several chunks: its
        chunks then go out at once, and a split model's stages work on them side by side. With
        other requests running, chunks go one a step beside their decodes instead."""
        ready = self._ready()
        if self._pipeline.depth < 2 or len(self._active) != 1 or len(ready) != 1:
            return None
        seq = ready[0]
        return seq if len(seq.pending) > self._prefill_chunk and not seq.children else None

    async def _prefill_pipelined(self, seq: _Sequence) -> None:
        """Send the next chunks of seq's prompt at once, two per stage (then the loop admits any
        newcomer before the next ones go); the prompt's last chunk samples."""
        steps: list[Step] = []
        at, size, total = 0, self._prefill_chunk, len(seq.pending)
        window = min(total, 2 * self._pipeline.depth * size)
        while at < window:
            take = min(size, window - at)
            last = at + take == total
            mask = seq.constraint.allowed() if last and seq.constraint is not None else None
            if mask is not None and not mask.any():
                self._finish(seq, "stop")
                return
            data = np.asarray(seq.pending[at : at + take], dtype=np.int64)
            steps.append(
                Step(
                    StepInput(seq.rid, data, seq.fed + at),
                    seq.sampling if last else None,
                    fork=seq.donor if at == 0 else None,
                    mask=mask,
                    prompt_len=len(seq.req.prompt_tokens) if seq.sampling.penalized else None,
                )
            )
            at += take
        try:
            results = await self._pipeline.forward_all([[step] for step in steps])
        except Exception as exc:
            await self._failed([seq], exc)
            return
        for step, tokens in zip(steps, results, strict=True):
            self._took([(seq, step)], tokens)

    async def _failed(self, seqs: list[_Sequence], exc: Exception) -> None:
        """A step of seqs failed: a lost stage is a failover; an engine's failure ends its own
        request, not the node (or is a kept prefix a stage let go of: prefilled instead)."""
        if isinstance(exc, PipelineBroken):
            if self._recover is not None:
                await self._failover(exc)
            else:
                await self._fail(seqs, exc)
            return
        seqs = list(seqs)
        for seq in [s for s in seqs if s.donor is not None]:
            log.info("request %s: its prefix is no longer kept (%s); prefilling", seq.rid, exc)
            if self._prefix is not None and seq.donor is not None:
                self._prefix.drop(seq.donor)
            await self._free(seq)
            seq.replay()
            seqs.remove(seq)
        if seqs:
            await self._isolate(seqs, exc)

    def _took(self, batch: list[tuple[_Sequence, Step]], tokens: Sequence[int | None]) -> None:
        """A batch's step ran: advance each sequence, and take the tokens sampled."""
        for (seq, step), token in zip(batch, tokens, strict=True):
            seq.rewind = False  # done at this step's start
            if step.verify and isinstance(token, Sampled) and not seq.cancelled:
                self._accept(seq, step, token)
                continue
            seq.fed += step.item.length
            del seq.pending[: step.item.length]
            if seq.donor is not None:  # started from a kept cache: joins the batch from now on
                seq.alone = False
            seq.parent = seq.donor = None  # forked, if it was waiting to
            if token is not None and not seq.cancelled:
                seq.alone = False
                self._advance(seq, token)

    def _accept(self, seq: _Sequence, step: Step, token: Sampled) -> None:
        """A verify step's answer: the drafts up to the first the model disagrees with, and the
        model's own token there (so the output is plain greedy's)."""
        drafts = [int(t) for t in step.item.data[1:]]
        picks = [int(token), *token.following]  # picks[i]: the greedy token after data[i]
        kept = 0
        while kept < len(drafts) and drafts[kept] == picks[kept]:
            kept += 1
        seq.fed += 1 + kept  # the fed token and the kept drafts are cached
        seq.rewind = kept < len(drafts)  # and the rejected ones after them, until the next step
        seq.no_drafts = 0 if kept else SKIP_AFTER_MISS
        seq.alone = False
        if self._metrics is not None:
            self._metrics.speculated(len(drafts), kept)
        for pick in picks[: kept + 1]:
            if seq.finished:
                break
            self._advance(seq, pick)

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
            seq.parent = None  # a failed fork (an engine that cannot copy a cache) prefills
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
            await self._pipeline.free(seq.rid)  # stale caches on surviving stages
            seq.replay()
        for rid in self._prefix.clear() if self._prefix is not None else []:
            await self._pipeline.free(rid)  # the new pipeline's stages keep none of them
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
            seq.finished = seq.failed = True
            await self._retire(seq)
            seq.queue.put_nowait(exc)  # after the retire: the caller sees the error, cache freed

    def _advance(self, seq: _Sequence, token: int) -> None:
        """Take one sampled token: emit its text, or finish the sequence."""
        now = time.perf_counter()
        if seq.first_token_at is None:
            seq.first_token_at = now
            if self._metrics is not None and seq.index == 0:  # the prompt counts once
                self._metrics.first_token(len(seq.req.prompt_tokens), now - seq.started)
        lp = token.logprob if isinstance(token, Sampled) else None
        if seq.constraint is not None:
            seq.constraint.advance(int(token))
        if token in self._tokenizer.eos_token_ids:
            return self._finish(seq, "stop")
        if self._metrics is not None:
            last = seq.last_token_at
            self._metrics.token(None if last is None else now - last)
        seq.last_token_at = now
        token = int(token)  # from here on a plain id (a Sampled's logprob goes on below)
        seq.tokens.append(token)
        seq.unsent.append(token)
        if lp is not None:
            seq.unsent_logprobs.append(lp)
        emit, stopped = seq.stops.push(seq.text.push(token))
        if emit:
            self._emit(seq, emit)
        if stopped:
            return self._finish(seq, "stop", flush=False)
        if seq.constraint is not None and seq.constraint.finished:
            return self._finish(seq, "stop")
        limit = seq.req.sampling.max_tokens
        if (limit is not None and len(seq.tokens) >= limit) or seq.fed + 1 >= self._context:
            return self._finish(seq, "length")
        seq.pending = [token]

    def _finish(self, seq: _Sequence, reason: FinishReason, *, flush: bool = True) -> None:
        if flush:
            held = seq.text.flush()
            if reason == "length" and held.endswith("\ufffd") and not held.endswith("\ufffd" * 2):
                held = held[:-1]  # the character the limit cut is left out, not sent as U+FFFD
            tail, _ = seq.stops.push(held)
            tail += seq.stops.flush()
            if tail or seq.unsent:
                self._emit(seq, tail)
        first = seq.first_token_at or time.perf_counter()
        decode_s = time.perf_counter() - first
        rate = (len(seq.tokens) - 1) / decode_s if len(seq.tokens) > 1 and decode_s > 0 else 0.0
        done = Finished(
            reason,
            len(seq.req.prompt_tokens),
            len(seq.tokens),
            first - seq.started,
            rate,
            seq.index,
            seq.cached,
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

    def _emit(self, seq: _Sequence, text: str) -> None:
        """Text out, with the ids (and logprobs) of the tokens not sent yet."""
        delta = TextDelta(text, tuple(seq.unsent), tuple(seq.unsent_logprobs), seq.index)
        seq.queue.put_nowait(delta)
        seq.unsent.clear()
        seq.unsent_logprobs.clear()

    async def _retire(self, seq: _Sequence) -> None:
        """Free the request's cache on every stage, then leave the batch (and the load count)."""
        if not seq.finished:
            log.info("request %s cancelled after %d tokens", seq.rid, len(seq.tokens))
            if self._metrics is not None:
                self._metrics.ended("cancelled", None, None)
        try:
            await self._keep_or_free(seq)
        finally:
            self._active.remove(seq)

    async def _free(self, seq: _Sequence) -> None:
        try:
            await self._pipeline.free(seq.rid)
        except Exception as exc:  # a broken pipeline holds no cache worth freeing
            log.debug("freeing %s on a broken pipeline: %s", seq.rid, exc)

    async def _keep_or_free(self, seq: _Sequence) -> None:
        """A leaving request's caches: kept for prefixes (the first choice of one that did not
        fail), else freed; the entries the index lets go of are freed too."""
        unstarted = seq.donor is not None  # its fork never ran: it holds nothing yet
        if self._prefix is None or seq.failed or seq.index != 0 or seq.fed == 0 or unstarted:
            await self._free(seq)
            return
        held = [*seq.req.prompt_tokens, *seq.tokens][: seq.fed]
        gone = self._prefix.add(seq.rid, held)
        try:
            if seq.rid not in gone:
                await self._pipeline.free(seq.rid, keep=True)
            for rid in gone:
                await self._pipeline.free(rid)
        except Exception as exc:  # a broken pipeline holds no cache worth keeping
            log.debug("keeping %s on a broken pipeline: %s", seq.rid, exc)
            self._prefix.drop(seq.rid)
