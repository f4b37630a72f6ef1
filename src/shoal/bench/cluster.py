"""`shoal bench cluster`: a loopback cluster measured the way the seed cluster was, and more.

Starts N real `shoal node` processes, then measures: time from process start to joined cluster;
`GET /v1/models` latency per node (min / max / avg / median over many requests, as the seed
cluster's table) and model-listing throughput; decode tok/s of smollm2 on one node against 2- and
3-stage splits in the same run, and the added latency per hop; master failover after kill -9.
"""

import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx

from shoal.bench.nodes import NodeProcess, start_cluster_node

MODEL = "smollm2-135m"
PROMPT = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]


def _until(condition: Callable[[], bool], timeout: float) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        try:
            if condition():
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        time.sleep(0.02)
    raise TimeoutError(f"condition not met within {timeout} s")


def _joined(nodes: list[NodeProcess]) -> bool:
    states = [n.get("/state") for n in nodes]
    return len({str(s) for s in states}) == 1 and sum(
        1 for r in states[0]["nodes"].values() if r["connected"] and r["profile"]
    ) == len(nodes)


def latency_table(node: NodeProcess, requests: int) -> dict[str, Any]:
    """The seed cluster's API latency row: GET /v1/models, in ms."""
    samples = []
    with httpx.Client(base_url=node.url, timeout=10) as client:
        client.get("/v1/models")  # warm the connection
        for _ in range(requests):
            t0 = time.perf_counter()
            client.get("/v1/models").raise_for_status()
            samples.append((time.perf_counter() - t0) * 1000)
        listed = len(client.get("/v1/models").json()["data"])
    return {
        "min_ms": min(samples),
        "max_ms": max(samples),
        "avg_ms": statistics.fmean(samples),
        "median_ms": statistics.median(samples),
        "models_listed": listed,
        "models_per_s": listed / (statistics.median(samples) / 1000),
        "samples_ms": samples,
    }


def decode_rate(node: NodeProcess, instance: str, tokens: int) -> dict[str, float]:
    """One streamed greedy request on a pinned instance: TTFT and decode tok/s."""
    body = {
        "model": instance,
        "messages": PROMPT,
        "temperature": 0,
        "max_tokens": tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    stamps: list[float] = []
    t0 = time.perf_counter()
    with httpx.stream("POST", f"{node.url}/v1/chat/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and '"content":"' in line and '"content":""' not in line:
                stamps.append(time.perf_counter())
    decode = (len(stamps) - 1) / (stamps[-1] - stamps[0]) if len(stamps) > 1 else 0.0
    return {
        "ttft_ms": (stamps[0] - t0) * 1000 if stamps else 0.0,
        "decode_tok_s": decode,
        "tokens": len(stamps),
    }


def stage_failover(nodes: list[NodeProcess], tokens: int) -> dict[str, float]:
    """Kill -9 the node running a stream's only stage: seconds until the stream's next token."""
    entry, victim = nodes[0], nodes[-1]
    instance = _place(entry, f"{victim.node_id}:0-30")
    _until(
        lambda: any(
            i["instance_id"] == instance and i["ready"] for i in entry.get("/v1/instances")["data"]
        ),
        300,
    )
    body = {
        "model": instance,
        "messages": PROMPT,
        "temperature": 0,
        "max_tokens": tokens,
        "stream": True,
    }
    stamps: list[float] = []
    killed_at = 0.0
    with httpx.stream("POST", f"{entry.url}/v1/chat/completions", json=body, timeout=300) as r:
        for line in r.iter_lines():
            if line.startswith("data:") and '"content":"' in line and '"content":""' not in line:
                stamps.append(time.perf_counter())
                if len(stamps) == 8:
                    victim.kill9()
                    killed_at = time.perf_counter()
    after = [t for t in stamps if t > killed_at]
    return {
        "kill_to_next_token_s": after[0] - killed_at if after else float("nan"),
        "tokens": len(stamps),
    }


def _place(node: NodeProcess, layers: str) -> str:
    r = httpx.post(f"{node.url}/instance", json={"model": MODEL, "layers": layers}, timeout=60)
    r.raise_for_status()
    return str(r.json()["instance_id"])


def run_cluster_bench(size: int, requests: int, tokens: int, repeats: int) -> dict[str, Any]:
    """Start `size` nodes on loopback, measure, kill the master, stop everything."""
    result: dict[str, Any] = {"nodes": size}
    with tempfile.TemporaryDirectory(prefix="shoal-bench-") as tmp:
        root = Path(tmp)
        nodes: list[NodeProcess] = []
        try:
            t0 = time.monotonic()
            nodes.append(start_cluster_node(root))
            nodes += [start_cluster_node(root, [nodes[0]]) for _ in range(size - 1)]
            _until(lambda: _joined(nodes), 120)
            result["join_s"] = time.monotonic() - t0
            result["api_latency"] = {n.node_id: latency_table(n, requests) for n in nodes}
            ids = [n.node_id for n in nodes]
            layouts = {"1 node": f"{ids[0]}:0-30"}
            if size >= 2:
                layouts["2 stages"] = f"{ids[0]}:0-15,{ids[1]}:15-30"
            if size >= 3:
                layouts["3 stages"] = f"{ids[0]}:0-10,{ids[1]}:10-20,{ids[2]}:20-30"
            placed = {name: _place(nodes[0], layers) for name, layers in layouts.items()}
            _until(lambda: all(i["ready"] for i in nodes[0].get("/v1/instances")["data"]), 300)
            inference: dict[str, Any] = {}
            for name, instance in placed.items():
                decode_rate(nodes[0], instance, 8)  # warm-up
                runs = [decode_rate(nodes[0], instance, tokens) for _ in range(repeats)]
                inference[name] = {
                    "decode_tok_s": statistics.median(r["decode_tok_s"] for r in runs),
                    "ttft_ms": statistics.median(r["ttft_ms"] for r in runs),
                    "runs": runs,
                }
            one = inference["1 node"]["decode_tok_s"]
            for name, row in inference.items():
                row["ratio_to_1_node"] = row["decode_tok_s"] / one
                hops = len(layouts[name].split(",")) - 1
                if hops:
                    added = 1000 / row["decode_tok_s"] - 1000 / one
                    row["added_ms_per_hop"] = added / hops
            result["inference"] = inference
            if size >= 3:
                result["stage_failover"] = stage_failover(nodes, tokens)
                nodes.remove(next(n for n in nodes if n.proc.poll() is not None))
            master = next(n for n in nodes if n.node_id == nodes[0].get("/state")["master"])
            survivors = [n for n in nodes if n is not master]
            master.kill9()
            if survivors:
                result["failover_s"] = _until(
                    lambda: (
                        len({s.get("/state")["master"] for s in survivors}) == 1
                        and survivors[0].get("/state")["master"] != master.node_id
                    ),
                    30,
                )
        finally:
            for node in nodes:
                node.stop()
    return result
