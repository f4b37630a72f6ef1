"""A runner told new threads (the worker shares a node's cores) applies them on its engine thread
between steps, and its greedy tokens stay what they were."""

from pathlib import Path

import numpy as np
import pytest

from shoal.engines.base import StepInput
from shoal.inference.pipeline import Step
from shoal.inference.remote import RemotePipeline
from shoal.inference.request import SamplingParams
from shoal.types.ids import RequestId
from shoal.worker.supervisor import RunnerProcess
from tests.helpers.dataplane import tiny_runner, trust
from tests.helpers.tiny import VOCAB
from tests.helpers.wait import until

pytest.importorskip("transformers")
pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

GREEDY = SamplingParams(temperature=0.0)


async def greedy(pipeline: RemotePipeline, rid: str, prompt: np.ndarray, steps: int) -> list[int]:
    """Greedy tokens of one request through the chain, its cache freed after."""
    out: list[int] = []
    data, start = prompt, 0
    for _ in range(steps):
        (sampled,) = await pipeline.forward([Step(StepInput(RequestId(rid), data, start), GREEDY)])
        assert sampled is not None
        out.append(int(sampled))
        start += len(data)
        data = np.array([int(sampled)])
    await pipeline.free(RequestId(rid))
    return out


async def test_new_threads_reach_the_engine_and_change_no_token(
    tiny_llama_dir: Path, tmp_path: Path
) -> None:
    log_path = tmp_path / "runner.log"
    prompt = np.random.default_rng(5).integers(0, VOCAB, 12)
    with log_path.open("wb") as log:
        # int4: the torch engine hands the shard to the native kernels, whose threads it sets
        runner = RunnerProcess(tiny_runner(tiny_llama_dir, quant="int4"), stderr=log)
        try:
            await runner.start()
            await runner.route(None)
            addr = await runner.wait_ready(60)
            pipeline = RemotePipeline([addr], tls=trust().client_ssl(), result_timeout_s=30)
            await pipeline.connect()
            before = await greedy(pipeline, "a", prompt, 8)
            await runner.set_threads(2)
            await runner.set_threads(1)
            after = await greedy(pipeline, "b", prompt, 8)
            await pipeline.close()
        finally:
            await runner.stop()
    assert after == before
    until(lambda: "the engine runs on 1 threads" in log_path.read_text(), 5, "the log line")
    text = log_path.read_text()
    assert "the engine runs on 2 threads" in text and "could not set" not in text
