"""n choices, constraint masks, logprobs and penalties through real stage runner processes.

A tiny random 4-layer llama in two runners [0, 2) → [2, 4), driven by the Scheduler over a
RemotePipeline (as a node does), against the same model in this process.
"""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import pytest_asyncio

from shoal.engines.base import Engine, StepInput
from shoal.engines.registry import create_engine
from shoal.inference.pipeline import LocalPipeline, Pipeline, Step
from shoal.inference.remote import RemotePipeline
from shoal.inference.request import Finished, GenerationRequest, SamplingParams, TextDelta
from shoal.inference.sampling import log_softmax
from shoal.inference.scheduler import Scheduler
from shoal.models.source import open_weights
from shoal.types.ids import ModelId, RequestId
from shoal.types.shard import Shard
from shoal.worker.supervisor import runner_chain
from tests.helpers.dataplane import tiny_runner, trust
from tests.helpers.fakes import ByteTokenizer
from tests.helpers.pipelines import Wrapping
from tests.helpers.tiny import N_LAYERS, VOCAB

pytest.importorskip("transformers")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(180),
    pytest.mark.asyncio(loop_scope="module"),
]

PROMPT = tuple(int(t) for t in np.random.default_rng(5).integers(3, VOCAB, 11))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def chain(tiny_llama_dir: Path) -> AsyncIterator[list[str]]:
    config = tiny_runner(tiny_llama_dir)
    async with runner_chain(config, [0, 2, N_LAYERS], ready_s=60, stop_timeout_s=3.0) as addrs:
        yield addrs


class Recording(Wrapping):
    """A pipeline that keeps every step it forwards (what reaches the stages)."""

    def __init__(self, inner: Pipeline) -> None:
        super().__init__(inner)
        self.steps: list[Step] = []

    async def forward(self, steps: Sequence[Step]) -> Sequence[int | None]:
        self.steps.extend(steps)
        return await self.inner.forward(steps)


def local_engine(tiny_llama_dir: Path) -> Engine:
    engine = create_engine("torch", device="cpu")
    engine.load(Shard.whole(ModelId("tiny"), N_LAYERS), open_weights(tiny_llama_dir))
    return engine


@contextlib.asynccontextmanager
async def scheduling(pipeline: Pipeline) -> AsyncIterator[Scheduler]:
    scheduler = Scheduler(pipeline, ByteTokenizer(), context_length=256, vocab_size=VOCAB)
    task = asyncio.create_task(scheduler.run())
    try:
        yield scheduler
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await pipeline.close()


async def remote(addrs: list[str]) -> Recording:
    pipeline = RemotePipeline(addrs, tls=trust().client_ssl(), result_timeout_s=30)
    await pipeline.connect()
    return Recording(pipeline)


async def generate(
    scheduler: Scheduler, n: int = 1, constraint: object = None, **sampling: object
) -> tuple[list[list[TextDelta]], list[Finished]]:
    params = SamplingParams(**{"temperature": 0.0, "max_tokens": 12, **sampling})  # type: ignore[arg-type]
    req = GenerationRequest(
        RequestId("req"),
        ModelId("tiny"),
        PROMPT,
        params,
        n=n,
        constraint=constraint,  # type: ignore[arg-type]
    )
    deltas: list[list[TextDelta]] = [[] for _ in range(n)]
    done: list[Finished] = []
    async for event in scheduler.generate(req):
        if isinstance(event, TextDelta):
            deltas[event.index].append(event)
        else:
            done.append(event)
    return deltas, done


def ids(deltas: list[TextDelta]) -> list[int]:
    return [t for d in deltas for t in d.token_ids]


async def test_three_greedy_choices_share_one_prefill_on_the_runners(chain: list[str]) -> None:
    pipeline = await remote(chain)
    async with scheduling(pipeline) as scheduler:
        deltas, done = await generate(scheduler, n=3, max_tokens=8)
        steps = list(pipeline.steps)
        alone, _ = await generate(scheduler, n=1, max_tokens=8)
    assert ids(deltas[0]) == ids(deltas[1]) == ids(deltas[2]) == ids(alone[0]) != []
    fed = sum(s.item.length for s in steps if s.item.start < len(PROMPT))
    assert fed == len(PROMPT) + 2  # the prompt once; the others feed its last token each
    forks = [s for s in steps if s.fork is not None]
    assert [(s.item.request_id, s.fork) for s in forks] == [("req.1", "req"), ("req.2", "req")]
    assert sorted(d.index for d in done) == [0, 1, 2]


class OnlyTokens:
    """A stand-in Constraint: any of `tokens`, finished after `length` of them."""

    def __init__(self, tokens: set[int], length: int) -> None:
        self.tokens, self.length = tokens, length
        self.seen: list[int] = []

    def allowed(self) -> np.ndarray:
        words = np.zeros(-(-VOCAB // 32), dtype=np.uint32)
        for t in self.tokens:
            words[t // 32] |= np.uint32(1 << (t % 32))
        return words

    def advance(self, token: int) -> None:
        self.seen.append(token)

    @property
    def finished(self) -> bool:
        return len(self.seen) >= self.length


async def test_a_constraint_mask_holds_through_the_runners(
    chain: list[str], tiny_llama_dir: Path
) -> None:
    allowed = {40, 77, 101, 126}
    made: list[OnlyTokens] = []

    def factory() -> OnlyTokens:
        made.append(OnlyTokens(allowed, 6))
        return made[-1]

    ask: Any = {"temperature": 1.5, "seed": 9, "max_tokens": 40}
    async with scheduling(await remote(chain)) as scheduler:
        deltas, done = await generate(scheduler, n=2, constraint=factory, **ask)
    for choice in made:
        assert len(choice.seen) == 6 and set(choice.seen) <= allowed
    assert [d.reason for d in done] == ["stop", "stop"]
    async with scheduling(LocalPipeline([local_engine(tiny_llama_dir)])) as scheduler:
        here, _ = await generate(scheduler, n=2, constraint=factory, **ask)
    assert [ids(d) for d in deltas] == [ids(d) for d in here]


async def test_logprobs_from_the_runners_are_the_engine_logits_log_softmax(
    chain: list[str], tiny_llama_dir: Path
) -> None:
    async with scheduling(await remote(chain)) as scheduler:
        deltas, _ = await generate(scheduler, max_tokens=6, logprobs=4)
    lps = [lp for d in deltas[0] for lp in d.logprobs]
    tokens = ids(deltas[0])
    assert [lp.token for lp in lps] == tokens and len(tokens) == 6
    seq = np.array([*PROMPT, *tokens], dtype=np.int64)
    engine = local_engine(tiny_llama_dir)
    logits = engine.forward([StepInput(RequestId("x"), seq, 0)], all_logits=True)
    for i, lp in enumerate(lps):
        expected = log_softmax(logits[0][len(PROMPT) - 1 + i])
        assert lp.logprob == pytest.approx(expected[lp.token], abs=1e-4)
        assert [t for t, _ in lp.top] == list(np.argsort(-expected)[:4])
        assert [v for _, v in lp.top] == pytest.approx(list(np.sort(expected)[::-1][:4]), abs=1e-4)


async def test_penalties_and_logit_bias_on_the_runners_act_as_in_process(
    chain: list[str], tiny_llama_dir: Path
) -> None:
    penalized: Any = {"max_tokens": 30, "frequency_penalty": 1.5, "repetition_penalty": 1.3}
    banned = ids((await _local(tiny_llama_dir, max_tokens=3))[0])[0]
    biased: Any = {"max_tokens": 10, "logit_bias": ((banned, -100.0),)}
    async with scheduling(await remote(chain)) as scheduler:
        plain, _ = await generate(scheduler, max_tokens=30)
        pen, _ = await generate(scheduler, **penalized)
        bias, _ = await generate(scheduler, **biased)
    assert ids(pen[0]) == ids((await _local(tiny_llama_dir, **penalized))[0])
    assert ids(bias[0]) == ids((await _local(tiny_llama_dir, **biased))[0])
    assert banned not in ids(bias[0])

    def repeats(tokens: list[int]) -> int:
        return len(tokens) - len(set(tokens))

    assert repeats(ids(pen[0])) < repeats(ids(plain[0]))


async def _local(tiny_llama_dir: Path, **sampling: Any) -> list[list[TextDelta]]:
    async with scheduling(LocalPipeline([local_engine(tiny_llama_dir)])) as scheduler:
        deltas, _ = await generate(scheduler, **sampling)
    return deltas
