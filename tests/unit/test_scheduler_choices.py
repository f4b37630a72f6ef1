"""The scheduler's n choices (one prefill, forked), constraints, logprobs and penalties, over
the fake engine in this process."""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

import numpy as np
import pytest

from shoal.engines.base import StepInput
from shoal.engines.fake import FakeEngine
from shoal.errors import BadRequest
from shoal.inference.pipeline import LocalPipeline, PipelineBroken, Step
from shoal.inference.request import Finished, GenerationRequest, SamplingParams, TextDelta
from shoal.inference.sampling import log_softmax
from shoal.inference.scheduler import Scheduler
from shoal.types.ids import ModelId, RequestId
from shoal.types.shard import Shard
from tests.helpers.fakes import VOCAB, ByteTokenizer
from tests.helpers.pipelines import Wrapping

pytestmark = pytest.mark.timeout(30)

PROMPT = "The choices share this prompt"


class CountingFake(FakeEngine):
    """The fake engine, counting the positions it runs; without `forks` it cannot copy a cache."""

    def __init__(self, forks: bool) -> None:
        super().__init__(vocab_size=VOCAB, hidden_size=16, seed=0)
        self.load(Shard.whole(ModelId("fake"), 2))
        self.positions = 0
        self.steps: list[list[tuple[str, int, int]]] = []  # (rid, start, length) per forward
        if not forks:  # as an engine that cannot copy a cache (mlx's)
            self.fork = self._cannot_fork  # type: ignore[method-assign]

    def _cannot_fork(self, source: RequestId, target: RequestId, length: int) -> None:
        raise ValueError("this engine cannot copy a request's cache")

    def forward(self, batch: Sequence[StepInput], *, all_logits: bool = False) -> list[np.ndarray]:
        out = super().forward(batch, all_logits=all_logits)
        self.positions += sum(item.length for item in batch)
        self.steps.append([(item.request_id, item.start, item.length) for item in batch])
        return out


@contextlib.asynccontextmanager
async def running(engine: FakeEngine, max_batch: int = 8) -> AsyncIterator[Scheduler]:
    scheduler = Scheduler(
        LocalPipeline([engine]), ByteTokenizer(), context_length=512, max_batch=max_batch
    )
    task = asyncio.create_task(scheduler.run())
    try:
        yield scheduler
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def request(n: int = 1, prompt: str = PROMPT, **sampling: Any) -> GenerationRequest:
    tokens = ByteTokenizer().encode(prompt, add_special_tokens=True)
    params = SamplingParams(**{"temperature": 0.0, "max_tokens": 10, **sampling})
    return GenerationRequest(RequestId("req"), ModelId("fake"), tuple(tokens), params, n=n)


async def choices(
    scheduler: Scheduler, req: GenerationRequest
) -> tuple[list[list[TextDelta]], list[Finished]]:
    deltas: list[list[TextDelta]] = [[] for _ in range(req.n)]
    done: list[Finished] = []
    async for event in scheduler.generate(req):
        if isinstance(event, TextDelta):
            deltas[event.index].append(event)
        else:
            done.append(event)
    return deltas, done


def ids(deltas: list[TextDelta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


async def test_three_greedy_choices_are_equal_and_share_one_prefill() -> None:
    engine = CountingFake(forks=True)
    req = request(3)
    async with running(engine) as scheduler:
        deltas, done = await choices(scheduler, req)
    assert sorted(d.index for d in done) == [0, 1, 2]
    assert ids(deltas[0]) == ids(deltas[1]) == ids(deltas[2]) != []
    prompt = len(req.prompt_tokens)
    generated = sum(d.completion_tokens for d in done)
    # the prompt once, then each other choice feeds only the prompt's last token itself
    assert engine.positions == prompt + 2 + generated - 3
    forked = [s for s in engine.steps if ("req.1", prompt - 1, 1) in s]
    assert forked and ("req", prompt - 1, 1) in forked[0] and ("req.2", prompt - 1, 1) in forked[0]
    assert all(d.prompt_tokens == prompt for d in done)


async def test_choices_alone_equal_the_request_alone() -> None:
    async with running(CountingFake(forks=True)) as scheduler:
        one, _ = await choices(scheduler, request(1))
        three, _ = await choices(scheduler, request(3))
    assert ids(one[0]) == ids(three[2])


async def test_an_engine_that_cannot_fork_still_answers_every_choice() -> None:
    engine = CountingFake(forks=False)
    async with running(engine) as scheduler:
        deltas, done = await choices(scheduler, request(3))
    assert len(done) == 3
    assert ids(deltas[0]) == ids(deltas[1]) == ids(deltas[2]) != []


async def test_a_one_token_prompt_needs_no_fork() -> None:
    engine = CountingFake(forks=True)
    req = GenerationRequest(
        RequestId("req"), ModelId("fake"), (5,), SamplingParams(temperature=0.0, max_tokens=4), n=2
    )
    async with running(engine) as scheduler:
        deltas, done = await choices(scheduler, req)
    assert len(done) == 2 and ids(deltas[0]) == ids(deltas[1])


async def test_seeded_choices_differ_from_each_other_and_repeat_across_runs() -> None:
    req = request(3, temperature=1.5, seed=11, max_tokens=12)
    async with running(CountingFake(forks=True)) as scheduler:
        first, _ = await choices(scheduler, req)
        again, _ = await choices(scheduler, req)
    assert [ids(d) for d in first] == [ids(d) for d in again]
    assert len({tuple(ids(d)) for d in first}) > 1


async def test_n_past_the_batch_is_refused() -> None:
    async with running(CountingFake(forks=True), max_batch=4) as scheduler:
        with pytest.raises(BadRequest, match="n must be"):
            scheduler.generate(request(5))


class OnlyTokens:
    """A stand-in Constraint: any of `tokens`, finished after `length` of them."""

    def __init__(self, tokens: set[int], length: int) -> None:
        self.tokens, self.length = tokens, length
        self.seen: list[int] = []
        self.masks = 0

    def allowed(self) -> np.ndarray:
        self.masks += 1
        words = np.zeros(-(-VOCAB // 32), dtype=np.uint32)
        for t in self.tokens:
            words[t // 32] |= np.uint32(1 << (t % 32))
        return words

    def advance(self, token: int) -> None:
        assert token in self.tokens, f"sampled {token} outside the mask"
        self.seen.append(token)

    @property
    def finished(self) -> bool:
        return len(self.seen) >= self.length


async def test_a_constraint_masks_every_choice_and_ends_it_with_stop() -> None:
    allowed = {ord("a") + 3, ord("b") + 3}  # ByteTokenizer: byte b is token b + 3
    made: list[OnlyTokens] = []

    def factory() -> OnlyTokens:
        made.append(OnlyTokens(allowed, 5))
        return made[-1]

    req = request(2, temperature=1.0, seed=3, max_tokens=50)
    req = GenerationRequest(
        req.request_id, req.model_id, req.prompt_tokens, req.sampling, n=2, constraint=factory
    )
    async with running(CountingFake(forks=True)) as scheduler:
        deltas, done = await choices(scheduler, req)
    assert len(made) == 2
    assert [d.reason for d in done] == ["stop", "stop"]
    for choice in deltas:
        text = "".join(d.text for d in choice)
        assert len(text) == 5 and set(text) <= {"a", "b"}
    assert all(c.masks == 5 for c in made)


async def test_logprobs_are_the_engine_logits_log_softmax() -> None:
    req = request(1, max_tokens=6, logprobs=3)
    async with running(CountingFake(forks=True)) as scheduler:
        deltas, _ = await choices(scheduler, req)
    lps = [lp for d in deltas[0] for lp in d.logprobs]
    tokens = ids(deltas[0])
    assert [lp.token for lp in lps] == tokens
    # the same positions computed by a fresh engine directly
    engine = CountingFake(forks=False)
    seq = np.array([*req.prompt_tokens, *tokens], dtype=np.int64)
    logits = engine.forward([StepInput(RequestId("x"), seq, 0)], all_logits=True)[0]
    for i, lp in enumerate(lps):
        expected = log_softmax(logits[len(req.prompt_tokens) - 1 + i])
        assert lp.logprob == pytest.approx(expected[lp.token], abs=1e-6)
        assert [t for t, _ in lp.top] == list(np.argsort(-expected)[:3])
        assert lp.top[0][1] == pytest.approx(expected.max(), abs=1e-6)


async def test_frequency_penalty_makes_greedy_repeat_less() -> None:
    async with running(CountingFake(forks=True)) as scheduler:
        plain, _ = await choices(scheduler, request(1, max_tokens=40))
        penalized, _ = await choices(scheduler, request(1, max_tokens=40, frequency_penalty=2.0))
    plain_ids, pen_ids = ids(plain[0]), ids(penalized[0])

    def repeats(tokens: list[int]) -> int:
        return len(tokens) - len(set(tokens))

    assert repeats(pen_ids) < repeats(plain_ids)


async def test_logit_bias_forces_a_token_through_the_scheduler() -> None:
    forced = ord("z") + 3
    async with running(CountingFake(forks=True)) as scheduler:
        req = request(1, max_tokens=5, logit_bias=((forced, 100.0),))
        deltas, _ = await choices(scheduler, req)
    assert ids(deltas[0]) == [forced] * 5


class Breaking(Wrapping):
    """A pipeline that breaks (like a lost stage) on its nth forward."""

    def __init__(self, inner: LocalPipeline, at: int) -> None:
        super().__init__(inner)
        self.at, self.calls = at, 0

    async def forward(self, steps: Sequence[Step]) -> Sequence[int | None]:
        self.calls += 1
        if self.calls == self.at:
            raise PipelineBroken("stage 127.0.0.1:9 lost")
        return await self.inner.forward(steps)


@pytest.mark.parametrize("at", [1, 2, 5])  # in the prefill, at the fork, while decoding
async def test_a_failover_replays_choices_penalties_and_constraints_without_a_seam(
    at: int,
) -> None:
    def factory() -> OnlyTokens:
        return OnlyTokens({ord(c) + 3 for c in "abcdefgh"}, 9)

    ask: Any = {
        "temperature": 1.2,
        "seed": 4,
        "max_tokens": 30,
        "frequency_penalty": 1.0,
        "repetition_penalty": 1.2,
    }
    req = request(3, **ask)
    req = GenerationRequest(
        req.request_id, req.model_id, req.prompt_tokens, req.sampling, n=3, constraint=factory
    )
    async with running(CountingFake(forks=True)) as scheduler:
        expected, _ = await choices(scheduler, req)

    async def recover(exc: PipelineBroken) -> LocalPipeline:
        return LocalPipeline([CountingFake(forks=True)])  # a fresh instance: empty caches

    broken = Breaking(LocalPipeline([CountingFake(forks=True)]), at=at)
    scheduler = Scheduler(broken, ByteTokenizer(), context_length=512, recover=recover)
    task = asyncio.create_task(scheduler.run())
    try:
        got, done = await choices(scheduler, req)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert [ids(d) for d in got] == [ids(d) for d in expected]
    assert len({tuple(ids(d)) for d in got}) > 1  # seeded choices differ
    assert [d.reason for d in sorted(done, key=lambda d: d.index)] == ["stop"] * 3
