"""Data-plane cost on loopback: one tiny model as 1, 2 and 3 stage runners, decode timed.

Run: python bench/data_plane.py [--steps 300] [--repeats 3] [--engines fake,torch].
Each layout also runs in process (LocalPipeline over the same shards), so the added cost of a hop
separates from the engine's own per-stage overhead:
    added per hop = ((remote_n - local_n) - (remote_1 - local_1)) / (n - 1).
Every runner and the in-process engines use one torch thread.
"""

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from shoal.engines.base import Engine, StepInput
from shoal.engines.registry import create_engine
from shoal.inference.pipeline import LocalPipeline, Pipeline, Step
from shoal.inference.remote import RemotePipeline
from shoal.inference.request import SamplingParams
from shoal.models.source import open_weights
from shoal.net import frames
from shoal.types.ids import ModelId, RequestId
from shoal.types.shard import Shard
from shoal.worker.supervisor import RunnerConfig, RunnerProcess

N_LAYERS = 4
MODEL = ModelId("tiny")
LAYOUTS = {1: [(0, 4)], 2: [(0, 2), (2, 4)], 3: [(0, 1), (1, 3), (3, 4)]}
GREEDY = SamplingParams(temperature=0.0)
SMOLLM2_HIDDEN = 576
PROMPT = np.arange(8)


def make_model(path: Path) -> None:
    """A seeded random 4-layer llama (hidden 64) saved as a Hugging Face directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=N_LAYERS,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=128,
        max_position_embeddings=1024,
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).to(torch.float32).save_pretrained(path)


async def decode_ms(pipeline: Pipeline, rid: str, steps: int) -> float:
    """Prefill, then `steps` greedy decode steps; milliseconds per decode step."""
    (token,) = await pipeline.forward([Step(StepInput(RequestId(rid), PROMPT, 0), GREEDY)])
    began = time.perf_counter()
    for i in range(steps):
        assert token is not None
        item = StepInput(RequestId(rid), np.array([token]), len(PROMPT) + i)
        (token,) = await pipeline.forward([Step(item, GREEDY)])
    elapsed = time.perf_counter() - began
    await pipeline.free(RequestId(rid))
    return elapsed / steps * 1e3


async def measure(pipeline: Pipeline, steps: int, repeats: int) -> float:
    """Median ms per decode step over `repeats` requests, after a warm-up request."""
    await decode_ms(pipeline, "warm-up", 20)
    return statistics.median([await decode_ms(pipeline, f"r{i}", steps) for i in range(repeats)])


async def run_local(model: Path, engine: str, n: int, steps: int, repeats: int) -> float:
    engines: list[Engine] = []
    for start, end in LAYOUTS[n]:
        engines.append(create_engine(engine, **({"device": "cpu"} if engine == "torch" else {})))
        engines[-1].load(
            Shard(model_id=MODEL, start=start, end=end, n_layers=N_LAYERS), open_weights(model)
        )
    local = LocalPipeline(engines)
    try:
        return await measure(local, steps, repeats)
    finally:
        await local.close()


async def run_remote(model: Path, engine: str, n: int, steps: int, repeats: int) -> float:
    runners = [
        RunnerProcess(
            RunnerConfig(
                model_path=str(model),
                model_id=MODEL,
                start=start,
                end=end,
                n_layers=N_LAYERS,
                engine=engine,
                device="cpu" if engine == "torch" else None,
                threads=1,
                log_level="WARNING",
            )
        )
        for start, end in LAYOUTS[n]
    ]
    try:
        for r in runners:
            await r.start()
        addrs = await asyncio.gather(*(r.wait_ready(120) for r in runners))
        for r, nxt in zip(runners, [*addrs[1:], None], strict=True):
            await r.route(nxt)
        pipeline = RemotePipeline(addrs)
        await pipeline.connect()
        try:
            return await measure(pipeline, steps, repeats)
        finally:
            await pipeline.close()
    finally:
        await asyncio.gather(*(r.stop() for r in runners))


def hop_bytes(hidden: int, wire: frames.WireDType) -> int:
    """Bytes of one decode-step FORWARD frame (one item, one token) between two stages."""
    item = frames.WireItem(
        rid=RequestId("chatcmpl-0123456789abcdef"),
        start=1000,
        length=1,
        sampling=frames.WireSampling(temperature=0.7, top_p=0.9, top_k=40, seed=None),
    )
    return len(frames.encode(frames.forward(1, 1, [item], np.zeros((1, hidden)), wire)))


def report(engine: str, local: dict[int, float], remote: dict[int, float]) -> None:
    print(f"\nengine {engine}: ms per decode token (median)")
    print(f"{'stages':>6}{'in-process':>12}{'runners':>10}{'remote-local':>14}{'added/hop':>11}")
    base = remote[1] - local[1]  # client -> stage 0 and last stage -> client, in every layout
    for n in LAYOUTS:
        over = remote[n] - local[n]
        hop = f"{(over - base) / (n - 1):>11.3f}" if n > 1 else f"{'-':>11}"
        print(f"{n:>6}{local[n]:>12.3f}{remote[n]:>10.3f}{over:>14.3f}{hop}")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--engines", default="fake,torch")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        model = Path(tmp)
        make_model(model)
        for engine in args.engines.split(","):
            local = {
                n: await run_local(model, engine, n, args.steps, args.repeats) for n in LAYOUTS
            }
            remote = {
                n: await run_remote(model, engine, n, args.steps, args.repeats) for n in LAYOUTS
            }
            report(engine, local, remote)
    print(
        f"\nbytes per decode hop (one token, hidden {SMOLLM2_HIDDEN} as SmolLM2, 36-byte header):"
    )
    for wire in ("float32", "float16", "bfloat16"):
        print(f"  {wire:<9} {hop_bytes(SMOLLM2_HIDDEN, wire)} B")


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
