"""The cluster's own endpoints: /node_id, /state, /v1/nodes (and a ping to one), /events (SSE)."""

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import APIRouter, HTTPException, Query, Request
from fastapi.responses import Response, StreamingResponse

from shoal.api.sse import sse_event
from shoal.cluster import ClusterNode
from shoal.errors import BadRequest, ModelUnavailable
from shoal.types.ids import NodeId

router = APIRouter()


def _cluster(request: Request) -> ClusterNode:
    cluster: ClusterNode | None = request.app.state.cluster
    if cluster is None:
        raise ModelUnavailable("this node runs without a cluster")
    return cluster


@router.get("/node_id")
async def node_id(request: Request) -> str:
    return _cluster(request).node_id


@router.get("/state")
async def state(request: Request) -> Response:
    """The replicated state; two nodes at the same "index" return identical bytes."""
    return Response(_cluster(request).state.model_dump_json(), media_type="application/json")


@router.get("/v1/nodes")
async def nodes(request: Request) -> dict[str, Any]:
    """Every node the cluster knows, with its profile and when this node last heard from it."""
    cluster = _cluster(request)
    now = time.monotonic()
    rows = []
    for node, record in cluster.state.nodes.items():
        seen = now if node == cluster.node_id else cluster.election.last_seen(node)
        rows.append(
            {
                "id": node,
                "connected": record.connected,
                "lost_reason": record.lost_reason,
                "is_master": node == cluster.master_id,
                "last_seen_s_ago": None if seen is None else round(now - seen, 3),
                **(record.profile.model_dump(exclude={"node_id"}) if record.profile else {}),
            }
        )
    return {"master": cluster.master_id, "index": cluster.state.index, "nodes": rows}


@router.get("/v1/nodes/{node_id}/ping")
async def ping(
    request: Request, node_id: str, count: int = Query(default=20, ge=1, le=1000)
) -> dict[str, Any]:
    """Round-trip times in ms from this node to another over the control plane (`shoal bench`)."""
    cluster = _cluster(request)
    peer = NodeId(node_id)
    if peer == cluster.node_id:
        raise BadRequest("that is this node; ask it for its round trips to another", "node_id")
    if peer not in cluster.state.nodes and peer not in cluster.transport.peers():
        raise HTTPException(404, f"no node {node_id} in this cluster")
    if peer not in cluster.transport.peers():
        raise HTTPException(503, f"node {node_id} is not connected")
    rtt_ms, lost = await cluster.ping(peer, count)
    return {"from": cluster.node_id, "to": peer, "count": count, "lost": lost, "rtt_ms": rtt_ms}


@router.get("/log")
async def log_entries(
    request: Request,
    start: int = Query(default=1, alias="from", ge=1),
    end: int | None = Query(default=None, alias="to", ge=1),
) -> dict[str, Any]:
    """Log entries [from, to) still in this node's journal (older ones live in its snapshot)."""
    store = _cluster(request).store
    first = max(start, store.first_index)
    stop = min(end if end is not None else store.last_index + 1, store.last_index + 1)
    entries = store.entries(first, stop) if first < stop else []
    return {
        "first_index": store.first_index,
        "last_index": store.last_index,
        "entries": [e.model_dump(mode="json") for e in entries],
    }


@router.get("/events")
async def events(
    request: Request, start: int | None = Query(default=None, alias="from", ge=1)
) -> StreamingResponse:
    """Server-sent events of the log: from index `from` (default: only new entries)."""
    cluster = _cluster(request)

    async def stream() -> AsyncIterator[str]:
        live = cluster.replica.watch()
        sent = cluster.store.last_index
        if start is not None:
            first = max(start, cluster.store.first_index)
            for entry in cluster.store.entries(first, sent + 1):
                yield sse_event(entry.model_dump(mode="json"))
        async for entry in live:
            if entry.index > sent:
                sent = entry.index
                yield sse_event(entry.model_dump(mode="json"))

    return StreamingResponse(stream(), media_type="text/event-stream")
