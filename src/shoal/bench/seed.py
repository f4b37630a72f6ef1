"""The seed cluster's tables, for every node: GET /v1/models latency, model-listing throughput,
round trips between nodes over the control plane, availability; and the seed's own figures."""

import http.client
import json
import time
from typing import Any
from urllib.parse import urlsplit

import httpx

from shoal.bench.errors import BenchError
from shoal.bench.stats import summary
from shoal.bench.target import Endpoint

# The seed cluster's published benchmark (../shared/REFERENCE.md): localhost, 10 GETs per node,
# 1 listing, 20 pings to the remote node over Wi-Fi.
SEED: dict[str, Any] = {
    "api_latency_ms": {"min": 2.03, "max": 7.32, "avg": 2.92, "median": 2.39},
    "api_latency_goal_median_ms": 1.0,
    "rtt_ms": {"min": 95.0, "avg": 824.0, "p95": 2674.0},
    "listing": {"models": 22, "ms": 4.60},
}


GIVE_UP_AFTER = 5  # failed GETs in a row


def _connect(url: str) -> http.client.HTTPConnection:
    parts = urlsplit(url)
    return http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80, timeout=10)


def timed_gets(url: str, path: str, n: int) -> tuple[list[float], bytes]:
    """One warm-up, then n keep-alive GETs: the answered ones' times in ms (request sent → body
    read) and the last body. A failed request is not timed; the connection is renewed."""
    conn = _connect(url)
    samples: list[float] = []
    body = b""
    failed_in_a_row = 0
    for i in range(n + 1):
        start = time.perf_counter()
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            body = response.read()
        except (OSError, http.client.HTTPException):
            conn.close()
            conn = _connect(url)
            failed_in_a_row += 1
            if failed_in_a_row == GIVE_UP_AFTER:
                break  # the node is gone: the rest count as unanswered
            continue
        failed_in_a_row = 0
        if response.status == 200 and i > 0:
            samples.append((time.perf_counter() - start) * 1000)
    conn.close()
    return samples, body


def api_latency(node: Endpoint, requests: int) -> dict[str, Any]:
    """The seed's API latency row and model-listing throughput for one node."""
    samples, body = timed_gets(node.url, "/v1/models", requests)
    row: dict[str, Any] = {"url": node.url, "requests": requests, "answered": len(samples)}
    if not samples:
        return row
    latency = summary(samples)
    listed = len(json.loads(body)["data"])
    return row | {
        "latency_ms": latency,
        "samples_ms": samples,
        "models_listed": listed,
        "listing_bytes": len(body),
        "listing_ms": latency["median"],
        "models_per_s": listed / (latency["median"] / 1000),
        "requests_per_s": len(samples) / (sum(samples) / 1000),
    }


def rtt(source: Endpoint, peer: Endpoint, count: int) -> dict[str, Any]:
    """`count` control-plane round trips from source to peer, as source measures them."""
    url = f"{source.url}/v1/nodes/{peer.node_id}/ping"
    r = httpx.get(url, params={"count": count}, timeout=10 + 2 * count)
    if r.status_code != 200:
        raise BenchError(f"{url} answered HTTP {r.status_code}: {r.text[:200]}")
    body = r.json()
    row: dict[str, Any] = {"count": count, "lost": body["lost"]}
    if body["rtt_ms"]:
        row |= {"rtt_ms": summary(body["rtt_ms"]), "samples_ms": body["rtt_ms"]}
    return row


def availability(node: Endpoint, api: dict[str, Any]) -> dict[str, Any]:
    """Whether the cluster counts the node as up, and the fraction of its GETs answered."""
    return {
        "up": node.up,
        "requests": api["requests"],
        "answered": api["answered"],
        "fraction": api["answered"] / api["requests"],
    }


def rtt_overall(table: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Every pair's samples together: the row to set beside the seed's RTT."""
    samples = [
        ms for row in table.values() for pair in row.values() for ms in pair.get("samples_ms", [])
    ]
    return summary(samples)
