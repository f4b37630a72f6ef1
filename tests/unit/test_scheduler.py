"""The decode scheduler over the fake engine: batching, stops, limits, cancellation."""

import asyncio
import contextlib

import pytest

from shoal.errors import BadRequest, ModelUnavailable, Overloaded
from shoal.inference.pipeline import LocalPipeline, PipelineBroken
from shoal.inference.request import Finished, GenerationRequest, SamplingParams, TextDelta
from shoal.inference.scheduler import Scheduler
from shoal.types.ids import ModelId, RequestId
from tests.helpers.fakes import ByteTokenizer, fake_engine, fake_scheduler
from tests.helpers.pipelines import Wrapping

pytestmark = pytest.mark.timeout(30)


def request(rid: str, prompt: str, **sampling: object) -> GenerationRequest:
    tokens = ByteTokenizer().encode(prompt, add_special_tokens=True)
    params = SamplingParams(**{"temperature": 0.0, "max_tokens": 12, **sampling})  # type: ignore[arg-type]
    return GenerationRequest(RequestId(rid), ModelId("fake"), tuple(tokens), params)


async def run(scheduler: Scheduler, req: GenerationRequest) -> tuple[list[int], str, Finished]:
    ids: list[int] = []
    text = ""
    async for event in scheduler.generate(req):
        if isinstance(event, TextDelta):
            ids.extend(event.token_ids)
            text += event.text
        else:
            return ids, text, event
    raise AssertionError("no Finished event")


@contextlib.asynccontextmanager
async def running(scheduler: Scheduler):
    task = asyncio.create_task(scheduler.run())
    try:
        yield scheduler
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_greedy_is_deterministic_and_stops_at_max_tokens() -> None:
    async with running(fake_scheduler()) as s:
        first = await run(s, request("a", "hello"))
        second = await run(s, request("b", "hello"))
    assert first[0] == second[0] and len(first[0]) == 12
    assert first[2].reason == "length" and first[2].completion_tokens == 12
    assert first[2].prompt_tokens == 6


async def test_concurrent_requests_equal_each_alone() -> None:
    prompts = ["one", "two two", "three three three", "four!"]
    async with running(fake_scheduler(prefill_chunk=4)) as s:
        alone = [await run(s, request(f"alone-{i}", p)) for i, p in enumerate(prompts)]
        together = await asyncio.gather(
            *(run(s, request(f"t-{i}", p)) for i, p in enumerate(prompts))
        )
    assert [t[0] for t in together] == [a[0] for a in alone]


async def test_more_requests_than_the_batch_queue_and_all_finish() -> None:
    async with running(fake_scheduler(max_batch=2)) as s:
        results = await asyncio.gather(*(run(s, request(f"r{i}", "q")) for i in range(5)))
    assert all(r[2].completion_tokens == 12 for r in results)


async def test_eos_ends_with_stop() -> None:
    async with running(fake_scheduler()) as s:
        ids, _, _ = await run(s, request("a", "hello"))
    eos = ids[3]
    first = ids.index(eos)
    async with running(fake_scheduler(tokenizer=ByteTokenizer(frozenset({eos})))) as s:
        ids2, _, done = await run(s, request("a", "hello"))
    assert done.reason == "stop" and ids2 == ids[:first]


async def test_stop_string_cuts_the_text() -> None:
    async with running(fake_scheduler()) as s:
        _, text, _ = await run(s, request("a", "hello", max_tokens=40))
    stop = text[5:7]
    assert stop and stop not in text[:5]
    async with running(fake_scheduler()) as s:
        _, cut, done = await run(s, request("a", "hello", max_tokens=40, stop=(stop,)))
    assert done.reason == "stop" and cut == text[: text.index(stop)]


async def test_context_full_finishes_with_length() -> None:
    async with running(fake_scheduler(context_length=10)) as s:
        _, _, done = await run(s, request("a", "abc", max_tokens=None))
    assert done.reason == "length" and done.prompt_tokens + done.completion_tokens == 10


async def test_closing_the_stream_cancels_and_frees_the_cache() -> None:
    engine = fake_engine(delay_s=0.005)
    async with running(fake_scheduler(engine)) as s:
        stream = s.generate(request("gone", "hello", max_tokens=400))
        async for _ in stream:
            break
        await stream.aclose()
        for _ in range(100):
            if s.load == 0:
                break
            await asyncio.sleep(0.01)
        assert s.load == 0
        assert "gone" not in engine._states  # the cache is freed
        ids, _, _ = await run(s, request("next", "hello"))  # and the next request is served
    assert len(ids) == 12


async def test_engine_failure_fails_the_request_not_the_scheduler() -> None:
    engine = fake_engine()
    async with running(fake_scheduler(engine)) as s:
        broken = request("bad", "hello")
        engine.forward = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom"))  # type: ignore[method-assign]
        with pytest.raises(RuntimeError, match="boom"):
            await run(s, broken)
        del engine.forward
        ids, _, _ = await run(s, request("ok", "hello"))
    assert len(ids) == 12


class Breaking(Wrapping):
    """A pipeline that breaks (like a lost stage) on its nth forward."""

    def __init__(self, inner: LocalPipeline, at: int) -> None:
        super().__init__(inner)
        self.at, self.calls = at, 0

    async def forward(self, steps):
        self.calls += 1
        if self.calls == self.at:
            raise PipelineBroken("stage 127.0.0.1:9 lost")
        return await self.inner.forward(steps)


async def test_a_broken_pipeline_is_replaced_and_requests_replayed_without_a_seam() -> None:
    prompts = ["alpha", "beta beta", "gamma"]
    async with running(fake_scheduler()) as s:
        expected = [await run(s, request(f"x{i}", p, max_tokens=20)) for i, p in enumerate(prompts)]
    recovered: list[str] = []

    async def recover(exc: PipelineBroken) -> LocalPipeline:
        recovered.append(str(exc))
        return LocalPipeline([fake_engine()])  # a fresh instance: empty caches

    broken = Breaking(LocalPipeline([fake_engine()]), at=6)
    scheduler = Scheduler(broken, ByteTokenizer(), context_length=512, recover=recover)
    async with running(scheduler) as s:
        runs = (run(s, request(f"y{i}", p, max_tokens=20)) for i, p in enumerate(prompts))
        got = await asyncio.gather(*runs)
    assert recovered == ["stage 127.0.0.1:9 lost"]
    assert [g[0] for g in got] == [e[0] for e in expected]  # same tokens, none repeated
    assert [g[1] for g in got] == [e[1] for e in expected]  # same text


async def test_no_capacity_coming_back_fails_the_requests_with_the_reason() -> None:
    async def recover(exc: PipelineBroken) -> LocalPipeline:
        raise ModelUnavailable("the remaining nodes cannot hold the model")

    broken = Breaking(LocalPipeline([fake_engine()]), at=3)
    scheduler = Scheduler(broken, ByteTokenizer(), context_length=512, recover=recover)
    async with running(scheduler) as s:
        with pytest.raises(ModelUnavailable, match="cannot hold"):
            await run(s, request("z", "hello"))
        assert s.load == 0


# ---- one request never hurts another ----


class Poisoned(Wrapping):
    """A pipeline whose whole step fails whenever a poisoned request is in it (as an engine
    would on one bad input), after the stages before the failure wrote their caches."""

    def __init__(self, inner: LocalPipeline, poison: str) -> None:
        super().__init__(inner)
        self.poison, self.failures = poison, 0

    async def forward(self, steps):
        if any(s.item.request_id == self.poison for s in steps):
            await self.inner.forward(steps)  # caches written, then the step fails
            self.failures += 1
            raise ValueError("a bad input somewhere in this batch")
        return await self.inner.forward(steps)


@pytest.mark.parametrize("sampling", [{}, {"temperature": 0.9, "seed": 11}])
async def test_a_failing_request_fails_alone_and_the_others_get_their_text(
    sampling: dict[str, object],
) -> None:
    victims = ["first victim", "second", "the third one"]
    async with running(fake_scheduler()) as s:
        alone = [
            await run(s, request(f"a{i}", p, max_tokens=30, **sampling))
            for i, p in enumerate(victims)
        ]
    poisoned = Poisoned(LocalPipeline([fake_engine(delay_s=0.003)]), poison="bad")
    scheduler = Scheduler(poisoned, ByteTokenizer(), context_length=512)
    async with running(scheduler) as s:
        runs = [
            run(s, request(f"v{i}", p, max_tokens=30, **sampling)) for i, p in enumerate(victims)
        ]
        tasks = [asyncio.create_task(r) for r in runs]
        for _ in range(1000):  # the victims are decoding when the bad request joins
            if len(s._active) == 3 and all(seq.tokens for seq in s._active):
                break
            await asyncio.sleep(0.002)
        assert not any(t.done() for t in tasks)
        with pytest.raises(ValueError, match="bad input"):
            await run(s, request("bad", "poison"))
        got = await asyncio.gather(*tasks)
        for _ in range(500):  # a finished stream leaves the batch at the end of its step
            if s.load == 0:
                break
            await asyncio.sleep(0.002)
        assert s.load == 0
    assert poisoned.failures == 2  # once in the batch, once alone: nobody else failed
    assert [g[:2] for g in got] == [a[:2] for a in alone]


async def test_a_bad_request_is_refused_before_it_joins() -> None:
    scheduler = fake_scheduler()
    scheduler._vocab = 259  # the byte tokenizer's vocabulary
    cases = [
        (GenerationRequest(RequestId("e"), ModelId("fake"), ()), "prompt", "empty"),
        (GenerationRequest(RequestId("v"), ModelId("fake"), (1, 259)), "prompt", "259"),
        (GenerationRequest(RequestId("n"), ModelId("fake"), (1, -1)), "prompt", "-1"),
        (request("s", "hi", seed=-1), "seed", "seed"),
        (request("s", "hi", seed=2**63), "seed", "seed"),
        (GenerationRequest(RequestId("c"), ModelId("fake"), (5,) * 512), "prompt", "512"),
    ]
    for req, param, words in cases:
        with pytest.raises(BadRequest, match=words) as caught:
            scheduler.generate(req)
        assert caught.value.param == param
    assert scheduler.load == 0


async def test_a_full_queue_refuses_with_overloaded() -> None:
    scheduler = fake_scheduler(max_batch=1)
    scheduler._max_queue = 2
    streams = [scheduler.generate(request(f"q{i}", "hi")) for i in range(2)]
    with pytest.raises(Overloaded):
        scheduler.generate(request("q3", "hi"))
    async with running(scheduler) as s:
        for stream in streams:
            async for _ in stream:
                pass
        assert (await run(s, request("after", "hi")))[2].reason == "length"


async def test_a_short_prompt_is_not_held_behind_a_long_prefill() -> None:
    engine = fake_engine(delay_s=0.002)
    steps: list[list[int]] = []
    forward = engine.forward

    def spy(batch, **kw):
        steps.append([item.length for item in batch])
        return forward(batch, **kw)

    engine.forward = spy  # type: ignore[method-assign]
    async with running(fake_scheduler(engine, prefill_chunk=16, context_length=1024)) as s:
        long = asyncio.create_task(run(s, request("long", "x" * 400, max_tokens=2)))
        await asyncio.sleep(0.01)
        short = await run(s, request("short", "hi", max_tokens=2))
        assert not long.done()  # the short one finished while the long one still prefilled
        await long
    assert short[2].reason == "length"
    assert max(sum(lengths) for lengths in steps) <= 16 + 1  # one chunk (+ decodes) a step


async def test_a_stream_dropped_unread_cancels_its_request() -> None:
    engine = fake_engine(delay_s=0.002)
    async with running(fake_scheduler(engine)) as s:
        stream = s.generate(request("dropped", "hello", max_tokens=400))
        del stream  # never iterated (an HTTP response that never started)
        for _ in range(200):
            if s.load == 0:
                break
            await asyncio.sleep(0.01)
        assert s.load == 0 and "dropped" not in engine._states


async def test_prefill_chunks_shrink_as_attention_grows_and_keep_their_cost() -> None:
    engine = fake_engine()
    steps: list[tuple[int, int]] = []  # (start, length) of each prefill item
    forward = engine.forward

    def spy(batch, **kw):
        steps.extend((i.start, i.length) for i in batch if i.start < 2001)  # the prompt's
        return forward(batch, **kw)

    engine.forward = spy  # type: ignore[method-assign]
    scheduler = Scheduler(
        LocalPipeline([engine]),
        ByteTokenizer(),
        context_length=4096,
        hidden_size=48,  # attention weighs like projections after 2 * 48 = 96 positions
        prefill_chunk=64,
    )
    async with running(scheduler) as s:
        await run(s, request("long", "y" * 2000, max_tokens=1))
    lengths = [n for _, n in steps]
    assert sum(lengths) == 2001 and lengths[0] > 2 * lengths[-1]  # deeper chunks are smaller
    assert lengths == sorted(lengths, reverse=True)
    for start, n in steps:
        assert n * (1 + (start + n / 2) / 96) <= 64 or n == 1
