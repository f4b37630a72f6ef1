"""`shoal bench`: decode tok/s, prompt tok/s and TTFT, shoal against its peers, in one run."""

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from shoal import __version__
from shoal.bench.peers import PEER_MODULES, PEERS, Sample, median
from shoal.errors import BadRequest, ModelUnavailable


def add_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("bench", help="benchmark shoal against llama.cpp and transformers")
    p.add_argument(
        "suite",
        nargs="?",
        choices=["engines", "cluster"],
        default="engines",
        help="engines: decode speed against the peers (default); cluster: a loopback "
        "cluster's API latency, splits, failover",
    )
    p.add_argument("--nodes", type=int, default=3, help="cluster suite: nodes to start")
    p.add_argument("--requests", type=int, default=200, help="cluster suite: GETs per node")
    p.add_argument("--model", default="smollm2-135m", help="model id (a card with a GGUF)")
    p.add_argument("--gguf", type=Path, help="benchmark this GGUF file instead")
    p.add_argument(
        "--peers",
        default="shoal,shoal-numpy,shoal-mlx,shoal-llamacpp,llamacpp,transformers",
        help="comma-separated: shoal, llamacpp, transformers (missing ones are skipped)",
    )
    p.add_argument("--prompt-tokens", type=int, nargs="+", default=[128, 512])
    p.add_argument("--gen-tokens", type=int, default=128)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    p.add_argument("--out", type=Path, default=Path("benchmark_results.json"))
    p.set_defaults(func=run_bench)


def _gguf_for(model: str) -> Path:
    from shoal.models.catalog import Catalog, find_local_weights

    found = find_local_weights(Catalog().get(model))
    if found is None or found[0] != "gguf":
        raise ModelUnavailable(f"no local GGUF for {model}; pass --gguf")
    return found[1]


def _run_peer(peer: str, gguf: Path, args: argparse.Namespace) -> list[dict[str, Any]]:
    cmd = [
        sys.executable,
        "-m",
        "shoal.bench.worker",
        "--peer",
        peer,
        "--gguf",
        str(gguf),
        "--threads",
        str(args.threads),
        "--gen-tokens",
        str(args.gen_tokens),
        "--runs",
        str(args.runs),
        "--prompt-tokens",
        *map(str, args.prompt_tokens),
    ]
    done = subprocess.run(
        cmd, capture_output=True, text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}
    )
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or ["(no output)"]
        raise RuntimeError(f"{peer} failed: {tail[0]}")
    return list(json.loads(done.stdout))


def run_bench(args: argparse.Namespace) -> None:
    if args.suite == "cluster":
        return run_cluster(args)
    console = Console(stderr=True)
    gguf = args.gguf or _gguf_for(args.model)
    peers = [p.strip() for p in args.peers.split(",") if p.strip()]
    unknown = [p for p in peers if p not in PEERS]
    if unknown:
        raise BadRequest(f"unknown peer(s) {', '.join(unknown)}; known: {', '.join(PEERS)}")
    results: dict[str, Any] = {}
    for peer in peers:
        if importlib.util.find_spec(PEER_MODULES[peer]) is None:
            console.print(f"[yellow]{peer}: not installed, skipped")
            results[peer] = {"skipped": f"{PEER_MODULES[peer]} is not installed"}
            continue
        with console.status(f"benchmarking {peer} ..."):
            t0 = time.perf_counter()
            try:
                results[peer] = {"samples": _run_peer(peer, gguf, args)}
            except RuntimeError as exc:
                console.print(f"[red]{exc}")
                results[peer] = {"skipped": str(exc)}
                continue
        console.print(f"{peer}: done in {time.perf_counter() - t0:.0f} s")
    summary = _summarise(results, args.prompt_tokens)
    report = {
        "shoal_version": __version__,
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "processor": platform.processor(),
        },
        "settings": {
            "gguf": str(gguf),
            "threads": args.threads,
            "gen_tokens": args.gen_tokens,
            "runs": args.runs,
            "prompt_tokens": args.prompt_tokens,
        },
        "results": results,
        "summary": summary,
    }
    args.out.write_text(json.dumps(report, indent=2))
    _print_table(summary, args)
    console.print(f"wrote {args.out}")


def _summarise(results: dict[str, Any], prompt_lengths: list[int]) -> dict[str, Any]:
    """Median per peer and prompt length, and each peer's ratio to shoal (>1 = shoal faster)."""
    out: dict[str, Any] = {}
    for peer, result in results.items():
        for n in prompt_lengths:
            samples = [
                Sample(s["prompt_tokens"], s["generated"], s["ttft_s"], s["decode_s"])
                for s in result.get("samples", [])
                if s["prompt_tokens"] == n
            ]
            if samples:
                out.setdefault(peer, {})[str(n)] = {
                    "ttft_ms": median([s.ttft_s * 1000 for s in samples]),
                    "prompt_tok_s": median([s.prompt_tok_s for s in samples]),
                    "decode_tok_s": median([s.decode_tok_s for s in samples]),
                }
    mine = out.get("shoal", {})
    for peer, by_len in out.items():
        for n, row in by_len.items():
            if peer != "shoal" and n in mine:
                row["shoal_decode_ratio"] = mine[n]["decode_tok_s"] / row["decode_tok_s"]
                row["shoal_ttft_ratio"] = mine[n]["ttft_ms"] / row["ttft_ms"]
    return out


def _print_table(summary: dict[str, Any], args: argparse.Namespace) -> None:
    table = Table(
        title=f"decode {args.gen_tokens} tokens, {args.threads} threads, median of {args.runs}"
    )
    for column in (
        "engine",
        "prompt",
        "TTFT ms",
        "prompt tok/s",
        "decode tok/s",
        "shoal decode ×",
        "shoal TTFT ×",
    ):
        table.add_column(column, justify="right")
    for peer, by_len in summary.items():
        for n, row in by_len.items():
            ratio = row.get("shoal_decode_ratio")
            ttft_ratio = row.get("shoal_ttft_ratio")
            table.add_row(
                peer,
                n,
                f"{row['ttft_ms']:.1f}",
                f"{row['prompt_tok_s']:.0f}",
                f"{row['decode_tok_s']:.1f}",
                f"{ratio:.2f}" if ratio else "—",
                f"{ttft_ratio:.2f}" if ttft_ratio else "—",
            )
    Console().print(table)


def run_cluster(args: argparse.Namespace) -> None:
    """The cluster suite: a table per measurement, and the JSON."""
    from shoal.bench.cluster import run_cluster_bench

    console = Console(stderr=True)
    with console.status(f"starting {args.nodes} nodes and measuring ..."):
        result = run_cluster_bench(args.nodes, args.requests, args.gen_tokens, args.runs)
    report = {"shoal_version": __version__, "suite": "cluster", **result}
    args.out.write_text(json.dumps(report, indent=2))
    out = Console()
    out.print(
        f"joined a {args.nodes}-node cluster in {result['join_s']:.2f} s; master failover "
        f"after kill -9: {result.get('failover_s', float('nan')) * 1000:.0f} ms"
    )
    if "stage_failover" in result:
        gap = result["stage_failover"]["kill_to_next_token_s"]
        out.print(f"stage node killed mid-stream: next token after {gap:.2f} s")
    latency = Table(title=f"GET /v1/models, {args.requests} requests per node (ms)")
    for column in ("node", "min", "max", "avg", "median", "models/s"):
        latency.add_column(column, justify="right")
    for node, row in result["api_latency"].items():
        latency.add_row(
            node[:16] + "…",
            *(f"{row[k]:.2f}" for k in ("min_ms", "max_ms", "avg_ms", "median_ms")),
            f"{row['models_per_s']:.0f}",
        )
    out.print(latency)
    speed = Table(title=f"smollm2-135m, {args.gen_tokens} tokens, median of {args.runs}")
    for column in ("layout", "decode tok/s", "TTFT ms", "× 1 node", "added ms/hop"):
        speed.add_column(column, justify="right")
    for name, row in result["inference"].items():
        hop = row.get("added_ms_per_hop")
        speed.add_row(
            name,
            f"{row['decode_tok_s']:.1f}",
            f"{row['ttft_ms']:.0f}",
            f"{row['ratio_to_1_node']:.2f}",
            "—" if hop is None else f"{hop:.2f}",
        )
    out.print(speed)
    console.print(f"wrote {args.out}")
