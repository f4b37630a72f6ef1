"""Prefix caching: the index by token-block hashes, the kept caches' LRU bound, and a chat's turn 2
prefilling only its new tokens (counted at the engine) with the answer it gives without a cache."""

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

import numpy as np
import pytest

from shoal.engines.base import Engine, ProgressFn, StepInput, WeightSource
from shoal.inference.pipeline import LocalPipeline
from shoal.inference.prefix import BLOCK, PrefixIndex, Retained, block_hashes, budget_positions
from shoal.inference.request import Finished, GenerationRequest, SamplingParams, TextDelta
from shoal.inference.scheduler import Scheduler
from shoal.types.ids import ModelId, RequestId
from shoal.types.shard import Shard

pytestmark = pytest.mark.timeout(120)

R = RequestId


# --- the index and the kept caches ----------------------------------------------------------------


def test_block_hashes_cover_everything_before_them() -> None:
    a, b = list(range(100)), list(range(100))
    b[5] = 999  # one token in the first block differs: every later hash differs too
    ha, hb = block_hashes(a), block_hashes(b)
    assert len(ha) == 100 // BLOCK == 3
    assert all(x != y for x, y in zip(ha, hb, strict=True))
    assert block_hashes(a[:64]) == ha[:2]  # a prefix's hashes are the first ones


def test_lookup_finds_the_longest_kept_prefix_and_extends_it_past_the_block() -> None:
    index = PrefixIndex()
    system = list(range(1000, 1000 + 70))
    assert index.add(R("short"), system[:40]) == []
    assert index.add(R("long"), [*system, 1, 2, 3]) == []
    prompt = [*system, 1, 2, 9, 9]
    assert index.lookup(prompt) == (R("long"), 72)  # 2 blocks + 8 tokens past them
    assert index.lookup(system[:40] + [5] * 10) == (R("long"), 40)  # the latest holder
    # never the whole prompt (its last token runs, for its logits); never under one block
    assert index.lookup([*system, 1, 2, 3]) == (R("long"), 72)
    assert index.lookup(system[:BLOCK]) is None  # 31 reusable: less than a block
    assert index.lookup([7] * 200) is None
    assert index.add(R("tiny"), [1, 2, 3]) == [R("tiny")]  # not worth keeping


def test_the_index_lets_go_of_the_least_recently_used() -> None:
    index = PrefixIndex(max_entries=2)
    for name, first in (("a", 0), ("b", 100)):
        index.add(R(name), list(range(first, first + 40)))
    assert index.lookup(list(range(40)) + [5]) is not None  # a is used: b is now the oldest
    assert index.add(R("c"), list(range(200, 240))) == [R("b")]
    assert index.lookup(list(range(100, 140)) + [5]) is None and R("a") in index
    index.drop(R("a"))
    assert index.lookup(list(range(40)) + [5]) is None
    assert index.clear() == [R("c")] and len(index) == 0


def test_kept_caches_stay_within_their_bound() -> None:
    kept = Retained(budget=100)
    assert kept.keep(R("a"), 40) == [] and kept.keep(R("b"), 40) == []
    kept.touch(R("a"))  # a was forked from: b is the oldest now
    assert kept.keep(R("c"), 40) == [R("b")]
    assert kept.positions == 80 and R("b") not in kept
    assert kept.keep(R("huge"), 500) == [R("a"), R("c"), R("huge")]  # alone it does not fit
    assert kept.positions == 0 and len(kept) == 0
    assert Retained(budget=0).keep(R("x"), 1) == [R("x")]  # off
    # SmolLM2: 30 layers, 3 kv heads of 64, float32: 46,080 B a position
    assert budget_positions(256 << 20, 30, 3, 64, 64) == (256 << 20) // 46080


# --- a chat's second turn through the scheduler -------------------------------------------


class Counting:
    """An engine that counts the positions it runs (the prefill a prefix saves)."""

    def __init__(self, inner: Engine) -> None:
        self.inner = inner
        self.name = inner.name
        self.positions = 0

    def forward(self, batch: Sequence[StepInput], *, all_logits: bool = False) -> list[np.ndarray]:
        self.positions += sum(item.length for item in batch)
        return self.inner.forward(batch, all_logits=all_logits)

    def load(self, shard: Shard, source: WeightSource, progress: ProgressFn | None = None) -> None:
        self.inner.load(shard, source, progress)

    def free(self, request_id: RequestId) -> None:
        self.inner.free(request_id)

    def close(self) -> None:
        self.inner.close()

    def cache_length(self, request_id: RequestId) -> int:
        return self.inner.cache_length(request_id)

    def cached_positions(self) -> int:
        return self.inner.cached_positions()

    def fork(self, source: RequestId, target: RequestId, length: int) -> None:
        self.inner.fork(source, target, length)

    def truncate(self, request_id: RequestId, length: int) -> None:
        self.inner.truncate(request_id, length)

    def set_threads(self, threads: int) -> None:
        self.inner.set_threads(threads)


class Ids:
    """A detokenizer over ids: each token is its id as text, so texts compare as token lists."""

    eos_token_ids: frozenset[int] = frozenset()

    def stream(self) -> "Ids":
        return self

    def push(self, token_id: int) -> str:
        return f"{token_id} "

    def flush(self) -> str:
        return ""


def torch_engine() -> Engine:
    pytest.importorskip("transformers")
    from shoal.engines.registry import create_engine
    from tests.helpers.tiny import shard, tiny_source

    engine = create_engine("torch", device="cpu")
    engine.load(shard(), tiny_source("llama"))
    return engine


@contextlib.asynccontextmanager
async def scheduler(
    engine: Engine, *, keep: int, index: PrefixIndex | None
) -> AsyncIterator[Scheduler]:
    pipeline = LocalPipeline([engine], keep_positions=keep)
    s = Scheduler(pipeline, Ids(), context_length=1024, prefix=index)
    task = asyncio.create_task(s.run())
    try:
        yield s
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def answer(s: Scheduler, rid: str, prompt: list[int], tokens: int = 8) -> list[int]:
    return (await answered(s, rid, prompt, tokens))[0]


async def answered(
    s: Scheduler, rid: str, prompt: list[int], tokens: int = 8
) -> tuple[list[int], Finished]:
    params = SamplingParams(temperature=0.0, max_tokens=tokens)
    out: list[int] = []
    async for event in s.generate(GenerationRequest(R(rid), ModelId("m"), tuple(prompt), params)):
        if isinstance(event, TextDelta):
            out += list(event.token_ids)
        assert not isinstance(event, BaseException)
    assert isinstance(event, Finished)
    return out, event


TURN_1 = [int(t) for t in np.random.default_rng(3).integers(1, 120, 80)]
NEW = [int(t) for t in np.random.default_rng(4).integers(1, 120, 20)]


async def test_turn_two_prefills_only_its_new_tokens_and_answers_the_same() -> None:
    plain = Counting(torch_engine())
    async with scheduler(plain, keep=0, index=None) as s:
        first = await answer(s, "t1", TURN_1)
        turn_2 = [*TURN_1, *first, *NEW]
        before = plain.positions
        want = await answer(s, "t2", turn_2)
        cold = plain.positions - before
    cached = Counting(torch_engine())
    index = PrefixIndex()
    async with scheduler(cached, keep=10_000, index=index) as s:
        assert await answer(s, "t1", TURN_1) == first
        before = cached.positions
        got, done = await answered(s, "t2", turn_2)
        assert got == want  # exactly the same tokens
        warm = cached.positions - before
    held = len(TURN_1) + len(first) - 1  # turn 1's caches: its prompt and answer, bar the last
    assert cold == len(turn_2) + len(want) - 1
    assert warm == cold - held  # the new tokens (and the answer's last) only
    assert done.cached_tokens == held  # what usage reports as cached
    assert R("t1") in index and R("t2") in index


async def test_a_prefix_the_stage_let_go_of_is_prefilled_and_answers_the_same() -> None:
    engine = Counting(torch_engine())
    index = PrefixIndex()
    async with scheduler(engine, keep=50, index=index) as s:  # too small to keep turn 1
        first = await answer(s, "t1", TURN_1)
        assert R("t1") in index  # the index believes it is kept: a hint, not the truth
        turn_2 = [*TURN_1, *first, *NEW]
        before = engine.positions
        got, done = await answered(s, "t2", turn_2)
        assert engine.positions - before >= len(turn_2)  # all of it prefilled after the miss
        assert done.cached_tokens == 0
        assert R("t1") not in index  # forgotten on the miss
    async with scheduler(Counting(torch_engine()), keep=0, index=None) as s:
        assert await answer(s, "t1", TURN_1) == first
        assert await answer(s, "t2", turn_2) == got


async def test_requests_with_penalties_never_start_from_a_kept_cache() -> None:
    engine = Counting(torch_engine())
    async with scheduler(engine, keep=10_000, index=PrefixIndex()) as s:
        first = await answer(s, "t1", TURN_1)
        turn_2 = [*TURN_1, *first, *NEW]
        before = engine.positions
        params = SamplingParams(temperature=0.0, max_tokens=4, frequency_penalty=0.5)
        req = GenerationRequest(R("t2"), ModelId("m"), tuple(turn_2), params)
        async for _ in s.generate(req):
            pass
        assert engine.positions - before == len(turn_2) + 3  # the whole prompt ran
