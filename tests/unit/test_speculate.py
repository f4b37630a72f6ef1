"""Speculative decoding by prompt lookup: drafts from earlier text, verified in one step, and
greedy output exactly plain greedy's (in this process; through runners in
tests/integration/test_speculate_runners.py)."""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

import numpy as np
import pytest

from shoal.engines.base import Engine, StepInput
from shoal.inference import scheduler as scheduler_module
from shoal.inference.pipeline import LocalPipeline
from shoal.inference.request import GenerationRequest, SamplingParams, TextDelta
from shoal.inference.scheduler import Scheduler
from shoal.inference.speculate import prompt_lookup
from shoal.types.ids import ModelId, RequestId
from tests.unit.test_prefix_cache import Counting, Ids, torch_engine

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize(
    ("history", "k", "drafts"),
    [([1, 2, 3, 9, 9, 1, 2, 3], 3, [9, 9, 1]),  # the 3-gram seen before: what followed it
     ([1, 2, 3, 7, 5, 2, 3], 2, [7, 5]),  # only a 2-gram matches
     ([4, 1, 5, 4, 1, 6, 4, 1], 4, [6, 4, 1]),  # the latest earlier one, cut at the end
     ([4, 1, 5, 1, 6, 1], 4, []),  # one token seen before is not enough
     ([1, 2, 3, 4], 3, []),  # nothing repeats
     ([5], 3, []), ([5, 5], 0, [])],
)  # fmt: skip
def test_prompt_lookup(history: list[int], k: int, drafts: list[int]) -> None:
    assert prompt_lookup(history, k) == drafts


class Verifies(Counting):
    """Counts verify steps (a step feeding more than one token to a decoding request)."""

    def __init__(self, inner: Engine) -> None:
        super().__init__(inner)
        self.verify_steps = 0

    def forward(self, batch: Sequence[StepInput], *, all_logits: bool = False) -> list[np.ndarray]:
        if all_logits:
            self.verify_steps += 1
        return super().forward(batch, all_logits=all_logits)


@contextlib.asynccontextmanager
async def scheduler(engine: Engine, speculate: int) -> AsyncIterator[Scheduler]:
    s = Scheduler(LocalPipeline([engine]), Ids(), context_length=1024, speculate=speculate)
    task = asyncio.create_task(s.run())
    try:
        yield s
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def generate(s: Scheduler, rid: str, prompt: list[int], **kw: object) -> list[int]:
    params = SamplingParams(**{"temperature": 0.0, "max_tokens": 24, **kw})  # type: ignore[arg-type]
    out: list[int] = []
    async for event in s.generate(GenerationRequest(RequestId(rid), ModelId("m"), tuple(prompt),
                                                    params)):  # fmt: skip
        if isinstance(event, TextDelta):
            out += list(event.token_ids)
    return out


PATTERN = [int(t) for t in np.random.default_rng(6).integers(1, 120, 12)]


@pytest.mark.parametrize("k", [1, 4, 8])
async def test_speculative_greedy_is_plain_greedy(k: int) -> None:
    prompt = PATTERN * 4  # repeats: prompt lookup drafts from it
    async with scheduler(torch_engine(), 0) as s:
        want = await generate(s, "plain", prompt)
        want_b = await generate(s, "plain-b", prompt[5:])
    engine = Verifies(torch_engine())
    async with scheduler(engine, k) as s:
        assert await generate(s, "spec", prompt) == want
        # two at once: each verifies its own drafts, rejected ones rewound per request
        both = await asyncio.gather(generate(s, "a", prompt), generate(s, "b", prompt[5:]))
        assert both == [want, want_b]
        for _ in range(100):  # freed once the step they finished in is over
            if engine.cached_positions() == 0:
                break
            await asyncio.sleep(0.02)
    assert engine.verify_steps > 0
    assert engine.cached_positions() == 0  # every cache freed, the rewound ones too


async def test_requests_that_are_not_plain_greedy_never_speculate() -> None:
    engine = Verifies(torch_engine())
    async with scheduler(engine, 4) as s:
        await generate(s, "t", PATTERN * 4, temperature=0.7, seed=1)
        await generate(s, "p", PATTERN * 4, frequency_penalty=0.5)
        await generate(s, "l", PATTERN * 4, logprobs=2)
    assert engine.verify_steps == 0


def bad_drafts(history: object, k: int) -> list[int]:
    """Drafts the model will mostly reject (the same token over and over)."""
    return [7] * k


async def test_rejected_drafts_change_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    prompt = PATTERN * 2
    async with scheduler(torch_engine(), 0) as s:
        want = await generate(s, "plain", prompt)
    monkeypatch.setattr(scheduler_module, "prompt_lookup", bad_drafts)
    engine = Verifies(torch_engine())
    async with scheduler(engine, 4) as s:
        assert await generate(s, "spec", prompt) == want
    assert engine.verify_steps > 0


async def test_an_engine_that_cannot_rewind_stops_speculation_and_answers_the_same(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class NoRewind(Verifies):
        def truncate(self, request_id: RequestId, length: int) -> None:
            if length != self.inner.cache_length(request_id):
                raise ValueError("this engine cannot drop positions")

    prompt = PATTERN * 2
    async with scheduler(torch_engine(), 0) as s:
        want = await generate(s, "plain", prompt)
    monkeypatch.setattr(scheduler_module, "prompt_lookup", bad_drafts)
    async with scheduler(NoRewind(torch_engine()), 8) as s:
        assert await generate(s, "spec", prompt) == want
        assert s._speculate == 0  # gave up on it after the failed rewind
