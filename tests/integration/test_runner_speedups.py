"""Speed-ups through real runner processes, a 3-stage chain of a tiny random llama: a long prompt's
chunks sent at once give the logits (and tokens) of one chunk a step, and speculative decoding
(drafts verified at the last stage, rejected ones dropped on every stage) gives plain greedy's
tokens."""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio

from shoal.inference.pipeline import Pipeline, Step
from shoal.inference.remote import RemotePipeline
from shoal.inference.request import GenerationRequest, SamplingParams, TextDelta
from shoal.inference.scheduler import Scheduler
from shoal.types.ids import ModelId, RequestId
from shoal.worker.supervisor import runner_chain
from tests.helpers.dataplane import tiny_runner, trust
from tests.helpers.fakes import ByteTokenizer
from tests.helpers.pipelines import Wrapping
from tests.helpers.tiny import N_LAYERS, VOCAB

pytest.importorskip("transformers")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(180), pytest.mark.asyncio(loop_scope="module")]

PROMPT = tuple(int(t) for t in np.random.default_rng(8).integers(3, VOCAB, 45))
CHUNK = 8


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def chain(tiny_llama_dir: Path) -> AsyncIterator[list[str]]:
    async with runner_chain(
        tiny_runner(tiny_llama_dir), [0, 1, 2, N_LAYERS], ready_s=60, stop_timeout_s=3.0
    ) as addrs:  # 3 stages
        yield addrs


class Sends(Wrapping):
    """Counts the batches each call sends at once, and the verify and rewind steps."""

    def __init__(self, inner: Pipeline, depth: int) -> None:
        super().__init__(inner)
        self.depth = depth
        self.at_once: list[int] = []
        self.verifies = self.rewinds = 0

    async def forward(self, steps: Sequence[Step]) -> Sequence[int | None]:
        self.at_once.append(1)
        self.verifies += sum(s.verify for s in steps)
        self.rewinds += sum(s.rewind for s in steps)
        return await self.inner.forward(steps)

    async def forward_all(self, batches: Sequence[Sequence[Step]]) -> list[Sequence[int | None]]:
        self.at_once.append(len(batches))
        return list(await self.inner.forward_all(batches))


@contextlib.asynccontextmanager
async def scheduler(pipeline: Pipeline) -> AsyncIterator[Scheduler]:
    s = Scheduler(pipeline, ByteTokenizer(), context_length=256, prefill_chunk=CHUNK)
    task = asyncio.create_task(s.run())
    try:
        yield s
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def first_tokens(s: Scheduler, rid: str) -> list[tuple[int, tuple[tuple[int, float], ...]]]:
    params = SamplingParams(temperature=0.0, max_tokens=4, logprobs=5)
    out = []
    async for event in s.generate(GenerationRequest(RequestId(rid), ModelId("m"), PROMPT, params)):
        if isinstance(event, TextDelta):
            out += [(lp.token, lp.top) for lp in event.logprobs]
    return out


async def test_chunks_sent_at_once_give_the_logits_of_one_a_step(chain: list[str]) -> None:
    results = {}
    for depth in (1, 3):
        remote = RemotePipeline(chain, tls=trust().client_ssl())
        await remote.connect()
        sends = Sends(remote, depth)
        try:
            async with scheduler(sends) as s:
                results[depth] = await first_tokens(s, f"p{depth}")
        finally:
            await remote.close()
        if depth == 1:
            assert max(sends.at_once) == 1  # one chunk a step
        else:  # 45 tokens in chunks of 8: two per stage at once, then the rest
            assert sends.at_once[:2] == [6, 1] and sum(sends.at_once[:2]) >= 45 // CHUNK
    (one, many) = results[1], results[3]
    assert [t for t, _ in one] == [t for t, _ in many] and len(one) == 4
    for (_, a), (_, b) in zip(one, many, strict=True):
        assert [i for i, _ in a] == [i for i, _ in b]
        np.testing.assert_allclose([p for _, p in a], [p for _, p in b], atol=1e-5)


async def greedy(s: Scheduler, rid: str, prompt: tuple[int, ...]) -> list[int]:
    params = SamplingParams(temperature=0.0, max_tokens=20)
    out: list[int] = []
    async for event in s.generate(GenerationRequest(RequestId(rid), ModelId("m"), prompt, params)):
        if isinstance(event, TextDelta):
            out += list(event.token_ids)
    return out


async def test_speculative_decoding_through_three_stages_is_plain_greedy(chain: list[str]) -> None:
    prompt = PROMPT[:10] * 3  # repeats, so prompt lookup has drafts
    got, seen = {}, {}
    for speculate in (0, 4):
        remote = RemotePipeline(chain, tls=trust().client_ssl())
        await remote.connect()
        sends = Sends(remote, 3)
        try:
            s = Scheduler(sends, ByteTokenizer(), context_length=256, speculate=speculate)
            task = asyncio.create_task(s.run())
            got[speculate] = await asyncio.gather(
                greedy(s, f"a{speculate}", prompt), greedy(s, f"b{speculate}", prompt[3:])
            )
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            seen[speculate] = (sends.verifies, sends.rewinds)
        finally:
            await remote.close()
    assert got[4] == got[0]
    assert seen[0] == (0, 0) and seen[4][0] > 0 and seen[4][1] > 0  # drafts, some rejected
