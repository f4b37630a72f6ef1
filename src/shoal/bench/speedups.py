"""`shoal bench speedups`: what prefix caching, pipelined prefill and speculative decoding buy,
each side by side with the same thing without it, in one run, in this process.

- prefix: the TTFT of turn N of a chat, with the prefix cache and without, against N. Two
  schedulers over one engine (one_engine says why one) answer each turn in turns (which goes
  first alternates), so a shared machine's load falls on both alike; the cached answer must
  equal the plain one.
- pipelined: the TTFT of a long prompt through 3 stages (real runner processes on loopback,
  plain TCP, one thread each) with its chunks pipelined and sent one a step, against 1 stage
  with one thread and with a thread per core. On a machine with fewer cores than stages the
  stages share cores, so pipelining wins only what a core left idle between hops would have.
- speculation: decode tok/s with prompt-lookup drafts of each --drafts size against none, on a
  prompt that asks to repeat a passage (drafting pays) and an open question (it mostly does
  not), on the GGUF and on the same model with its FFN widened --widen times (widen.py:
  bigger, bound by bytes, saying exactly the same). Outputs must equal the plain ones.

Every figure is a median over --runs rounds after one warm-up round, with its ratio to the
baseline; bench/METHODOLOGY.md says how to read them.
"""

import argparse
import asyncio
import contextlib
import os
import statistics
import tempfile
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from prometheus_client import CollectorRegistry

from shoal.bench.errors import BenchError
from shoal.bench.widen import widen_ffn, widened_path
from shoal.engines.registry import create_engine
from shoal.errors import BadRequest
from shoal.inference.metrics import RequestMetrics
from shoal.inference.pipeline import LocalPipeline, Pipeline
from shoal.inference.prefix import PrefixIndex
from shoal.inference.remote import RemotePipeline
from shoal.inference.request import Finished, GenerationRequest, SamplingParams
from shoal.inference.scheduler import Scheduler
from shoal.models.source import GGUFSource, SafetensorsSource, open_weights
from shoal.types.ids import ModelId, RequestId
from shoal.types.shard import Shard
from shoal.worker.pipe import RunnerConfig
from shoal.worker.supervisor import runner_chain

Tick = Callable[[str], None]
MODEL = ModelId("bench")

QUESTIONS = [
    "Tell me about the history of Paris in a few sentences.",
    "What are the most famous museums there?",
    "Which river runs through the city, and what are its bridges like?",
    "Describe the food a visitor should try.",
    "How does the metro work for a tourist?",
    "What day trips can one take from the city?",
    "Which neighbourhoods are best for a walk?",
    "What is the weather like across the seasons?",
    "Name some festivals held during the year.",
    "Summarise everything we talked about.",
]
PASSAGE = (
    "The river rises in the hills above the town, runs past the old mill and the market square, "
    "and reaches the sea twelve miles to the south, where the fishing boats come in each morning "
    "with the tide. In winter it floods the low meadows; in summer children swim below the bridge."
)
SPEC_PROMPTS = {
    "repeat a passage": f"Repeat this text exactly, word for word:\n\n{PASSAGE}",
    "open question": "Explain in a few sentences why the sky is blue.",
}


@dataclass
class Local:
    """A scheduler over one in-process engine, and the registry its metrics go to."""

    scheduler: Scheduler
    registry: CollectorRegistry

    def counter(self, name: str) -> float:
        value = self.registry.get_sample_value(f"shoal:{name}_total", {"model_name": MODEL})
        return value or 0.0

    def drafts(self) -> tuple[float, float]:
        """Draft tokens verified so far, and those kept."""
        return (
            self.counter("spec_decode_num_draft_tokens"),
            self.counter("spec_decode_num_accepted_tokens"),
        )


Source = GGUFSource | SafetensorsSource


@contextlib.asynccontextmanager
async def one_engine(source: Source, quant: str) -> AsyncIterator[LocalPipeline]:
    """The one torch engine, on the one pipeline thread, that every scheduler of a part shares
    (they take turns: one request at a time). Engines side by side in one process would each
    bring an OpenMP team, more threads than cores, which libgomp answers by hardly spinning: every
    figure would be the slower passive one (0.4x on 2 cores), unlike a runner's one engine."""
    n = source.config.num_hidden_layers
    engine = create_engine("torch", device="cpu", quant=quant)
    pipeline = LocalPipeline([engine], keep_positions=100_000)  # kept only for a prefix index
    try:
        await pipeline.call(engine.load, Shard(model_id=MODEL, start=0, end=n, n_layers=n), source)
        yield pipeline
    finally:
        await pipeline.close()


@contextlib.asynccontextmanager
async def scheduled(
    pipeline: Pipeline,
    source: Source,
    *,
    cached: bool = False,
    speculate: int = 0,
    chunk: int = 256,
) -> AsyncIterator[Local]:
    """A scheduler over `pipeline`, stepping until the block ends; with `cached`, it keeps its
    finished requests' caches and starts prompts from them."""
    registry = CollectorRegistry()
    scheduler = Scheduler(
        pipeline,
        source.tokenizer(),
        context_length=source.config.max_position_embeddings,
        prefix=PrefixIndex() if cached else None,
        speculate=speculate,
        metrics=RequestMetrics(registry).model(MODEL),
        prefill_chunk=chunk,
    )
    task = asyncio.create_task(scheduler.run())
    try:
        yield Local(scheduler, registry)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


@contextlib.asynccontextmanager
async def local(source: Source, quant: str, *, speculate: int = 0) -> AsyncIterator[Local]:
    """A scheduler over an engine of its own."""
    async with (
        one_engine(source, quant) as pipeline,
        scheduled(pipeline, source, speculate=speculate) as served,
    ):
        yield served


async def generate(
    scheduler: Scheduler, rid: str, prompt: list[int] | tuple[int, ...], max_tokens: int
) -> tuple[Finished, list[int]]:
    """One greedy request: how it finished, and its tokens."""
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    request = GenerationRequest(RequestId(rid), MODEL, tuple(prompt), params)
    tokens: list[int] = []
    async for event in scheduler.generate(request):
        if isinstance(event, Finished):
            return event, tokens
        tokens += list(event.token_ids)
    raise RuntimeError(f"{rid}: the stream ended without finishing")


def _rotated(items: list[Any], by: int) -> list[Any]:
    by %= len(items)
    return items[by:] + items[:by]


# --- prefix caching -------------------------------------------------------------------------------


async def prefix_turns(path: Path, quant: str, turns: int, max_tokens: int, tick: Tick) -> dict:
    source = open_weights(path)
    tokenizer = source.tokenizer()
    history: list[dict[str, str]] = [{"role": "system", "content": "You are a travel guide."}]
    rows = []
    async with (
        one_engine(source, quant) as pipeline,
        scheduled(pipeline, source, cached=True) as cached,
        scheduled(pipeline, source) as plain,
    ):
        for turn in range(turns):
            history.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
            prompt = tokenizer.encode_chat(history)
            hits = cached.counter("prefix_cache_hits")
            runs = {}
            for name, s in _rotated([("cached", cached), ("plain", plain)], turn):
                runs[name] = await generate(s.scheduler, f"{name}-{turn}", prompt, max_tokens)
            (warm, answer), (cold, other) = runs["cached"], runs["plain"]
            if answer != other:
                raise BenchError(f"turn {turn + 1}: the cached answer differs from the plain one")
            history.append({"role": "assistant", "content": tokenizer.decode(answer)})
            rows.append(
                {
                    "turn": turn + 1,
                    "prompt_tokens": len(prompt),
                    "reused_tokens": int(cached.counter("prefix_cache_hits") - hits),
                    "cached_ttft_ms": warm.ttft_s * 1000,
                    "plain_ttft_ms": cold.ttft_s * 1000,
                    "ratio": warm.ttft_s / cold.ttft_s,
                }
            )
            tick(f"turn {turn + 1}")
    return {"quant": quant, "max_tokens": max_tokens, "identical": True, "turns": rows}


# --- pipelined prefill ----------------------------------------------------------------------------


def _runner(path: Path, layers: int, cache: str, context: int, threads: int) -> RunnerConfig:
    """A runner of the whole model (runner_chain cuts it): int4, plain TCP."""
    return RunnerConfig(
        model_path=str(path),
        model_id=MODEL,
        start=0,
        end=layers,
        n_layers=layers,
        engine="torch",
        device="cpu",
        quant="int4",
        threads=threads,
        log_level="ERROR",  # the progress bars are the output
        cache_dir=cache,
        credentials=None,
        max_step_tokens=max(8192, context),
    )


async def pipelined_prefill(
    path: Path, tokens: int, chunk: int, runs: int, tick: Tick
) -> dict[str, Any]:
    source = open_weights(path)
    layers = source.config.num_hidden_layers
    context = source.config.max_position_embeddings
    rng = np.random.default_rng(0)
    prompt = tuple(int(t) for t in rng.integers(100, source.config.vocab_size, tokens))
    cores = os.cpu_count() or 1
    thirds = [0, layers // 3, 2 * layers // 3, layers]
    chains = {  # cuts, threads per stage, chunks in flight (None: one per stage)
        "3 stages, pipelined": (thirds, 1, None),
        "3 stages, one chunk a step": (thirds, 1, 1),
        "1 stage": ([0, layers], 1, None),
        f"1 stage, {cores} threads": ([0, layers], cores, None),
    }
    times: dict[str, list[float]] = {name: [] for name in chains}
    answers: set[int] = set()
    async with contextlib.AsyncExitStack() as stack:
        cache = stack.enter_context(tempfile.TemporaryDirectory())
        schedulers: dict[str, Scheduler] = {}
        for name, (cuts, threads, depth) in chains.items():
            runner = _runner(path, layers, cache, context, threads)
            addrs = await stack.enter_async_context(runner_chain(runner, cuts, ready_s=600))
            pipeline = RemotePipeline(addrs, tls=None)
            if depth is not None:  # 1: the scheduler sends one chunk a step, as beside others
                pipeline.depth = depth
            stack.push_async_callback(pipeline.close)
            await pipeline.connect()
            served = await stack.enter_async_context(scheduled(pipeline, source, chunk=chunk))
            schedulers[name] = served.scheduler
        for r in range(runs + 1):  # the first round warms up
            for name in _rotated(list(schedulers), r):
                done, out = await generate(schedulers[name], f"{r}-{name}", prompt, 1)
                answers.update(out)
                if r:
                    times[name].append(done.ttft_s)
            tick(f"round {r + 1}" if r else "warm-up")
    if len(answers) != 1:
        raise BenchError(f"the pipelines answered differently: {sorted(answers)}")
    base = statistics.median(times["1 stage"])
    return {
        "prompt_tokens": tokens,
        "chunk": chunk,
        "cores": cores,
        "layers": [f"{a}-{b}" for a, b in zip(thirds, thirds[1:], strict=False)],
        "identical": True,
        "rows": [
            {
                "setting": name,
                "ttft_s": statistics.median(ts),
                "ratio_to_1_stage": statistics.median(ts) / base,
                "samples_s": ts,
            }
            for name, ts in times.items()
        ],
    }


# --- speculative decoding -------------------------------------------------------------------------


async def speculation(
    path: Path, label: str, quant: str, drafts: list[int], tokens: int, runs: int, tick: Tick
) -> dict[str, Any]:
    source = open_weights(path)
    tokenizer = source.tokenizer()
    settings = [0, *drafts]
    prompts = [
        (name, tokenizer.encode_chat([{"role": "user", "content": text}]))
        for name, text in SPEC_PROMPTS.items()
    ]
    out: dict[str, Any] = {"model": label, "quant": quant, "tokens": tokens, "prompts": []}
    async with contextlib.AsyncExitStack() as stack:
        pipeline = await stack.enter_async_context(one_engine(source, quant))
        by = {
            d: await stack.enter_async_context(scheduled(pipeline, source, speculate=d))
            for d in settings
        }
        for name, prompt in prompts:
            rates: dict[int, list[float]] = {d: [] for d in settings}
            first: list[int] | None = None
            before = {d: by[d].drafts() for d in settings}
            for r in range(runs + 1):  # the first round warms up
                for d in _rotated(settings, r):
                    done, got = await generate(by[d].scheduler, f"{name}-{d}-{r}", prompt, tokens)
                    first = got if first is None else first
                    if got != first:
                        raise BenchError(f"{label}, {name}: the output with {d} drafts differs")
                    if r:
                        rates[d].append(done.decode_tok_s)
                tick(f"{label}, {name}, round {r + 1}" if r else f"{label}, {name}, warm-up")
            base = statistics.median(rates[0])
            rows = []
            for d in settings:
                drafted, kept = (
                    now - then for now, then in zip(by[d].drafts(), before[d], strict=True)
                )
                median = statistics.median(rates[d])
                rows.append(
                    {
                        "drafts": d,
                        "tok_s": median,
                        "ratio": median / base,
                        "kept_share": kept / drafted if drafted else None,
                        "samples_tok_s": rates[d],
                    }
                )
            out["prompts"].append(
                {"prompt": name, "prompt_tokens": len(prompt), "identical": True, "rows": rows}
            )
    return out


# --- the suite ------------------------------------------------------------------------------------


def measure(args: argparse.Namespace, gguf: Path, phase: Callable[..., Any]) -> dict[str, Any]:
    """Every part, each in its own event loop; `phase(name, total)` gives a progress tick."""
    context = open_weights(gguf).config.max_position_embeddings
    if args.pipeline_tokens >= context:  # checked before anything runs
        raise BadRequest(
            f"--pipeline-tokens {args.pipeline_tokens} does not fit {gguf.name}'s context of "
            f"{context}"
        )
    out: dict[str, Any] = {"model": args.model, "gguf": gguf.name}
    with phase("prefix cache: turns", args.turns) as tick:
        out["prefix"] = asyncio.run(
            prefix_turns(gguf, args.quant, args.turns, args.turn_tokens, tick)
        )
    with phase("pipelined prefill", args.runs + 1) as tick:
        out["pipelined"] = asyncio.run(
            pipelined_prefill(gguf, args.pipeline_tokens, args.prefill_chunk, args.runs, tick)
        )
    models = [(gguf, args.model)]
    with contextlib.ExitStack() as stack:
        if args.widen:
            folder = Path(stack.enter_context(tempfile.TemporaryDirectory()))
            wide = widen_ffn(gguf, widened_path(folder, gguf, args.widen), args.widen)
            models.append((wide, f"{args.model}, FFN x{args.widen}"))
        out["speculation"] = []
        for path, label in models:
            total = len(SPEC_PROMPTS) * (args.runs + 1)
            with phase(f"speculation: {label}", total) as tick:
                spec = speculation(
                    path, label, args.quant, args.drafts, args.spec_tokens, args.runs, tick
                )
                row = asyncio.run(spec)
            row["parameters"] = _parameters(path)
            out["speculation"].append(row)
    return out


def _parameters(path: Path) -> int:
    import gguf

    return sum(int(t.n_elements) for t in gguf.GGUFReader(path).tensors)
