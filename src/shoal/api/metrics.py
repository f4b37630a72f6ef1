"""GET /metrics: Prometheus text (or OpenMetrics, if the scraper asks) for this node.

Two kinds of metric share the node's registry. Counters and histograms of requests are updated
where the event happens (inference/metrics.py, by the Scheduler). Everything that is a level —
requests running and waiting, nodes, the master's term, the log index, instances by state, bytes
fetched — is read from the live objects when scraped (NodeCollector), so nothing has to keep
a copy in step. Behind the API key like every route but /healthz: a user key may read it.
"""

from collections.abc import Callable, Iterable, Iterator
from typing import NamedTuple, Protocol

from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import Response
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily, Metric

from shoal import __version__
from shoal.cluster import ClusterNode
from shoal.inference.metrics import InstanceLoad
from shoal.state.model import InstanceRecord

router = APIRouter()

INSTANCE_STATES = ("downloading", "loading", "ready", "failed")

Loads = Callable[[], Iterable[InstanceLoad]]


class FetchedBytes(Protocol):
    """What a Fetcher (worker/fetch.py) has moved since the node started."""

    @property
    def hub_bytes(self) -> int: ...

    @property
    def peer_bytes(self) -> int: ...


def instance_state(record: InstanceRecord) -> str:
    """One of INSTANCE_STATES: ready, else failed, downloading or loading (placed counts)."""
    statuses = [r.status.kind for r in record.runners.values()]
    if record.ready:
        return "ready"
    if "failed" in statuses:
        return "failed"
    return "downloading" if "downloading" in statuses else "loading"


class NodeCollector:
    """The node's gauges (and the fetch byte counters), read from live state at each scrape."""

    def __init__(
        self,
        cluster: ClusterNode | None,
        loads: Loads,
        fetched: FetchedBytes | None,
    ) -> None:
        self._cluster = cluster
        self._loads = loads
        self._fetched = fetched

    def collect(self) -> Iterator[Metric]:
        """Every family, built afresh (the registry calls this once per scrape)."""
        yield from self._requests()
        if self._cluster is not None:
            yield from self._control_plane(self._cluster)
        if self._fetched is not None:
            yield CounterMetricFamily(
                "shoal:hub_downloaded_bytes",
                "Bytes of weight files this node downloaded from the Hugging Face Hub.",
                value=self._fetched.hub_bytes,
            )
            yield CounterMetricFamily(
                "shoal:peer_copied_bytes",
                "Bytes of weight files this node copied from other nodes.",
                value=self._fetched.peer_bytes,
            )

    def _requests(self) -> Iterator[Metric]:
        labels = ["model_name", "instance"]
        running = GaugeMetricFamily(
            "shoal:num_requests_running",
            "Requests in an instance's batch, from this node.",
            labels=labels,
        )
        waiting = GaugeMetricFamily(
            "shoal:num_requests_waiting",
            "Requests queued for an instance's batch, from this node.",
            labels=labels,
        )
        # a handle moved onto an instance another handle serves reports under the same labels
        totals: dict[tuple[str, str], tuple[int, int]] = {}
        for load in self._loads():
            r, w = totals.get((load.model, load.instance), (0, 0))
            totals[(load.model, load.instance)] = (r + load.running, w + load.waiting)
        for (model, instance), (r, w) in sorted(totals.items()):
            running.add_metric([model, instance], r)
            waiting.add_metric([model, instance], w)
        yield running
        yield waiting

    def _control_plane(self, cluster: ClusterNode) -> Iterator[Metric]:
        state = cluster.state
        info = GaugeMetricFamily(
            "shoal:node_info", "This node (always 1).", labels=["node_id", "cluster", "version"]
        )
        info.add_metric([cluster.node_id, cluster.cluster, __version__], 1)
        yield info
        connected = sum(1 for n in state.nodes.values() if n.connected)
        yield _gauge("nodes_connected", "Nodes the replicated state has connected.", connected)
        yield _gauge("nodes_known", "Nodes the replicated state knows.", len(state.nodes))
        yield _gauge("master_term", "The highest election term seen here.", cluster.election.term)
        is_master = int(cluster.master_id == cluster.node_id)
        yield _gauge("is_master", "1 while this node is the master.", is_master)
        yield _gauge("log_index_applied", "Index of the last log entry applied here.", state.index)
        instances = GaugeMetricFamily(
            "shoal:instances", "Placed instances by state.", labels=["model_name", "state"]
        )
        counts: dict[str, dict[str, int]] = {}
        for record in state.instances.values():
            by_state = counts.setdefault(
                record.instance.model_id, dict.fromkeys(INSTANCE_STATES, 0)
            )
            by_state[instance_state(record)] += 1
        for model_name, by_state in sorted(counts.items()):
            for name, n in by_state.items():
                instances.add_metric([model_name, name], n)
        yield instances


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(f"shoal:{name}", doc, value=value)


class StageCache(NamedTuple):
    """One stage this node runs: the positions its KV caches hold, and the positions placement
    planned its cache for (the context, times the sequences)."""

    model: str
    instance: str
    stage: int
    positions: int
    planned: int


class RunnersCollector:
    """This node's runners, read from its worker at each scrape: restarts after a crash, and
    each stage's KV cache use (vLLM's kv_cache_usage_perc: the share of the planned cache held;
    over 1 when more is cached than placement planned for, as caches grow per request)."""

    def __init__(
        self, restarts: Callable[[], int], caches: Callable[[], Iterable[StageCache]] = tuple
    ) -> None:
        self._restarts = restarts
        self._caches = caches

    def collect(self) -> Iterator[Metric]:
        doc = "Runner subprocesses this node restarted after a crash."
        yield CounterMetricFamily("shoal:runner_restarts", doc, value=self._restarts())
        labels = ["model_name", "instance", "stage"]
        usage = GaugeMetricFamily(
            "shoal:kv_cache_usage_perc",
            "KV cache a stage holds here, as a share of what placement planned (1 = 100%).",
            labels=labels,
        )
        held = GaugeMetricFamily(
            "shoal:kv_cache_positions", "Token positions a stage's KV caches hold.", labels=labels
        )
        for c in self._caches():
            names = [c.model, c.instance, str(c.stage)]
            usage.add_metric(names, c.positions / c.planned if c.planned else 0.0)
            held.add_metric(names, c.positions)
        yield usage
        yield held


def install(
    app: FastAPI,
    registry: CollectorRegistry,
    cluster: ClusterNode | None,
    loads: Loads,
    fetched: FetchedBytes | None,
) -> None:
    """Serve `registry` (one no other app uses) on /metrics, with this node's gauges added."""
    registry.register(NodeCollector(cluster, loads, fetched))
    app.state.metrics = registry
    app.include_router(router)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    # collected on the event loop: the state and the schedulers are read where they change
    registry: CollectorRegistry = request.app.state.metrics
    encode, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encode(registry), media_type=content_type)
