"""The composition root: builds every part of a node from Settings and runs them together."""

import asyncio
import contextlib
import ipaddress
import logging
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import uvicorn
from prometheus_client import CollectorRegistry

from shoal import __version__
from shoal.api.app import create_app
from shoal.api.auth import ApiKeys
from shoal.api.limits import header_timeout_protocol
from shoal.api.metrics import RunnersCollector, StageCache
from shoal.cluster import ClusterNode
from shoal.engines.registry import available_engines
from shoal.errors import BadRequest, ShoalError
from shoal.inference.metrics import RequestMetrics
from shoal.inference.prefix import DEFAULT_ENTRIES
from shoal.models.catalog import Catalog
from shoal.models.hub import Hub
from shoal.models.local_card import card_for_path
from shoal.net.credentials import Credentials
from shoal.net.enrol import EnrolServer, credentials_for
from shoal.net.files import FileServer, PeerFiles
from shoal.net.identity import Identity
from shoal.net.transport import DuplicateNodeId
from shoal.net.zenoh_transport import ZenohTransport
from shoal.paths import user_cards_dir
from shoal.placement.memory import default_context
from shoal.placer import make_placer
from shoal.profile.actor import Profiler
from shoal.profile.links import LinkMonitor
from shoal.profile.nvidia import parse_devices
from shoal.serving import ClusterService
from shoal.serving.pulls import Pulls
from shoal.settings import Settings
from shoal.state.model import State
from shoal.state.store import StateStore
from shoal.types.events import NodeProfiled
from shoal.types.ids import NodeId
from shoal.types.instance import Instance
from shoal.types.model_card import ModelCard
from shoal.types.profile import NodeProfile
from shoal.worker.fetch import Fetcher
from shoal.worker.plan import Assignment
from shoal.worker.worker import ProgressFn, RunnerOptions, Worker

log = logging.getLogger(__name__)

# open HTTP connections a node serves at once; past it uvicorn answers 503 (slowloris aside:
# header_timeout_protocol closes connections that send nothing)
MAX_HTTP_CONNECTIONS = 1024


WILDCARDS = ("0.0.0.0", "::", "")


def _route_address() -> str:
    """This machine's address on its default route (127.0.0.1 where it has none)."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("192.0.2.1", 9))  # TEST-NET-1; a UDP connect only picks the route
            return str(s.getsockname()[0])
    except OSError:
        return "127.0.0.1"


def _cluster_addresses(settings: Settings) -> tuple[str, str]:
    """Where runners, zenoh and enrolment bind, and the address other nodes reach them at:
    --cluster-host (a wildcard binds every address and advertises the route's), else the
    default route's address, so machines on one LAN find each other without flags."""
    bind = settings.cluster_host or _route_address()
    return bind, _route_address() if bind in WILDCARDS else bind


def _check_exposure(settings: Settings, keys: ApiKeys) -> None:
    """One warning when the API listens beyond loopback and takes no key."""
    if not keys.required and not _is_loopback(settings.host):
        log.warning(
            "the API on %s takes no key: anyone who reaches port %d can run and place models "
            "(set --api-key / --admin-key, or keep --host 127.0.0.1)",
            settings.host,
            settings.port,
        )


def _is_loopback(host: str) -> bool:
    """Whether host names this machine only (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _transport(
    settings: Settings, creds: Credentials, endpoints: list[str], bind: str
) -> ZenohTransport:
    """zenoh over mutual TLS with this node's cluster certificate (see net/credentials.py)."""
    return ZenohTransport(
        creds.node_id,
        creds.cluster,
        listen=[f"tls/{bind}:{settings.control_port}"],
        # a joiner's seed endpoints often repeat a --peers entry: one connector each
        connect=list(dict.fromkeys([f"tls/{peer}" for peer in settings.peers] + endpoints)),
        multicast=settings.discovery == "multicast",
        lease_ms=settings.lease_ms,
        tls=creds,
    )


async def _enrolment(
    settings: Settings, creds: Credentials, cluster: ClusterNode, bind: str, host: str
) -> None:
    """Serve joins (with a token) and removals (by members); tell `shoal invite` where."""
    enrol = EnrolServer(
        creds,
        settings.data_dir,
        admit=cluster.admit,
        remove=cluster.remove_member,
        trusts=cluster.trust,
        endpoints=lambda: [f"tls/{host}:{settings.control_port}"],
    )
    server = await enrol.start(bind, settings.enrol_port)
    port = server.sockets[0].getsockname()[1]
    (settings.data_dir / "tls" / "enrol.addr").write_text(f"{host}:{port}\n")
    async with server:
        await server.serve_forever()


async def serve(settings: Settings) -> None:
    """Run a node until it is told to stop (SIGINT/SIGTERM)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    catalog = Catalog(extra_dirs=[user_cards_dir(settings.data_dir)])
    preload = settings.model
    if settings.model_path is not None:
        card = card_for_path(settings.model_path, model_id=settings.model)
        catalog.add(card)
        preload = card.id
    if preload is not None and preload.count("/") != 1:  # a repo id is resolved once serving
        catalog.get(preload)  # an unknown --model fails now, with suggestions
    if settings.engine is not None and settings.engine not in available_engines():
        raise BadRequest(
            f"engine {settings.engine!r} is not available here "
            f"(installed: {', '.join(available_engines())})"
        )
    # --device cpu runs no stage on a GPU, so the node offers none
    devices = frozenset() if settings.device == "cpu" else parse_devices(settings.devices)
    identity = Identity.load_or_create(settings.data_dir)
    creds = await credentials_for(settings.data_dir, settings.cluster, settings.join)
    if "cluster" in settings.model_fields_set and settings.cluster != creds.cluster:
        raise BadRequest(
            f"this data dir belongs to cluster {creds.cluster!r}, not {settings.cluster!r}"
        )
    seed, endpoints = creds.seed()
    bind, advertise = _cluster_addresses(settings)
    keys = ApiKeys.of(settings.api_keys, settings.admin_keys, settings.api_keys_file)
    _check_exposure(settings, keys)
    transport = _transport(settings, creds, endpoints, bind)
    try:
        await transport.start()
    except DuplicateNodeId as exc:
        raise ShoalError(str(exc)) from exc
    store = StateStore.open(settings.data_dir / "state.db")
    cluster = ClusterNode(
        transport, store, creds.cluster, identity, seed, placer=make_placer(catalog)
    )
    hub = Hub(settings.data_dir / "hub")  # HF_ENDPOINT and HF_TOKEN from the environment
    files = FileServer(hub.root, creds.server_ssl_context(), revoked=lambda: cluster.state.revoked)
    files_port = await files.start(bind, settings.files_port)
    peer_files = PeerFiles(creds.client_ssl_context())
    fetcher = Fetcher(
        identity.node_id,
        hub,
        peers=lambda: _file_servers(cluster.state, identity.node_id),
        files=peer_files,
        instances=lambda: [r.instance for r in cluster.state.instances.values()],
    )

    registry = CollectorRegistry()  # this node's /metrics
    service = ClusterService(
        cluster,
        catalog,
        auto_place=settings.auto_load,
        max_batch=settings.max_batch,
        max_queue=settings.max_queue,
        prefill_chunk=settings.prefill_chunk,
        prefix_entries=DEFAULT_ENTRIES if settings.prefix_cache_mb else 0,
        speculate=settings.speculate,
        tls=creds.client_ssl_context(),  # the data plane: runners take members only
        resolve=fetcher.card,
        tokenizer_files=lambda card: fetcher.stage(card, None, None),
        metrics=RequestMetrics(registry),
    )
    pull_files = Pulls(hub, catalog)
    app = create_app(
        service,
        cluster=cluster,
        max_body_bytes=settings.max_body_bytes,
        body_timeout_s=settings.http_timeout_s,
        profile_wait_s=settings.lease_ms / 1000,
        keys=keys,
        cors_origins=settings.cors_origins,
        registry=registry,
        loads=service.loads,
        fetched=fetcher,
        hub_root=hub.root,
        pull_files=pull_files,
    )

    def card_of(instance: Instance) -> ModelCard:
        return instance.card or catalog.get(instance.model_id)

    async def fetch(a: Assignment, progress: ProgressFn) -> Path:
        return await fetcher.stage(card_of(a.instance), a.instance, a.plan, progress)

    worker = Worker(
        identity.node_id,
        lambda: cluster.state,
        cluster.replica.wait_past,
        cluster.report,
        fetch,
        quant=lambda instance: settings.quant or card_of(instance).quant,
        options=RunnerOptions(
            host=bind,
            advertise=advertise,
            credentials=settings.data_dir,
            device=settings.device,
            simulated_gpus=settings.simulated_gpus is not None,
            dtype=settings.dtype,
            threads=settings.threads,
            cache_dir=settings.weights_cache or settings.data_dir / "weights-cache",
            log_format=settings.log_format,
            prefix_cache_bytes=settings.prefix_cache_mb << 20,
        ),
    )

    def stage_caches() -> list[StageCache]:
        return [
            StageCache(
                u.assignment.instance.model_id,
                u.assignment.key.instance_id,
                u.assignment.key.stage,
                u.positions,
                default_context(card_of(u.assignment.instance)),  # placement plans one sequence
            )
            for u in worker.kv_usage()
        ]

    registry.register(RunnersCollector(lambda: worker.restarts, stage_caches))
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        log_config=None,  # uvicorn's loggers go through the root handler (log.py: text or JSON)
        lifespan="off",
        timeout_graceful_shutdown=30,
        http=header_timeout_protocol(settings.http_timeout_s),
        limit_concurrency=MAX_HTTP_CONNECTIONS,
    )
    server = _Server(config)
    host = advertise if settings.host in WILDCARDS else settings.host

    async def publish_profile(profile: NodeProfile) -> None:
        await cluster.report(NodeProfiled(profile=profile))

    links = LinkMonitor(cluster.ping, cluster.transport.peers)
    profiler = Profiler(
        identity.node_id,
        settings.data_dir,
        f"http://{host}:{settings.port}",
        _host_port(advertise, files_port),  # the file server: model files for members
        __version__,
        emit=publish_profile,
        interval_s=settings.profile_interval_s,
        engines=[settings.engine] if settings.engine is not None else None,
        bench=settings.microbench,
        probe=settings.probe_engines,
        devices=devices,
        simulated_gpus=settings.simulated_gpus,
        links=links.links,
    )
    log.info(
        "shoal node %s: API on http://%s:%d, cluster-facing on %s (advertised %s), control port "
        "%d, cluster %r (data in %s)",
        identity.node_id,
        settings.host,
        settings.port,
        bind,
        advertise,
        settings.control_port,
        creds.cluster,
        settings.data_dir,
    )
    try:
        async with asyncio.TaskGroup() as group:
            group.create_task(_until_stopped(server), name="http")
            enrolment = _enrolment(settings, creds, cluster, bind, advertise)
            group.create_task(enrolment, name="enrolment")
            for coroutine in cluster.coroutines():
                group.create_task(coroutine)
            group.create_task(profiler.run(), name="profiler")
            group.create_task(links.run(settings.profile_interval_s), name="links")
            group.create_task(worker.run(), name="worker")
            group.create_task(_prune(service, cluster), name="prune")
            if preload is not None:
                group.create_task(_preload(service, cluster, preload), name="preload")
    except* _Stopped:
        pass
    finally:
        await service.close()
        await pull_files.close()
        await worker.shutdown()
        await files.stop()
        await peer_files.aclose()
        await transport.close()  # peers see us leave at once
        store.close()
        log.info("node %s stopped", identity.node_id)


class _Server(uvicorn.Server):
    """uvicorn, minus its signal handling: the node owns SIGINT/SIGTERM (see serve())."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn would re-raise the signal after its graceful shutdown, killing the process
        # before the node leaves the cluster and stops its runners
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._stop_on_signal, sig)
        try:
            yield
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)

    def _stop_on_signal(self, sig: signal.Signals) -> None:
        if self.should_exit:  # a second signal: do not wait for open streams
            self.force_exit = True
        log.info("%s: no new requests; finishing the ones running, then leaving", sig.name)
        self.should_exit = True


class _Stopped(Exception):
    """The HTTP server returned: tear down every other task of the node."""


async def _until_stopped(server: uvicorn.Server) -> None:
    await server.serve()
    raise _Stopped


def _host_port(host: str, port: int) -> str:
    """host:port, an IPv6 address in brackets."""
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _file_servers(state: State, me: NodeId) -> list[tuple[NodeId, str]]:
    """The connected members other than this node, with their file servers' addresses."""
    return [
        (node_id, record.profile.data_addr)
        for node_id, record in state.nodes.items()
        if node_id != me
        and record.connected
        and record.profile is not None
        and record.profile.data_addr
        and node_id not in state.revoked
    ]


async def _prune(service: ClusterService, cluster: ClusterNode) -> None:
    """Let go of instances that are deleted or broken, after every state change."""
    seen = cluster.state.index
    while True:
        await cluster.replica.wait_past(seen)
        seen = cluster.state.index
        await service.prune()


async def _preload(service: ClusterService, cluster: ClusterNode, model_id: str) -> None:
    """Make sure an instance of --model runs once this node is in the state; failures are logged."""
    while cluster.state.nodes.get(cluster.node_id) is None or (
        cluster.state.nodes[cluster.node_id].profile is None
    ):
        await cluster.replica.wait_past(cluster.state.index)
    try:
        await service.acquire(model_id)
    except ShoalError as exc:
        log.error("%s", exc)
