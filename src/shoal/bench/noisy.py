"""The noisy neighbour: a short chat beside a long prompt's prefill on the same instance.

The scheduler runs every decoding request plus at most one prefill chunk per step, so a long
prompt should cost a running stream about one chunk per step, never the whole prefill. Each run
measures, through the HTTP API and timed at the client:

- alone: the short chat by itself: its TTFT, its largest gap between content chunks and its
  median gap (one decode step);
- the long prompt alone (one output token), and a prompt of one chunk's tokens alone: its TTFT is
  one prefill chunk's time (the scheduler weighs a deep chunk's attention, so it aims at keeping
  every step's prefill to about this);
- gap: the short chat again, the long prompt sent once it has streamed a few chunks: its
  largest gap (the goal: at most 2 decode steps + 1 prefill chunk);
- TTFT: the long prompt first, the short chat sent just after: its TTFT.
"""

import asyncio
import math
import statistics
from typing import Any

import httpx

from shoal.bench.stream import STREAM_TIMEOUT, StreamSample, stream_chat

SHORT = "Write a long story about a lighthouse keeper and the sea."
CHUNKS_BEFORE_NOISE = 4  # the short chat is decoding when the long prompt is sent
TTFT_DELAY_S = 0.05  # the long prompt is on the server (its prefill begun) when the chat goes


def largest_gap_s(sample: StreamSample) -> float:
    """The longest wait between two content chunks of one stream."""
    stamps = sample.stamps
    return max((b - a for a, b in zip(stamps, stamps[1:], strict=False)), default=0.0)


def median_gap_s(sample: StreamSample) -> float:
    stamps = sample.stamps
    gaps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    return statistics.median(gaps) if gaps else 0.0


async def _one_run(
    client: httpx.AsyncClient, model: str, long_text: str, gen: int, prefill_chunk: int
) -> dict[str, float]:
    """Alone, the long prompt alone, then the two side-by-side cases; one run's figures."""
    alone = await stream_chat(client, model, SHORT, gen)
    long_alone = await stream_chat(client, model, long_text, 1)
    share = prefill_chunk / max(1, long_alone.prompt_tokens)
    chunk_alone = await stream_chat(client, model, long_text[: int(len(long_text) * share)], 1)

    noise_sent = asyncio.Event()

    def after_chunk(n: int) -> None:
        if n == CHUNKS_BEFORE_NOISE:
            noise_sent.set()

    async def noise_after_chunks() -> StreamSample:
        await noise_sent.wait()
        return await stream_chat(client, model, long_text, 1)

    beside, _ = await asyncio.gather(
        stream_chat(client, model, SHORT, gen, on_chunk=after_chunk), noise_after_chunks()
    )

    async def chat_after_delay() -> StreamSample:
        await asyncio.sleep(TTFT_DELAY_S)
        return await stream_chat(client, model, SHORT, gen)

    _, late = await asyncio.gather(stream_chat(client, model, long_text, 1), chat_after_delay())
    return {
        "long_prompt_tokens": long_alone.prompt_tokens,
        "long_alone_ttft_ms": long_alone.ttft_s * 1000,
        "chunk_alone_ttft_ms": chunk_alone.ttft_s * 1000,
        "alone_ttft_ms": alone.ttft_s * 1000,
        "alone_max_gap_ms": largest_gap_s(alone) * 1000,
        "decode_step_ms": median_gap_s(alone) * 1000,
        "alone_tokens": alone.completion_tokens,
        "with_prefill_ttft_ms": late.ttft_s * 1000,
        "with_prefill_max_gap_ms": largest_gap_s(beside) * 1000,
        "with_prefill_tokens": beside.completion_tokens,
    }


def summarise(runs: list[dict[str, float]], prefill_chunk: int) -> dict[str, Any]:
    """Medians over runs, the ratios (beside the prefill ÷ alone) and the gap budget."""

    def med(key: str) -> float:
        return float(statistics.median(r[key] for r in runs))

    prompt = med("long_prompt_tokens")
    chunks = max(1, math.ceil(prompt / prefill_chunk))
    step, chunk = med("decode_step_ms"), med("chunk_alone_ttft_ms")
    budget = 2 * step + chunk
    gap = med("with_prefill_max_gap_ms")
    return {
        "long_prompt_tokens": prompt,
        "prefill_chunk_tokens": prefill_chunk,
        "prefill_chunks": chunks,
        "decode_step_ms": step,
        "prefill_chunk_ms": chunk,
        "prefill_chunk_mean_ms": med("long_alone_ttft_ms") / chunks,  # the long prompt's
        "alone": {"ttft_ms": med("alone_ttft_ms"), "max_gap_ms": med("alone_max_gap_ms")},
        "with_prefill": {"ttft_ms": med("with_prefill_ttft_ms"), "max_gap_ms": gap},
        "ttft_ratio": med("with_prefill_ttft_ms") / med("alone_ttft_ms"),
        "max_gap_ratio": gap / med("alone_max_gap_ms"),
        "gap_budget_ms": budget,
        "gap_within_budget": gap <= budget,
    }


def measure(
    url: str, model: str, long_text: str, gen: int, runs: int, prefill_chunk: int
) -> dict[str, Any]:
    """`runs` rounds on the instance `model` at url: the summary and every run's figures."""

    async def all_runs() -> list[dict[str, float]]:
        limits = httpx.Limits(max_connections=4)
        async with httpx.AsyncClient(base_url=url, timeout=STREAM_TIMEOUT, limits=limits) as c:
            return [await _one_run(c, model, long_text, gen, prefill_chunk) for _ in range(runs)]

    samples = asyncio.run(all_runs())
    return {"gen_tokens": gen, "summary": summarise(samples, prefill_chunk), "runs": samples}
