"""Inference through the HTTP API: TTFT, prompt and decode tok/s on a prompt × output grid, for
one node and 2- and 3-stage splits, and aggregate tok/s of concurrent streams.

Prompts are ordinary English sized in tokens: two probes through the API (usage.prompt_tokens)
give tokens per word of the text and the chat template's overhead, then each length is refined
with a probe or two. The actual prompt length of every request is in its sample.
"""

import asyncio
import itertools
import statistics
from typing import Any

import httpx

from shoal.bench.errors import BenchError
from shoal.bench.stream import STREAM_TIMEOUT, StreamSample, aggregate_tok_s, stream_chat, streams

TEXT = (
    "The history of the city is long and full of change. Merchants came by river and by road, "
    "and each century left its mark on the streets, the markets and the language of the people."
)
ASK = "Now write a very long story about this city and its people."
WARM_UP_TOKENS = 8


def prompt_text(words: int) -> str:
    """`words` words of the text, then the request for a long answer."""
    return " ".join(itertools.islice(itertools.cycle(TEXT.split()), words)) + "\n\n" + ASK


def layouts(node_ids: list[str], layers: int) -> dict[str, str]:
    """1 node, then 2 and 3 stages over the first nodes, layers split evenly: name → layers."""
    out = {}
    for k in range(1, min(3, len(node_ids)) + 1):
        cuts = [round(i * layers / k) for i in range(k + 1)]
        spec = ",".join(f"{node_ids[i]}:{cuts[i]}-{cuts[i + 1]}" for i in range(k))
        out["1 node" if k == 1 else f"{k} stages"] = spec
    return out


async def _prompt_tokens(client: httpx.AsyncClient, model: str, words: int) -> int:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": prompt_text(words)}],
        "max_tokens": 1,
    }
    r = await client.post("/v1/chat/completions", json=body)
    if r.status_code != 200:
        raise BenchError(f"sizing the prompt failed: HTTP {r.status_code} {r.text[:200]}")
    return int(r.json()["usage"]["prompt_tokens"])


async def calibrate(url: str, model: str, targets: list[int]) -> dict[int, int]:
    """Words of text that make each target prompt length (as near as the text allows)."""
    async with httpx.AsyncClient(base_url=url, timeout=STREAM_TIMEOUT) as client:
        low, high = await _prompt_tokens(client, model, 8), await _prompt_tokens(client, model, 200)
        per_word = (high - low) / 192
        words = {}
        for target in targets:
            n = max(1, round(8 + (target - low) / per_word))
            for _ in range(3):
                miss = target - await _prompt_tokens(client, model, n)
                if miss == 0 or (n == 1 and miss < 0):
                    break
                n = max(1, n + (round(miss / per_word) or (1 if miss > 0 else -1)))
            words[target] = n
        return words


async def _sequential(
    url: str, model: str, content: str, tokens: int, runs: int
) -> list[StreamSample]:
    async with httpx.AsyncClient(base_url=url, timeout=STREAM_TIMEOUT) as client:
        return [await stream_chat(client, model, content, tokens) for _ in range(runs)]


def warm_up(url: str, instance: str) -> None:
    """One short stream: connects the entry node to the pipeline and wakes every stage."""
    asyncio.run(_sequential(url, instance, prompt_text(8), WARM_UP_TOKENS, 1))


def cell(url: str, instance: str, words: int, tokens: int, runs: int) -> list[StreamSample]:
    """`runs` streams one after another on an instance."""
    return asyncio.run(_sequential(url, instance, prompt_text(words), tokens, runs))


def cell_summary(samples: list[StreamSample]) -> dict[str, float]:
    """Medians over a cell's runs."""

    def med(key: str) -> float:
        return float(statistics.median(s.to_json()[key] for s in samples))

    keys = ("ttft_ms", "prompt_tok_s", "decode_tok_s", "prompt_tokens", "completion_tokens")
    return {k: med(k) for k in keys}


def concurrent(url: str, instance: str, words: int, tokens: int, n: int) -> dict[str, Any]:
    """n streams at once: aggregate tok/s, and each stream's own sample."""
    samples = asyncio.run(streams(url, instance, prompt_text(words), tokens, n))
    return {
        "aggregate_tok_s": aggregate_tok_s(samples),
        "wall_s": max(s.end for s in samples) - min(s.start for s in samples),
        "samples": [s.to_json() for s in samples],
    }


def concurrency_summary(runs: list[dict[str, Any]]) -> dict[str, float]:
    """Medians over runs: aggregate tok/s, and per stream TTFT and decode tok/s."""
    every = [s for r in runs for s in r["samples"]]
    return {
        "aggregate_tok_s": statistics.median(r["aggregate_tok_s"] for r in runs),
        "ttft_ms": statistics.median(s["ttft_ms"] for s in every),
        "decode_tok_s_per_stream": statistics.median(s["decode_tok_s"] for s in every),
    }


def splits(grid: list[dict[str, Any]], hops: dict[str, int]) -> dict[str, dict[str, float]]:
    """Each split against 1 node, cell by cell, medians over the cells: speed ratios and the
    latency each added hop costs per token and before the first token."""
    one = {
        (c["prompt_tokens"], c["gen_tokens"]): c["summary"] for c in grid if not hops[c["layout"]]
    }
    by_layout: dict[str, list[tuple[dict[str, float], dict[str, float]]]] = {}
    for c in grid:
        key = (c["prompt_tokens"], c["gen_tokens"])
        if hops[c["layout"]] and key in one:
            by_layout.setdefault(c["layout"], []).append((c["summary"], one[key]))
    out = {}
    for layout, pairs in by_layout.items():
        k = hops[layout]
        out[layout] = {
            "stages": k + 1,
            "decode_ratio_to_1_node": statistics.median(
                s["decode_tok_s"] / o["decode_tok_s"] for s, o in pairs
            ),
            "ttft_ratio_to_1_node": statistics.median(
                s["ttft_ms"] / o["ttft_ms"] for s, o in pairs
            ),
            "added_ms_per_token_per_hop": statistics.median(
                (1000 / s["decode_tok_s"] - 1000 / o["decode_tok_s"]) / k for s, o in pairs
            ),
            "added_ttft_ms_per_hop": statistics.median(
                (s["ttft_ms"] - o["ttft_ms"]) / k for s, o in pairs
            ),
        }
    return out
