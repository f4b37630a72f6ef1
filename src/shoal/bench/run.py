"""One `shoal bench` run: peers, then the cluster (the one at --url, or a loopback one it
starts): the seed's tables, inference through the API, failover; progress on stderr."""

import argparse
import asyncio
import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import httpx
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from shoal.bench import engines, failover, inference, noisy, seed, speedups
from shoal.bench.cluster import Loopback, delete, loopback, place, ready, until
from shoal.bench.errors import BenchError
from shoal.bench.target import Endpoint, discover, parse_urls

Tick = Callable[[str], None]


class Steps:
    """Progress on stderr: one bar per phase, advanced as each measurement lands."""

    def __init__(self, progress: Progress) -> None:
        self.progress = progress

    @contextlib.contextmanager
    def phase(self, name: str, total: int) -> Iterator[Tick]:
        task = self.progress.add_task(name, total=total)

        def tick(detail: str) -> None:
            self.progress.update(task, advance=1, description=f"{name}: {detail}")

        yield tick
        self.progress.update(task, completed=total, description=name)


def _progress() -> Progress:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    return Progress(*columns, TimeElapsedColumn(), console=Console(stderr=True))


# --- the seed's tables ----------------------------------------------------------------------------


def seed_tables(nodes: list[Endpoint], args: argparse.Namespace, steps: Steps) -> dict[str, Any]:
    """API latency, listing and availability per node; RTT for every ordered pair of nodes."""
    up = [n for n in nodes if n.up]
    out: dict[str, Any] = {"api": {}, "availability": {}}
    with steps.phase("GET /v1/models", len(up)) as tick:
        for node in up:
            out["api"][node.node_id] = seed.api_latency(node, args.requests)
            tick(node.url)
    for node in nodes:
        row = out["api"].get(node.node_id, {"requests": 0, "answered": 0})
        out["availability"][node.node_id] = seed.availability(node, row)
    pairs = [(a, b) for a in up for b in up if a is not b]
    if pairs:
        table: dict[str, dict[str, Any]] = {}
        with steps.phase("RTT", len(pairs)) as tick:
            for a, b in pairs:
                table.setdefault(a.node_id, {})[b.node_id] = seed.rtt(a, b, args.pings)
                tick(f"{a.node_id[:12]}… → {b.node_id[:12]}…")
        out["rtt"] = {"pairs": table, "overall_ms": seed.rtt_overall(table)}
    return out


# --- inference ------------------------------------------------------------------------------------


def _layers(url: str, model: str) -> int:
    r = httpx.get(f"{url}/v1/models/{model}", timeout=10)
    if r.status_code != 200:
        raise BenchError(f"{url} does not know model {model}: HTTP {r.status_code}")
    return int(r.json()["layers"])


def _place_all(url: str, model: str, specs: dict[str, str], steps: Steps) -> dict[str, str]:
    placed: dict[str, str] = {}
    with steps.phase("placing and warming up", len(specs)) as tick:
        for name, spec in specs.items():
            placed[name] = place(url, model, spec)
        until(lambda: ready(url, placed.values()), 600, "the instances to load")
        for name, instance in placed.items():
            inference.warm_up(url, instance)
            tick(name)
    return placed


def _grid(
    url: str, placed: dict[str, str], words: dict[int, int], args: argparse.Namespace, steps: Steps
) -> list[dict[str, Any]]:
    cells = [(n, p, g) for n in placed for p in args.prompt_tokens for g in args.gen_tokens]
    grid = []
    with steps.phase("inference grid", len(cells)) as tick:
        for name, prompt, gen in cells:
            samples = inference.cell(url, placed[name], words[prompt], gen, args.runs)
            grid.append(
                {
                    "layout": name,
                    "prompt_tokens": prompt,
                    "gen_tokens": gen,
                    "summary": inference.cell_summary(samples),
                    "samples": [s.to_json() for s in samples],
                }
            )
            tick(f"{name}, {prompt} + {gen} tokens")
    return grid


def _concurrency(
    url: str, placed: dict[str, str], words: dict[int, int], args: argparse.Namespace, steps: Steps
) -> list[dict[str, Any]]:
    prompt, gen = min(args.prompt_tokens), min(args.gen_tokens)
    cells = [(name, n) for name in placed for n in args.concurrency]
    out = []
    with steps.phase("concurrent streams", len(cells)) as tick:
        for name, n in cells:
            runs = [
                inference.concurrent(url, placed[name], words[prompt], gen, n)
                for _ in range(args.runs)
            ]
            summary = inference.concurrency_summary(runs)
            out.append(
                {"layout": name, "streams": n, "prompt_tokens": prompt, "gen_tokens": gen}
                | {"summary": summary, "runs": runs}
            )
            tick(f"{name}, {n} streams")
    return out


def inference_tables(
    entry: Endpoint, nodes: list[Endpoint], args: argparse.Namespace, steps: Steps
) -> dict[str, Any]:
    """Place 1-node and split instances through `entry`, measure them, delete them."""
    layers = _layers(entry.url, args.model)
    specs = inference.layouts([n.node_id for n in nodes if n.up], layers)
    hops = {name: spec.count(",") for name, spec in specs.items()}
    placed: dict[str, str] = {}
    try:
        placed = _place_all(entry.url, args.model, specs, steps)
        words = asyncio.run(inference.calibrate(entry.url, placed["1 node"], args.prompt_tokens))
        grid = _grid(entry.url, placed, words, args, steps)
        concurrency = _concurrency(entry.url, placed, words, args, steps)
    finally:
        for instance in placed.values():
            with contextlib.suppress(httpx.HTTPError):
                delete(entry.url, instance)
    out = {
        "model": args.model,
        "layers": layers,
        "entry": entry.node_id,
        "layouts": {
            name: {"layers": spec, "instance": placed[name], "hops": hops[name]}
            for name, spec in specs.items()
        },
        "prompt_words": {str(k): v for k, v in words.items()},
        "grid": grid,
        "concurrency": concurrency,
    }
    split = inference.splits(grid, hops)
    return out | ({"splits": split} if split else {})


def noisy_tables(entry: Endpoint, args: argparse.Namespace, steps: Steps) -> dict[str, Any]:
    """A 1-node instance on `entry`: the short chat alone and beside a long prefill."""
    layers = _layers(entry.url, args.model)
    spec = inference.layouts([entry.node_id], layers)["1 node"]
    placed: dict[str, str] = {}
    try:
        placed = _place_all(entry.url, args.model, {"1 node": spec}, steps)
        instance, target = placed["1 node"], args.noisy_prompt_tokens
        words = asyncio.run(inference.calibrate(entry.url, instance, [target]))[target]
        with steps.phase("noisy neighbour", 1) as tick:
            out = noisy.measure(
                entry.url,
                instance,
                inference.prompt_text(words),
                args.noisy_gen_tokens,
                args.runs,
                args.prefill_chunk,
            )
            tick(f"{args.runs} runs")
    finally:
        for instance in placed.values():
            with contextlib.suppress(httpx.HTTPError):
                delete(entry.url, instance)
    return {"model": args.model, "layers": spec} | out


# --- the run --------------------------------------------------------------------------------------


def failover_tables(
    cluster: Loopback, args: argparse.Namespace, layers: int, steps: Steps
) -> dict[str, Any]:
    """Stage failover, then master failover (each needs the nodes the previous one left)."""
    content = inference.prompt_text(32)
    with steps.phase("failover", 2) as tick:
        stage = failover.stage_failover(cluster, args.model, layers, content, args.failover_tokens)
        tick("stage node killed")
        master = failover.master_failover(cluster)
        tick("master killed")
    return {"stage": stage, "master": master}


def measure_cluster(
    nodes: list[Endpoint], cluster: Loopback | None, args: argparse.Namespace, steps: Steps
) -> dict[str, Any]:
    """Everything measured on a cluster; failover only on one the bench started."""
    out: dict[str, Any] = {
        "cluster": {
            "started_by_bench": cluster is not None,
            "nodes": [{"node_id": n.node_id, "url": n.url, "up": n.up} for n in nodes],
        }
    }
    if cluster is not None:
        out["cluster"]["join_s"] = cluster.join_s
    if args.suite == "noisy":
        return out | {"noisy": noisy_tables(nodes[0], args, steps)}
    out |= seed_tables(nodes, args, steps)
    out["inference"] = inference_tables(nodes[0], nodes, args, steps)
    if cluster is not None and len(nodes) >= 2:
        out["failover"] = failover_tables(cluster, args, out["inference"]["layers"], steps)
    return out


def measure(args: argparse.Namespace) -> dict[str, Any]:
    """Every part the suite asks for; a request that fails ends the run with one line."""
    try:
        return _measure(args)
    except httpx.HTTPError as exc:
        raise BenchError(f"a request to a node failed: {type(exc).__name__}: {exc}") from exc


def _measure(args: argparse.Namespace) -> dict[str, Any]:
    """Checks what it can (URLs, peer names) before starting anything."""
    urls = parse_urls(args.url or [])
    with_cluster = args.suite in ("full", "cluster", "noisy")
    with_peers = args.suite in ("full", "engines") and not args.no_peers
    nodes = discover(urls) if urls and with_cluster else []
    peers = engines.select(args.peers) if with_peers else []
    gguf = (args.gguf or engines.gguf_for(args.model)) if with_peers else None
    out: dict[str, Any] = {}
    with _progress() as progress:
        steps = Steps(progress)
        if args.suite == "speedups":
            gguf_path = args.gguf or engines.gguf_for(args.model)
            return {"speedups": speedups.measure(args, gguf_path, steps.phase)}
        if gguf is not None:
            with steps.phase("peers", len(peers)) as tick:
                grid = (args.prompt_tokens, args.gen_tokens)
                out["peers"] = engines.run_peers(
                    peers, gguf, args.threads, grid, args.runs, tick, args.concurrency
                )
        elif args.suite == "full":
            out["peers"] = {"skipped": "--no-peers"}
        if with_cluster and nodes:
            out |= measure_cluster(nodes, None, args, steps)
        elif with_cluster:
            size = 1 if args.suite == "noisy" else args.nodes  # noisy: one node is enough
            with contextlib.ExitStack() as stack:
                with steps.phase(f"starting {size} nodes", 1) as tick:
                    lb = stack.enter_context(loopback(size))
                    tick("joined")
                out |= measure_cluster(lb.endpoints(), lb, args, steps)
    return out
