"""One decode benchmark, three implementations: shoal's engine, transformers, llama-cpp-python.

Each runner gets the same prompt token ids (all read the same GGUF, so the vocabulary is the
same), decodes greedily, and reports time to first token and decode speed. Runners import their
framework lazily; a peer that is not installed is reported as skipped, never as zero.
"""

import asyncio
import functools
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class Sample:
    """One timed generation."""

    prompt_tokens: int
    generated: int
    ttft_s: float  # prompt in → first token out
    decode_s: float  # first token → last token

    @property
    def prompt_tok_s(self) -> float:
        return self.prompt_tokens / self.ttft_s

    @property
    def decode_tok_s(self) -> float:
        return (self.generated - 1) / self.decode_s if self.decode_s > 0 else 0.0


Runner = Callable[[Sequence[int], int], Sample]  # (prompt ids, tokens to generate) → Sample


def shoal_runner(gguf: Path, threads: int, engine: str = "torch", quant: str = "int4") -> Runner:
    """shoal's engine behind its own scheduler (the path a request takes, minus HTTP).

    quant is the torch and numpy engines' weight format; int4 is what the smollm2 card states
    (a card that states none gets fp16, ModelCard.quant).
    """
    from shoal.engines.registry import create_engine
    from shoal.inference.pipeline import LocalPipeline
    from shoal.inference.request import Finished, GenerationRequest, SamplingParams, TextDelta
    from shoal.inference.scheduler import Scheduler
    from shoal.models.source import open_weights
    from shoal.types.ids import ModelId, RequestId
    from shoal.types.shard import Shard

    source = open_weights(gguf)
    tokenizer = source.tokenizer()
    options: dict[str, object] = {}
    if engine == "llamacpp":
        options = {"n_threads": threads}
    elif engine == "torch":
        options = {"quant": quant}
    elif engine == "numpy":
        options = {"quant": quant, "threads": threads}
    eng = create_engine(engine, **options)
    shard = Shard.whole(ModelId("bench"), source.config.num_hidden_layers)
    pipeline = LocalPipeline([eng])  # one engine thread for the load and every sample

    def load() -> None:
        if "torch" in sys.modules:
            sys.modules["torch"].set_num_threads(threads)
        eng.load(shard, source)

    asyncio.run(pipeline.call(load))
    never_stop = type("NoEos", (), {"eos_token_ids": frozenset(), "stream": tokenizer.stream})()

    async def timed(scheduler: Scheduler, prompt: Sequence[int], n: int) -> list[float]:
        """When each token of one greedy generation came out (perf_counter), prompt sent at [0]."""
        params = SamplingParams(temperature=0.0, max_tokens=n)
        req = GenerationRequest(
            RequestId(f"b{time.monotonic_ns()}"), ModelId("bench"), tuple(prompt), params
        )
        times = [time.perf_counter()]
        async for event in scheduler.generate(req):
            if isinstance(event, TextDelta) and event.token_ids:
                times += [time.perf_counter()] * len(event.token_ids)
            elif isinstance(event, Finished):
                del times[1 + event.completion_tokens :]
        return times

    async def one(prompt: Sequence[int], n: int) -> Sample:
        scheduler = Scheduler(pipeline, never_stop, context_length=1 << 20)
        task = asyncio.create_task(scheduler.run())
        times = await timed(scheduler, prompt, n)
        task.cancel()
        first = times[1] if len(times) > 1 else times[0]
        return Sample(len(prompt), len(times) - 1, first - times[0], times[-1] - first)

    async def many(prompt: Sequence[int], n: int, streams: int) -> float:
        scheduler = Scheduler(pipeline, never_stop, context_length=1 << 20, max_batch=streams)
        task = asyncio.create_task(scheduler.run())
        # Different requests: each prompt starts at another token of the same text.
        runs = [timed(scheduler, [*prompt[i:], *prompt[:i]], n) for i in range(streams)]
        times = await asyncio.gather(*runs)
        task.cancel()
        return steady_decode_rate(times)

    return SchedulerRunner(
        lambda prompt, n: asyncio.run(one(prompt, n)),
        lambda prompt, n, k: asyncio.run(many(prompt, n, k)),
    )


def steady_decode_rate(streams: Sequence[Sequence[float]]) -> float:
    """Aggregate tokens/s while every stream decodes: from the last stream's first token to the
    first stream's last, so prefills (one per stream) and lone stragglers are left out."""
    start = max(t[1] for t in streams)
    end = min(t[-1] for t in streams)
    if end <= start:  # no moment when all decoded at once: the whole span instead
        start, end = min(t[0] for t in streams), max(t[-1] for t in streams)
        return sum(len(t) - 1 for t in streams) / (end - start)
    return sum(sum(1 for x in t[1:] if start < x <= end) for t in streams) / (end - start)


@dataclass(frozen=True)
class SchedulerRunner:
    """A Runner that can also run several requests at once through one scheduler."""

    run: Runner
    streams: Callable[[Sequence[int], int, int], float]  # (prompt, tokens, streams) → tok/s

    def __call__(self, prompt: Sequence[int], n: int) -> Sample:
        return self.run(prompt, n)


def transformers_runner(gguf: Path, threads: int) -> Runner:
    """Hugging Face transformers, float32, a greedy loop with its KV cache."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(
        str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32
    ).eval()

    @torch.inference_mode()
    def run(prompt: Sequence[int], n: int) -> Sample:
        ids = torch.tensor([list(prompt)])
        start = time.perf_counter()
        out = model(ids, use_cache=True)
        token = out.logits[0, -1].argmax()
        first = time.perf_counter()
        past = out.past_key_values
        for _ in range(n - 1):
            out = model(token.view(1, 1), past_key_values=past, use_cache=True)
            past = out.past_key_values
            token = out.logits[0, -1].argmax()
        return Sample(len(prompt), n, first - start, time.perf_counter() - first)

    return run


def llamacpp_runner(gguf: Path, threads: int) -> Runner:
    """llama-cpp-python on the same GGUF, greedy."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(gguf), n_ctx=4096, n_threads=threads, n_batch=512, verbose=False)

    def run(prompt: Sequence[int], n: int) -> Sample:
        llm.reset()
        start = time.perf_counter()
        first = start
        count = 0
        for _ in llm.generate(list(prompt), top_k=1, temp=0.0, reset=True):
            count += 1
            if count == 1:
                first = time.perf_counter()
            if count == n:
                break
        return Sample(len(prompt), count, first - start, time.perf_counter() - first)

    return run


PEERS: dict[str, Callable[[Path, int], Runner]] = {
    "shoal": shoal_runner,  # the torch engine, weights in the card's default format (int4)
    "shoal-fp32": functools.partial(shoal_runner, quant="none"),
    "shoal-fp16": functools.partial(shoal_runner, quant="fp16"),
    "shoal-int8": functools.partial(shoal_runner, quant="int8"),
    "shoal-int4": functools.partial(shoal_runner, quant="int4"),
    "shoal-numpy": functools.partial(shoal_runner, engine="numpy", quant="none"),
    "shoal-numpy-int4": functools.partial(shoal_runner, engine="numpy", quant="int4"),
    "shoal-mlx": functools.partial(shoal_runner, engine="mlx"),
    "shoal-llamacpp": functools.partial(shoal_runner, engine="llamacpp"),
    "transformers": transformers_runner,
    "llamacpp": llamacpp_runner,
}
PEER_MODULES = {
    "shoal": "torch",
    "shoal-fp32": "torch",
    "shoal-fp16": "torch",
    "shoal-int8": "torch",
    "shoal-int4": "torch",
    "shoal-numpy": "numpy",
    "shoal-numpy-int4": "numpy",
    "shoal-mlx": "mlx_lm",
    "shoal-llamacpp": "llama_cpp",
    "transformers": "transformers",
    "llamacpp": "llama_cpp",
}


def median(values: Sequence[float]) -> float:
    return float(np.median(values)) if values else float("nan")
