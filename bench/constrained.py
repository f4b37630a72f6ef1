"""Decode speed with a json_schema constraint against without, in one run, and the mask's cost.

SmolLM2 135M (the shipped GGUF) on the torch engine, CPU, through the real Scheduler and
LocalPipeline, one request at a time, greedy. Runs alternate free / constrained (--rounds each),
so drift hits both alike. Decode tok/s is the scheduler's own (tokens after the first, over the
time since the first). Mask time is `allowed()` + `advance()` of the llguidance constraint per
step, timed around the calls the scheduler makes, on the event loop's thread.

    python bench/constrained.py --rounds 3 --tokens 96 --threads 1
"""

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tests.helpers.smollm2 import SMOLLM  # noqa: E402

from shoal.engines.torch.engine import TorchEngine  # noqa: E402
from shoal.inference import grammar  # noqa: E402
from shoal.inference.pipeline import LocalPipeline  # noqa: E402
from shoal.inference.request import Finished, GenerationRequest, SamplingParams  # noqa: E402
from shoal.inference.scheduler import Scheduler  # noqa: E402
from shoal.models.gguf import GGUFSource  # noqa: E402
from shoal.types.ids import ModelId, RequestId  # noqa: E402
from shoal.types.shard import Shard  # noqa: E402

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "city": {"type": "string"},
        "hobbies": {"type": "array", "items": {"type": "string"}},
        "bio": {"type": "string"},
    },
    "required": ["name", "age", "city", "hobbies", "bio"],
}
ASK = [
    {
        "role": "user",
        "content": "Describe a fictional person as JSON with name, age, city, hobbies and a "
        "long bio.",
    }
]


class Timed:
    """A constraint whose calls are timed (seconds per step, allowed + advance)."""

    def __init__(self, inner: grammar.GrammarConstraint, times: list[float]) -> None:
        self._inner = inner
        self._times = times
        self._t = 0.0

    def allowed(self) -> np.ndarray | None:
        t0 = time.perf_counter()
        mask = self._inner.allowed()
        self._t = time.perf_counter() - t0
        return mask

    def advance(self, token: int) -> None:
        t0 = time.perf_counter()
        self._inner.advance(token)
        self._times.append(self._t + time.perf_counter() - t0)

    @property
    def finished(self) -> bool:
        return self._inner.finished


async def one(scheduler: Scheduler, req: GenerationRequest) -> Finished:
    async for event in scheduler.generate(req):
        if isinstance(event, Finished):
            return event
    raise RuntimeError("no Finished event")


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--tokens", type=int, default=96)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    source = GGUFSource(SMOLLM)
    tokenizer = source.tokenizer()
    engine = TorchEngine(device="cpu")
    layers = source.config.num_hidden_layers
    engine.load(
        Shard(model_id=ModelId("smollm2-135m"), start=0, end=layers, n_layers=layers), source
    )
    vocab = source.config.vocab_size
    scheduler = Scheduler(LocalPipeline([engine]), tokenizer, context_length=2048)
    steps = asyncio.create_task(scheduler.run())
    prompt = tuple(tokenizer.encode_chat(ASK))
    t0 = time.perf_counter()
    grammar.vocabulary(tokenizer, vocab)  # once per tokenizer, then cached
    vocab_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    factory = grammar.constraint_factory(
        tokenizer, grammar.json_schema(SCHEMA), vocab_size=vocab, param="response_format"
    )
    build_s = time.perf_counter() - t0
    times: list[float] = []
    sampling = SamplingParams(temperature=0.0, max_tokens=args.tokens)
    rates: dict[str, list[float]] = {"free": [], "json_schema": []}
    counts: dict[str, list[int]] = {"free": [], "json_schema": []}
    await one(scheduler, GenerationRequest(RequestId("warm"), ModelId("m"), prompt, sampling))
    for r in range(args.rounds):
        for kind in ("free", "json_schema"):
            constraint = None if kind == "free" else (lambda: Timed(factory(), times))
            req = GenerationRequest(
                RequestId(f"{kind}-{r}"), ModelId("m"), prompt, sampling, constraint=constraint
            )
            done = await one(scheduler, req)
            rates[kind].append(done.decode_tok_s)
            counts[kind].append(done.completion_tokens)
    steps.cancel()
    free, constrained = (statistics.median(rates[k]) for k in ("free", "json_schema"))
    report = {
        "model": "smollm2-135m (GGUF Q4_1, torch cpu)",
        "threads": args.threads,
        "rounds": args.rounds,
        "tokens": counts,
        "decode_tok_s": {k: [round(v, 1) for v in vs] for k, vs in rates.items()},
        "median_tok_s": {"free": round(free, 1), "json_schema": round(constrained, 1)},
        "slowdown_pct": round(100 * (1 - constrained / free), 1),
        # each round's pair side by side, so drift between rounds cancels
        "paired_slowdown_pct": round(
            100 * statistics.median(1 - c / f for f, c in zip(*rates.values(), strict=True)), 1
        ),
        "mask_ms_per_step": {
            "median": round(1e3 * statistics.median(times), 3),
            "p95": round(1e3 * float(np.percentile(times, 95)), 3),
            "max": round(1e3 * max(times), 3),
            "steps": len(times),
        },
        "vocabulary_build_ms": round(1e3 * vocab_s, 1),
        "grammar_build_ms": round(1e3 * build_s, 1),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
