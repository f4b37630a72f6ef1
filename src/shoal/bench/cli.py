"""`shoal bench`: the full report (default), or its `engines` or `cluster` part alone."""

import argparse
import os
from pathlib import Path

from rich.console import Console

from shoal.errors import BadRequest


def add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark a cluster (running or started here) and the engines against their peers",
    )
    p.add_argument(
        "suite",
        nargs="?",
        choices=["full", "engines", "cluster", "noisy", "speedups"],
        default="full",
        help="full (default): everything; engines: in-process engines against llama.cpp and "
        "transformers; cluster: API latency, RTT, inference, splits, failover; noisy: a short "
        "chat beside a long prompt's prefill on one node; speedups: prefix caching, pipelined "
        "prefill and speculative decoding, each against without (the last two not in full)",
    )
    p.add_argument(
        "--url",
        action="append",
        help="a node of a running cluster (repeat, or comma-separate); every node of its "
        "cluster is measured, nothing is killed. Default: start a loopback cluster",
    )
    p.add_argument("--nodes", type=int, default=3, help="nodes of the loopback cluster (3)")
    p.add_argument("--requests", type=int, default=200, help="GET /v1/models per node (200)")
    p.add_argument("--pings", type=int, default=20, help="control-plane pings per pair (20)")
    p.add_argument("--model", default="smollm2-135m", help="model id (default smollm2-135m)")
    p.add_argument("--gguf", type=Path, help="engines: benchmark this GGUF file instead")
    p.add_argument("--peers", help="engines to compare, comma-separated (default: all known)")
    p.add_argument("--no-peers", action="store_true", help="skip the engines part")
    p.add_argument("--prompt-tokens", type=int, nargs="+", default=[128, 512])
    p.add_argument("--gen-tokens", type=int, nargs="+", default=[32, 128])
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 8])
    p.add_argument("--runs", type=int, default=3, help="repeats per measurement (3)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="engines' threads")
    p.add_argument(
        "--failover-tokens", type=int, default=64, help="length of the stream killed mid-way"
    )
    p.add_argument(
        "--noisy-prompt-tokens", type=int, default=4096, help="noisy: the long prompt (4096)"
    )
    p.add_argument("--noisy-gen-tokens", type=int, default=128, help="noisy: the short chat (128)")
    p.add_argument(
        "--prefill-chunk",
        type=int,
        default=256,
        help="noisy: the node's --prefill-chunk (256, its default), to time one chunk; "
        "speedups: the chunk pipelined prefill sends",
    )
    p.add_argument(
        "--quant",
        default="int4",
        choices=["none", "int8", "int4"],
        help="speedups: the torch engine's weights (int4: the native kernels)",
    )
    p.add_argument("--turns", type=int, default=8, help="speedups: turns of the chat (8)")
    p.add_argument(
        "--turn-tokens", type=int, default=48, help="speedups: tokens each answer of the chat (48)"
    )
    p.add_argument(
        "--pipeline-tokens",
        type=int,
        default=4096,
        help="speedups: the prompt sent through 3 stages and 1 (4096)",
    )
    p.add_argument(
        "--drafts", type=int, nargs="+", default=[4, 8], help="speedups: draft sizes (4 8)"
    )
    p.add_argument("--spec-tokens", type=int, default=96, help="speedups: tokens each decode (96)")
    p.add_argument(
        "--widen",
        type=int,
        default=8,
        help="speedups: speculation also on the model with its FFN this many times as wide, "
        "made here (8: 0.69 B parameters from SmolLM2's 0.13 B; 0: not)",
    )
    p.add_argument("--out-dir", type=Path, default=Path("."), help="where the report goes (.)")
    p.add_argument("--out", type=Path, help="the JSON's path (report and plots beside it)")
    p.set_defaults(func=run_bench)


def _check(args: argparse.Namespace) -> None:
    counts = {
        "--nodes": [args.nodes],
        "--requests": [args.requests],
        "--pings": [args.pings],
        "--runs": [args.runs],
        "--threads": [args.threads],
        "--prompt-tokens": args.prompt_tokens,
        "--gen-tokens": args.gen_tokens,
        "--concurrency": args.concurrency,
        "--noisy-prompt-tokens": [args.noisy_prompt_tokens],
        "--noisy-gen-tokens": [args.noisy_gen_tokens],
        "--prefill-chunk": [args.prefill_chunk],
        "--turns": [args.turns],
        "--turn-tokens": [args.turn_tokens],
        "--pipeline-tokens": [args.pipeline_tokens],
        "--drafts": args.drafts,
        "--spec-tokens": [args.spec_tokens],
    }
    for flag, values in counts.items():
        if min(values) < 1:
            raise BadRequest(f"{flag} must be at least 1")
    if args.widen and (args.widen < 2 or args.widen & (args.widen - 1)):
        raise BadRequest(f"--widen must be 0 or a power of two from 2, not {args.widen}")
    if args.failover_tokens <= 8:
        raise BadRequest("--failover-tokens must be more than 8 (the kill comes after 8)")


def run_bench(args: argparse.Namespace) -> None:
    from shoal.bench import plots
    from shoal.bench.report import assemble, frame, markdown, output_paths, write_json
    from shoal.bench.run import measure
    from shoal.bench.tables import sections, to_rich

    _check(args)
    plots.require()
    head = frame(args)
    report = assemble(head, measure(args))
    json_path, md_path = output_paths(args)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    report["files"] = {
        "json": json_path.name,
        "markdown": md_path.name,
        "plots": plots.write_plots(report, json_path.parent),
    }
    write_json(report, json_path)
    md_path.write_text(markdown(report))
    out = Console()
    for section in sections(report):
        out.print(to_rich(section))
    Console(stderr=True).print(f"wrote {json_path}, {md_path} and the plots beside them")
