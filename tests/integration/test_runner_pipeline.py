"""Stage runner subprocesses on loopback, driven through RemotePipeline like the scheduler does.

A tiny random 4-layer llama is saved as a Hugging Face directory; runners [0, 2) → [2, 4) and a
whole-model runner must sample exactly the tokens of an in-process LocalPipeline.
"""

import asyncio
import os
import signal
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import numpy as np
import pytest
import pytest_asyncio

from shoal.engines.registry import create_engine
from shoal.errors import ShoalError
from shoal.inference.pipeline import LocalPipeline, Pipeline, Step
from shoal.inference.remote import RemotePipeline, StageLost
from shoal.inference.request import SamplingParams
from shoal.models.source import open_weights
from shoal.types.ids import ModelId, RequestId
from shoal.types.shard import Shard
from shoal.worker.supervisor import RunnerProcess, RunnerStartFailed
from tests.helpers.dataplane import tiny_runner, trust
from tests.helpers.tiny import N_LAYERS, VOCAB

pytest.importorskip("transformers")
pytestmark = [
    pytest.mark.slow,
    pytest.mark.timeout(180),
    pytest.mark.asyncio(loop_scope="module"),
]

GREEDY = SamplingParams(temperature=0.0)
PROMPTS = [
    np.random.default_rng(seed).integers(0, VOCAB, n) for seed, n in ((1, 5), (2, 9), (3, 2))
]
DECODE_STEPS = 10


def runner(model_dir: Path | str, start: int, end: int, inline_tokens: int = 16) -> RunnerProcess:
    config = tiny_runner(model_dir, start=start, end=end, inline_tokens=inline_tokens)
    return RunnerProcess(config, stop_timeout_s=3.0)


async def start_chain(runners: Sequence[RunnerProcess]) -> list[str]:
    """Start the runners, wait until all are ready, route each to the next; their addresses."""
    for r in runners:
        await r.start()
    addrs = await asyncio.gather(*(r.wait_ready(60) for r in runners))
    for r, nxt in zip(runners, [*addrs[1:], None], strict=True):
        await r.route(nxt)
    return list(addrs)


async def stop_all(runners: Sequence[RunnerProcess]) -> None:
    await asyncio.gather(*(r.stop() for r in runners))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stages(tiny_llama_dir: Path) -> AsyncIterator[dict[str, list[str]]]:
    """A two-stage chain and a whole-model runner, shared by the tests of this module.

    The whole-model runner runs every step on its engine thread, the others run small steps on
    their event loop: both paths are checked.
    """
    split = [runner(tiny_llama_dir, 0, 2), runner(tiny_llama_dir, 2, N_LAYERS)]
    whole = [runner(tiny_llama_dir, 0, N_LAYERS, inline_tokens=0)]
    try:
        split_addrs = await start_chain(split)
        whole_addrs = await start_chain(whole)
        yield {"split": split_addrs, "whole": whole_addrs}
    finally:
        await stop_all(split + whole)


async def connected(addrs: list[str]) -> RemotePipeline:
    pipeline = RemotePipeline(addrs, tls=trust().client_ssl(), result_timeout_s=30)
    await pipeline.connect()
    return pipeline


def local(tiny_llama_dir: Path) -> LocalPipeline:
    engine = create_engine("torch", device="cpu")
    engine.load(Shard.whole(ModelId("tiny"), N_LAYERS), open_weights(tiny_llama_dir))
    return LocalPipeline([engine])


def step(rid: str, data: np.ndarray, start: int, sampling: SamplingParams | None = GREEDY) -> Step:
    from shoal.engines.base import StepInput

    return Step(StepInput(RequestId(rid), data, start), sampling)


async def greedy(pipeline: Pipeline, rid: str, prompt: np.ndarray) -> list[int | None]:
    """Prefill in two chunks (the first asks no token), then DECODE_STEPS single-token steps."""
    cut = len(prompt) // 2
    out: list[int | None] = []
    if cut:
        out += await pipeline.forward([step(rid, prompt[:cut], 0, None)])
    out += await pipeline.forward([step(rid, prompt[cut:], cut)])
    for i in range(DECODE_STEPS):
        token = out[-1]
        assert token is not None
        out += await pipeline.forward([step(rid, np.array([token]), len(prompt) + i)])
    return out


@pytest.mark.parametrize("layout", ["split", "whole"])
async def test_greedy_tokens_equal_the_local_pipeline(
    stages: dict[str, list[str]], tiny_llama_dir: Path, layout: str
) -> None:
    reference, remote = local(tiny_llama_dir), await connected(stages[layout])
    try:
        for i, prompt in enumerate(PROMPTS):
            expected = await greedy(reference, f"ref-{i}", prompt)
            got = await greedy(remote, f"{layout}-{i}", prompt)
            assert got == expected
            assert (got[0] is None) == (len(prompt) >= 2)  # a prefill-only chunk answers None
            await remote.free(RequestId(f"{layout}-{i}"))
    finally:
        await remote.close()
        await reference.close()


async def test_a_batch_of_two_lengths(stages: dict[str, list[str]], tiny_llama_dir: Path) -> None:
    reference, remote = local(tiny_llama_dir), await connected(stages["split"])
    try:
        a, b = PROMPTS[0], PROMPTS[1]
        for pipeline in (reference, remote):
            first = await pipeline.forward([step("ba", a, 0), step("bb", b, 0)])
            assert all(t is not None for t in first)
            second = await pipeline.forward(
                [step("ba", np.array([first[0]]), len(a)), step("bb", np.array([first[1]]), len(b))]
            )
            if pipeline is reference:
                expected = (first, second)
            else:
                assert (first, second) == expected
                solo = await greedy(reference, "solo", b)  # batching does not change a request
                assert [solo[1], solo[2]] == [first[1], second[1]]
    finally:
        await remote.close()
        await reference.close()


@pytest.mark.parametrize("layout", ["split", "whole"])
async def test_free_lets_a_request_start_again(stages: dict[str, list[str]], layout: str) -> None:
    remote = await connected(stages[layout])
    try:
        first = await remote.forward([step("again", PROMPTS[1], 0)])
        with pytest.raises(ShoalError, match="cache holds 9"):  # an engine error, not a lost stage
            await remote.forward([step("again", PROMPTS[1], 0)])
        await remote.free(RequestId("again"))
        assert await remote.forward([step("again", PROMPTS[1], 0)]) == first
    finally:
        await remote.close()


async def test_lost_stages_raise_stage_lost_promptly(tiny_llama_dir: Path) -> None:
    chain = [runner(tiny_llama_dir, a, b) for a, b in ((0, 1), (1, 3), (3, N_LAYERS))]
    try:
        addrs = await start_chain(chain)
        dead = "127.0.0.1:9"  # discard port: nothing listens
        await chain[1].route(dead)  # the middle stage's error travels back through stage 0
        remote = await connected(addrs)
        with pytest.raises(StageLost, match="cannot reach") as lost:
            await remote.forward([step("k", PROMPTS[0], 0)])
        assert lost.value.stage_addr == dead
        await remote.close()

        await chain[1].route(addrs[2])  # the middle stage reconnects to the rerouted next stage
        remote = await connected(addrs)
        assert (await remote.forward([step("k2", PROMPTS[0], 0)]))[0] is not None
        pid = chain[2].pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        began = time.monotonic()
        with pytest.raises(StageLost):
            await remote.forward([step("k2", np.array([1]), len(PROMPTS[0]))])
        assert time.monotonic() - began < 5.0
        await remote.close()
        with pytest.raises(StageLost, match="cannot connect"):
            await connected(addrs)
    finally:
        await stop_all(chain)
    assert [r.returncode for r in chain] == [0, 0, -signal.SIGKILL]


async def test_a_bad_model_path_fails_with_a_reason(tmp_path: Path) -> None:
    bad = runner(tmp_path / "missing", 0, N_LAYERS)
    try:
        await bad.start()
        with pytest.raises(RunnerStartFailed, match="no such file or directory"):
            await bad.wait_ready(60)
        assert await asyncio.wait_for(bad.stop(), 10) == 1
    finally:
        await bad.stop()
