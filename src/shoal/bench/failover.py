"""Failover scenarios on a loopback cluster the bench started (never on one it was pointed at).

Stage: a stream runs on an instance whose only stage is on one node; after 8 content chunks that
node gets SIGKILL; measured: kill → the stream resumes (re-placement, shard load, replay of
prompt + tokens). Master: SIGKILL the master; measured: kill → every survivor follows
one new master.
"""

import asyncio
import itertools
import statistics
import time
from typing import Any

import httpx

from shoal.bench.cluster import Loopback, joined, place, ready, until
from shoal.bench.errors import BenchError
from shoal.bench.nodes import NodeProcess
from shoal.bench.stream import STREAM_TIMEOUT, stream_chat

KILL_AFTER_CHUNKS = 8


async def _stream_and_kill(
    entry: NodeProcess, victim: NodeProcess, instance: str, content: str, tokens: int
) -> dict[str, Any]:
    killed_at = 0.0

    def on_chunk(n: int) -> None:
        nonlocal killed_at
        if n == KILL_AFTER_CHUNKS:
            victim.kill9()
            killed_at = time.perf_counter()

    async with httpx.AsyncClient(base_url=entry.url, timeout=STREAM_TIMEOUT) as client:
        sample = await stream_chat(client, instance, content, tokens, on_chunk)
    return _resumption(sample.stamps, killed_at) | {
        "chunks_before_kill": KILL_AFTER_CHUNKS,
        "completion_tokens": sample.completion_tokens,
        "stream_total_s": sample.end - sample.start,
    }


def _resumption(stamps: list[float], killed_at: float) -> dict[str, float]:
    """The stream resumed at the end of the longest gap after the kill. (The killed node's
    runner may still send a token or two before it sees its parent gone: the next token after
    the kill is not yet the failover.)"""
    before = [t for t in stamps if t <= killed_at]
    after = [t for t in stamps if t > killed_at]
    if not killed_at or not after:
        raise BenchError(f"the stream ended before the kill ({len(stamps)} chunks)")
    gaps = [(b - a, b) for a, b in zip([killed_at, *after], after, strict=False)]
    stall, resumed = max(gaps)
    return {
        "kill_to_resumed_s": resumed - killed_at,
        "longest_stall_s": stall,
        "kill_to_next_token_s": after[0] - killed_at,
        "median_gap_before_kill_s": statistics.median(b - a for a, b in itertools.pairwise(before)),
    }


def stage_failover(cluster: Loopback, model: str, layers: int, content: str, tokens: int) -> dict:
    """SIGKILL the node holding a running stream's only stage; then bring it back if the
    cluster would otherwise be left with one node (the master scenario needs two)."""
    entry, victim = cluster.live()[0], cluster.live()[-1]
    instance = place(entry.url, model, f"{victim.node_id}:0-{layers}")
    until(lambda: ready(entry.url, [instance]), 300, "the failover instance")
    result = asyncio.run(_stream_and_kill(entry, victim, instance, content, tokens))
    result["victim"] = victim.node_id
    if len(cluster.live()) < 2:
        start = time.monotonic()
        victim.start()
        until(lambda: joined(cluster.live()) and victim in cluster.live(), 120, "the restart")
        result["restart_to_rejoined_s"] = time.monotonic() - start
    return result


def _master(nodes: list[NodeProcess]) -> str:
    return str(nodes[0].get("/state")["master"])


def master_failover(cluster: Loopback) -> dict[str, Any]:
    """SIGKILL the master: seconds until every survivor follows one new master."""
    nodes = cluster.live()
    old = _master(nodes)
    master = next(n for n in nodes if n.node_id == old)
    survivors = [n for n in nodes if n is not master]
    master.kill9()
    took = until(
        lambda: len({_master([s]) for s in survivors}) == 1 and _master(survivors) != old,
        30,
        "a new master",
    )
    return {"kill_to_new_master_s": took, "nodes_before": len(nodes), "old_master": old}
