"""The composition root: builds every part of a node from Settings and runs them together."""

import asyncio
import logging
import socket
import sys
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from typing import Any

import uvicorn
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from shoal import __version__
from shoal.api.app import create_app
from shoal.cluster import ClusterNode
from shoal.errors import ShoalError
from shoal.models.catalog import Catalog
from shoal.models.local_card import card_for_path
from shoal.net.identity import Identity
from shoal.net.transport import DuplicateNodeId
from shoal.net.zenoh_transport import ZenohTransport
from shoal.paths import user_cards_dir
from shoal.profile.actor import Profiler
from shoal.settings import Settings
from shoal.state.store import StateStore
from shoal.types.events import NodeProfiled
from shoal.types.ids import ModelId
from shoal.types.profile import NodeProfile
from shoal.worker.local import LocalModels

log = logging.getLogger(__name__)


def _progress_reporter() -> tuple[AbstractContextManager[Any], Callable[[ModelId, int, int], None]]:
    """A rich progress bar on a terminal; otherwise a log line at every quarter."""
    if sys.stderr.isatty():
        bar = Progress(
            TextColumn("loading {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            transient=True,
        )
        tasks: dict[str, TaskID] = {}

        def show(model: ModelId, done: int, total: int) -> None:
            if model not in tasks:
                tasks[model] = bar.add_task(model, total=total)
            bar.update(tasks[model], completed=done, total=total)

        return bar, show

    def log_quarters(model: ModelId, done: int, total: int) -> None:
        if total and done * 4 // total != (done - 1) * 4 // total:
            log.info("loading %s: %d/%d layers", model, done, total)

    return nullcontext(), log_quarters


def _advertised_host(host: str) -> str:
    """The address others should use to reach a node listening on host."""
    return socket.gethostname() if host in ("0.0.0.0", "::", "") else host


def _transport(settings: Settings, identity: Identity) -> ZenohTransport:
    return ZenohTransport(
        identity.node_id,
        settings.cluster,
        listen=[f"tcp/{settings.host}:{settings.control_port}"],
        connect=[f"tcp/{peer}" for peer in settings.peers],
        multicast=settings.discovery == "multicast",
        lease_ms=settings.lease_ms,
    )


async def serve(settings: Settings) -> None:
    """Run a node until it is told to stop (SIGINT/SIGTERM)."""
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    catalog = Catalog(extra_dirs=[user_cards_dir(settings.data_dir)])
    preload = settings.model
    if settings.model_path is not None:
        card = card_for_path(settings.model_path, model_id=settings.model)
        catalog.add(card)
        preload = card.id
    if preload is not None:
        catalog.get(preload)  # an unknown --model fails now, with suggestions
    identity = Identity.load_or_create(settings.data_dir)
    transport = _transport(settings, identity)
    try:
        await transport.start()
    except DuplicateNodeId as exc:
        raise ShoalError(str(exc)) from exc
    store = StateStore.open(settings.data_dir / "state.db")
    cluster = ClusterNode(transport, store, settings.cluster)
    display, on_progress = _progress_reporter()
    service = LocalModels(
        catalog,
        engine=settings.engine,
        device=settings.device,
        max_batch=settings.max_batch,
        auto_load=settings.auto_load,
        on_progress=on_progress,
    )
    app = create_app(service, cluster=cluster, max_body_bytes=settings.max_body_bytes)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level="warning",
        lifespan="off",
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    host = _advertised_host(settings.host)

    async def publish_profile(profile: NodeProfile) -> None:
        await cluster.report(NodeProfiled(profile=profile))

    profiler = Profiler(
        identity.node_id,
        settings.data_dir,
        f"http://{host}:{settings.port}",
        "",  # the data plane arrives with distributed inference
        __version__,
        emit=publish_profile,
        interval_s=settings.profile_interval_s,
        bench=settings.microbench,
    )
    log.info(
        "shoal node %s on http://%s:%d, control port %d, cluster %r (data in %s)",
        identity.node_id,
        settings.host,
        settings.port,
        settings.control_port,
        settings.cluster,
        settings.data_dir,
    )
    try:
        with display:
            async with asyncio.TaskGroup() as group:
                group.create_task(_until_stopped(server, group), name="http")
                for coroutine in cluster.coroutines():
                    group.create_task(coroutine)
                group.create_task(profiler.run(), name="profiler")
                if preload is not None:
                    group.create_task(_preload(service, preload), name="preload")
    except* _Stopped:
        pass
    finally:
        await transport.close()  # peers see us leave at once
        store.close()
        await service.close()
        log.info("node %s stopped", identity.node_id)


class _Stopped(Exception):
    """The HTTP server returned: tear down every other task of the node."""


async def _until_stopped(server: uvicorn.Server, group: asyncio.TaskGroup) -> None:
    await server.serve()
    raise _Stopped


async def _preload(service: LocalModels, model_id: str) -> None:
    """Load the --model at start; a failure is logged and the node serves on."""
    try:
        await service.load(model_id)
    except ShoalError as exc:
        log.error("%s", exc)
