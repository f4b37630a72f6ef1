"""Runs one peer's benchmark in its own process and prints its samples as JSON on stdout.

A process per peer keeps their thread pools, allocators and imports from disturbing each other.
"""

import argparse
import itertools
import json
import sys
from dataclasses import asdict
from pathlib import Path

from shoal.bench.peers import PEERS, SchedulerRunner

TEXT = (
    "The history of the city is long and full of change. Merchants came by river and by road, "
    "and each century left its mark on the streets, the markets and the language of the people. "
)


def prompt_ids(gguf: Path, n: int) -> list[int]:
    """Exactly n token ids of ordinary English, from shoal's tokenizer of the same GGUF."""
    from shoal.models.source import open_weights

    tokenizer = open_weights(gguf).tokenizer()
    ids: list[int] = []
    while len(ids) < n:
        ids += tokenizer.encode(TEXT)
    return ids[:n]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--peer", choices=sorted(PEERS), required=True)
    p.add_argument("--gguf", type=Path, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--prompt-tokens", type=int, nargs="+", required=True)
    p.add_argument("--gen-tokens", type=int, nargs="+", required=True)
    p.add_argument("--runs", type=int, required=True)
    p.add_argument("--streams", type=int, nargs="*", default=[], help="concurrent requests")
    args = p.parse_args()
    runner = PEERS[args.peer](args.gguf, args.threads)
    runner(prompt_ids(args.gguf, 8), 4)  # warm-up: first-call allocations and lazy inits
    out = []
    for n in args.prompt_tokens:
        prompt = prompt_ids(args.gguf, n)
        for gen, run in itertools.product(args.gen_tokens, range(args.runs)):
            sample = runner(prompt, gen)
            out.append({"gen_tokens": gen, "run": run, **asdict(sample)})
    if isinstance(runner, SchedulerRunner):  # continuous batching: k requests at once
        prompt, gen = prompt_ids(args.gguf, args.prompt_tokens[0]), max(args.gen_tokens)
        for k, run in itertools.product(args.streams, range(args.runs)):
            rate = runner.streams(prompt, gen, k)
            out.append({"streams": k, "run": run, "prompt_tokens": len(prompt), "tok_s": rate})
    json.dump(out, sys.stdout)


if __name__ == "__main__":
    main()
